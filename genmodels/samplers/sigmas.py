"""Noise levels for score models: geometric schedules and the NCSNv2 rules (Song & Ermon 2020).

Conventions used throughout gensweep:
- sigmas run from largest to smallest, sigma_1 > ... > sigma_L, and `gamma` is their common ratio
  sigma_{i+1} / sigma_i < 1 (0.963 for CIFAR-10). The NCSNv2 paper writes its ratio the other way up,
  sigma_{i-1} / sigma_i > 1; functions that take the paper's ratio say so.
- step sizes follow NCSN Algorithm 1 (Song & Ermon 2019): alpha_i = eps * sigma_i^2 / sigma_L^2 and
  x <- x + alpha_i / 2 * s + sqrt(alpha_i) * z. NCSNv2's Algorithm 1 writes x <- x + alpha * s + sqrt(2 alpha) * z,
  so its eps is half of ours: NCSNv2's CIFAR-10 eps = 6.2e-6 is eps = 1.24e-5 here.

`NoiseSchedule` holds one model's levels and step sizes, derived once; `cached_max_pairwise_distance` gives NCSNv2's
sigma_1 for a training set, computed once per content.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from filelock import FileLock
from torch import nn

from genmodels.io import write_text_atomic


def geometric(sigma_1: float, sigma_L: float, L: int) -> list[float]:
    """L noise levels from sigma_1 down to sigma_L, equally spaced in log sigma."""
    if L < 2 or not sigma_1 > sigma_L > 0:
        raise ValueError(f"need L >= 2 and sigma_1 > sigma_L > 0, got L={L}, sigma_1={sigma_1}, sigma_L={sigma_L}")
    q = sigma_L / sigma_1
    return [sigma_1] + [sigma_1 * q ** (i / (L - 1)) for i in range(1, L - 1)] + [sigma_L]


def ratio(sigmas: list[float]) -> float:
    """The common ratio sigma_{i+1} / sigma_i of a geometric schedule."""
    return (sigmas[-1] / sigmas[0]) ** (1 / (len(sigmas) - 1))


def levels_for_ratio(sigma_1: float, sigma_L: float, gamma: float) -> int:
    """Fewest levels from sigma_1 to sigma_L whose common ratio is at least `gamma` (neighbours at least that close)."""
    if not 0 < gamma < 1:
        raise ValueError(f"gamma is sigma_(i+1)/sigma_i and must lie in (0, 1), got {gamma}")
    # the epsilon absorbs float error when log(sigma_1/sigma_L)/log(1/gamma) is an integer
    return 1 + math.ceil(math.log(sigma_1 / sigma_L) / math.log(1 / gamma) - 1e-9)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def shell_overlap(gamma: float, D: int) -> float:
    """Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma), NCSNv2 Technique 2.

    With gamma = sigma_i / sigma_{i-1} < 1 this is (in the large-D limit, where ||x|| of x ~ N(0, s^2 I) is
    N(sqrt(D) s, s^2 / 2)) the probability that a sample of the larger level sigma_{i-1} lands within three
    standard deviations of the typical radius of the next level sigma_i: the overlap annealed Langevin relies on,
    since level i starts from level i-1's samples.
    """
    a = math.sqrt(2 * D) * (gamma - 1)
    return _normal_cdf(a + 3 * gamma) - _normal_cdf(a - 3 * gamma)


def ncsnv2_gamma(D: int, overlap: float = 0.5) -> float:
    """The ratio gamma = sigma_{i+1}/sigma_i < 1 with shell_overlap(gamma, D) = overlap (0.963 for D = 3072).

    The overlap falls from 0.997 at gamma = 1 on both sides, so the equation has two roots. The paper derives it
    for its ratio sigma_{i-1}/sigma_i > 1, whose root for D = 3072 is 1.0398 (a ratio of 1/1.0398 = 0.9617 in our
    convention, L = 220 from 50 to 0.01). We take the root below 1, 0.9631 (L = 228), which is the overlap of the
    larger level's samples with the smaller level's shell, and is the closer to the paper's CIFAR-10 schedule
    (50 -> 0.01 in 232 levels, ratio 0.9638).
    """
    if not 0 < overlap < shell_overlap(1.0, D):
        raise ValueError(f"overlap must lie in (0, {shell_overlap(1.0, D):.4f}), got {overlap}")
    lo, hi = 0.0, 1.0  # shell_overlap rises monotonically from ~0 at gamma = 0 to 0.997 at gamma = 1
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shell_overlap(mid, D) < overlap else (lo, mid)
    return (lo + hi) / 2


def ncsnv2(sigma_1: float, sigma_L: float, D: int, overlap: float = 0.5) -> list[float]:
    """NCSNv2 schedule: geometric from sigma_1 (the data's max pairwise distance) to sigma_L, ratio from the rule."""
    return geometric(sigma_1, sigma_L, levels_for_ratio(sigma_1, sigma_L, ncsnv2_gamma(D, overlap)))


def langevin_variance_ratio(eps, T, sigma_L: float, gamma: float):
    """s_T^2 / sigma_i^2 of NCSNv2 Proposition 3, in our step convention (alpha/2 drift, sqrt(alpha) noise).

    For data that is a single point, p_sigma_i = N(0, sigma_i^2 I) and the score is -x / sigma_i^2, so T Langevin
    steps at level i map a start of variance sigma_{i-1}^2 = (sigma_i / gamma)^2 (the previous level's) to variance
    s_T^2 with, for r = 1 - eps / (2 sigma_L^2) and c the chain's stationary variance over sigma_i^2,
    c = (eps / sigma_L^2) / (1 - r^2):
        s_T^2 / sigma_i^2 = r^(2T) (1 / gamma^2 - c) + c.
    It does not depend on i, because alpha_i / sigma_i^2 = eps / sigma_L^2 at every level. `eps` and `T` may be
    tensors (one value each per element).
    """
    a = eps / sigma_L ** 2
    r = 1 - a / 2
    c = a / (1 - r * r)
    return r ** (2 * T) * (1 / gamma ** 2 - c) + c


def ncsnv2_step_sizes(steps: Sequence[int], sigma_L: float, gamma: float) -> list[float]:
    """NCSNv2 Technique 4: for each T in `steps`, the eps that brings `langevin_variance_ratio` closest to 1.

    `gamma` is our ratio sigma_{i+1}/sigma_i < 1. The ratio is above 1 for every eps (too few steps leave the
    previous level's excess variance, too large steps add discretisation variance), so this minimises it: a
    golden-section search in log eps over the stable range eps < 4 sigma_L^2, for every T at once (NoiseSchedule
    needs T = 1 ... langevin_steps). For CIFAR-10's schedule and T = 5 it gives 1.24e-5, the paper's 6.2e-6 in its
    convention.
    """
    T = torch.tensor(list(steps), dtype=torch.float64)
    if len(T) == 0 or T.min() < 1 or not 0 < gamma < 1:
        raise ValueError(f"need step counts T >= 1 and 0 < gamma < 1, got T={T.tolist()}, gamma={gamma}")
    inv_phi = (math.sqrt(5) - 1) / 2
    lo = torch.full_like(T, math.log(sigma_L ** 2 * 1e-8))
    hi = torch.full_like(T, math.log(sigma_L ** 2 * 3.9))
    for _ in range(200):
        a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        left = langevin_variance_ratio(a.exp(), T, sigma_L, gamma) < \
            langevin_variance_ratio(b.exp(), T, sigma_L, gamma)  # then the minimum lies in [lo, b]
        lo, hi = torch.where(left, lo, a), torch.where(left, b, hi)
    return ((lo + hi) / 2).exp().tolist()


class NoiseSchedule(nn.Module):
    """A score model's noise levels and annealed Langevin's step sizes, derived once (as score_sde's VESDE).

    - `sigmas`: sigma_1 > ... > sigma_L, a buffer (it moves with the model and travels with its checkpoints);
      `sigma_1`, `sigma_L`, `L` and their ratio `gamma` as numbers for the host.
    - `T` Langevin steps per level with step constant `eps` (NCSN Algorithm 1: alpha_i = eps sigma_i^2 / sigma_L^2);
      eps None takes the NCSNv2 criterion's eps for T (`ncsnv2_step_sizes`).
    - `eps_for(n)`, `alphas(n)`: the step constant and each level's step size for n steps per level (the FID
      ladder's cheap rungs run n < T). The criterion's search runs here, once, for n = 1 ... T.
    """

    def __init__(self, sigmas: Sequence[float], T: int, eps: float | None = None):
        super().__init__()
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) < 2 or sigmas[-1] <= 0 or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"need two or more decreasing sigmas > 0, got {sigmas}")
        if T < 1 or (eps is not None and not eps > 0):
            raise ValueError(f"need T >= 1 Langevin steps per level and eps > 0 (or None), got T={T}, eps={eps}")
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float32))
        self.sigma_1, self.sigma_L, self.L, self.T = sigmas[0], sigmas[-1], len(sigmas), T
        self.gamma = ratio(sigmas)
        criterion = ncsnv2_step_sizes(range(1, T + 1), self.sigma_L, self.gamma)
        self.eps = criterion[-1] if eps is None else eps
        # With n < T steps eps grows by min(T / n, c(n) / c(T)), c(n) the criterion's eps for n steps: each level's
        # chain covers as much of the same Langevin time T * alpha_i as the criterion allows for that few steps (a
        # bigger step only adds discretisation error). The factor is the same for every trial with the same
        # schedule and T, so trials keep the order of their own eps: a searched eps changes every rung's samples.
        self._eps_by_T = [self.eps * min(T / n, c / criterion[-1]) for n, c in enumerate(criterion, 1)]
        self._alpha_over_eps = [(s / self.sigma_L) ** 2 for s in sigmas]

    def eps_for(self, T: int) -> float:
        """The step constant for T Langevin steps per level (`eps` for T at or above the schedule's)."""
        return self._eps_by_T[min(T, self.T) - 1]

    def alphas(self, T: int | None = None) -> list[float]:
        """Each level's step size alpha_i = eps sigma_i^2 / sigma_L^2 for T steps per level (default: the
        schedule's)."""
        eps = self.eps_for(T or self.T)
        return [eps * a for a in self._alpha_over_eps]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The sigmas follow from the config; a checkpoint's must be the same ones, or the host's numbers (gamma, the
        # step sizes) would not describe the levels the network was trained on.
        saved = state_dict.get(prefix + "sigmas")
        if saved is not None and (saved.shape != self.sigmas.shape or
                                  not torch.allclose(saved.to(self.sigmas), self.sigmas, rtol=1e-6)):
            raise ValueError(f"the checkpoint's {len(saved)} sigmas are not this schedule's {self.L} "
                             f"({self.sigma_1:.4g} -> {self.sigma_L:.4g})")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"L={self.L}, sigma {self.sigma_1:.4g} -> {self.sigma_L:.4g}, gamma={self.gamma:.4f}, T={self.T}, "
                f"eps={self.eps:.3g}")


def max_pairwise_distance(images: torch.Tensor, n_sub: int = 2000, seed: int = 0) -> float:
    """Largest Euclidean distance between two of `n_sub` random training images (NCSNv2 Technique 1's sigma_1).

    Images are uint8 (scaled to [0, 1]) or floats in [0, 1], any shape (N, ...). A subsample gives a lower bound of
    the true maximum; at 2000 images of CIFAR-10 it is within a few percent and takes seconds on a CPU.
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    x = x.flatten(1)
    if len(x) > n_sub:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_sub].to(x.device)]
    best = torch.zeros((), device=x.device)
    for chunk in x.split(512):  # bounds the distance matrix to 512 x n_sub
        best = torch.maximum(best, torch.cdist(chunk, x).max())
    return best.item()


def content_key(images: torch.Tensor) -> str:
    """A name for a tensor's contents: its shape, dtype and a BLAKE2 digest of its bytes (a CIFAR-10 training set in
    a fraction of a second)."""
    x = images.detach().cpu().contiguous()
    digest = hashlib.blake2b(x.flatten().view(torch.uint8).numpy(), digest_size=16).hexdigest()
    return f"{'x'.join(map(str, x.shape))}:{str(x.dtype).removeprefix('torch.')}:{digest}"


def cached_max_pairwise_distance(images: torch.Tensor, n_sub: int = 2000, cache_dir: str | Path | None = None) -> float:
    """`max_pairwise_distance`, remembered in CACHE_DIR/sigma_1.json under the images' content and the subsample size.

    Computed under a file lock, so drivers that start at once compute it once and never overwrite each other's
    entries."""
    from genmodels.data import default_data_dir

    path = (Path(cache_dir) if cache_dir else default_data_dir()) / "sigma_1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"{content_key(images)}:{n_sub}"
    with FileLock(path.with_name(path.name + ".lock")):
        cache = json.loads(path.read_text()) if path.exists() else {}
        if key not in cache:
            cache[key] = max_pairwise_distance(images, n_sub)
            write_text_atomic(path, json.dumps(cache, indent=1, sort_keys=True))
    return float(cache[key])
