"""NCSN: noise-conditional score networks trained by denoising score matching, sampled by annealed Langevin.

Song & Ermon 2019 (NCSN) with the NCSNv2 techniques (Song & Ermon 2020) as options. Two score networks:
- `unet`: the seed's U-Net made sound: residual blocks, GroupNorm, SiLU, noise conditioning on log(sigma) (the seed
  embedded raw sigma with random Fourier features of scale 30, so neighbouring large sigmas got unrelated
  embeddings while small ones were indistinguishable), inputs scaled to unit variance at every sigma.
- `refinenet`: the NCSN paper's RefineNet with conditional instance normalisation++ on the noise-level index.
Both divide their output by sigma (NCSNv2 Technique 3): the true score of p_sigma has norm ~ sqrt(D) / sigma.

Sigma schedules (`sigma_schedule`):
- `geometric`: sigma_1 -> sigma_L in `num_levels` levels, or, with num_levels = 0, in as many as the ratio `gamma`
  = sigma_(i+1)/sigma_i asks for.
- `ncsnv2`: sigma_1 = `data_sigma_1`, the training data's maximum pairwise distance (the model never sees the
  training set, so `prepare` computes it once, with genmodels.samplers.sigmas.cached_max_pairwise_distance, into
  the config); the ratio from the NCSNv2 rule for D = C*32*32 and L from sigma_1, sigma_L and the ratio. `sigma_1`,
  `num_levels` and `gamma` are not used.
The sigmas are a buffer, so they travel with every checkpoint.

Sampling: annealed Langevin (genmodels.samplers.langevin) with T = `langevin_steps` and eps = `langevin_eps` in
NCSN's step convention, in which NCSNv2's eps is doubled (its CIFAR-10 6.2e-6 is 1.24e-5 here); langevin_eps = 0
takes the NCSNv2 criterion's eps for T and the schedule. `sample(n, budget=b)` runs a share b < 1 of T steps per
level (the FID ladder's cheap rungs) with a larger step, see `NCSN.step_size`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import torch

from genmodels.config import ModelConfig
from genmodels.data import to_unit
from genmodels.models.base import GenerativeModel
from genmodels.networks.refinenet import RefineNet
from genmodels.networks.unet import UNet

if TYPE_CHECKING:
    from genmodels.config import TrialConfig
from genmodels.samplers import sigmas as schedules
from genmodels.samplers.langevin import annealed_langevin

ARCHS = ("unet", "refinenet")
MAX_CHAINS = 8192  # most chains per batch: a final fid_10k in two
SAMPLING_MEMORY_SHARE = 0.25  # of the GPU's free memory that one sampling batch may plan to use


@dataclasses.dataclass
class NCSNConfig(ModelConfig):
    arch: str = "unet"  # unet | refinenet
    width: int = 128  # channels at 32x32; deeper stages use 2x
    unet_blocks: int = 2  # unet: residual blocks per resolution (the refinenet's depth is the paper's)
    sigma_schedule: str = "geometric"  # geometric | ncsnv2
    sigma_1: float = 1.0  # geometric only
    sigma_L: float = 0.01
    num_levels: int = 10  # geometric: L; 0 = derive L from gamma
    gamma: float = 0.0  # geometric with num_levels = 0: ratio sigma_(i+1)/sigma_i in (0, 1)
    data_sigma_1: float = 0.0  # ncsnv2: max pairwise distance of the training images, filled by the sweep driver
    langevin_steps: int = 100  # T, steps per noise level
    langevin_eps: float = 2e-5  # step constant of NCSN Algorithm 1; 0 = the NCSNv2 criterion for T
    denoise: bool = True  # final step x + sigma_L^2 s(x, sigma_L)
    init: str = "uniform"  # uniform | gaussian: where Langevin chains start
    sampling_precision: str = "fp32"  # fp32 | bf16: the score network's autocast while sampling (bench sampling)
    choices: ClassVar = {"arch": ARCHS, "sigma_schedule": ("geometric", "ncsnv2"), "init": ("uniform", "gaussian"),
                         "sampling_precision": ("fp32", "bf16")}
    ranges: ClassVar = {"width": (1, None), "unet_blocks": (1, None), "sigma_1": (0, None), "sigma_L": (0, None),
                        "num_levels": (0, None), "gamma": (0, 1), "data_sigma_1": (0, None),
                        "langevin_steps": (1, None), "langevin_eps": (0, None)}
    open_low: ClassVar = ("sigma_1", "sigma_L")


def make_sigmas(cfg: NCSNConfig, dims: int) -> list[float]:
    """The config's noise levels, largest first."""
    if cfg.sigma_schedule == "geometric":
        if cfg.num_levels > 0:
            return schedules.geometric(cfg.sigma_1, cfg.sigma_L, cfg.num_levels)
        if cfg.gamma > 0:
            return schedules.geometric(cfg.sigma_1, cfg.sigma_L,
                                       schedules.levels_for_ratio(cfg.sigma_1, cfg.sigma_L, cfg.gamma))
        raise ValueError("the geometric schedule needs num_levels > 0 or a ratio 0 < gamma < 1")
    if cfg.sigma_schedule == "ncsnv2":
        if cfg.data_sigma_1 <= 0:
            raise ValueError("sigma_schedule=ncsnv2 needs data_sigma_1, the training images' maximum pairwise "
                             "distance; NCSN.prepare sets it from the training data")
        return schedules.ncsnv2(cfg.data_sigma_1, cfg.sigma_L, dims)
    raise ValueError(f"unknown sigma_schedule {cfg.sigma_schedule!r}; choose geometric or ncsnv2")


def dsm_loss(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             sigmas: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score matching with lambda(sigma) = sigma^2, one level drawn uniformly per example.

    With x~ = x + sigma z, the target score is -z / sigma, so lambda * 1/2 ||s(x~) + z/sigma||^2 =
    1/2 ||sigma s(x~) + z||^2: the same scale at every level. Returns it per example, summed over dimensions
    (the papers' convention).
    """
    levels = torch.randint(len(sigmas), (len(x),), device=x.device, generator=generator)
    sigma = sigmas[levels].view(-1, *[1] * (x.ndim - 1))
    z = torch.randn(x.shape, device=x.device, generator=generator)
    s = score_fn(x + sigma * z, levels).float()
    return 0.5 * (sigma * s + z).pow(2).flatten(1).sum(1)


# -------------------------------------------------------------------------------------------------- model

class NCSN(GenerativeModel):
    Config = NCSNConfig

    @classmethod
    def prepare(cls, cfg: TrialConfig, train_images: torch.Tensor | None = None) -> dict[str, Any]:
        """NCSNv2's sigma_1 from the training data, computed (and cached on disk) once for all trials."""
        if cfg.model.data_sigma_1 > 0 or train_images is None:
            return {}
        return {"data_sigma_1": schedules.cached_max_pairwise_distance(cfg.data.dataset, train_images)}

    def __init__(self, cfg: NCSNConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.init not in ("uniform", "gaussian"):
            raise ValueError(f"unknown init {cfg.init!r}; choose uniform or gaussian")
        self.dims = channels * 32 * 32
        sigmas = make_sigmas(cfg, self.dims)
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float32))
        if cfg.arch == "unet":
            self.net = UNet(channels, cfg.width, cfg.unet_blocks)
        elif cfg.arch == "refinenet":
            self.net = RefineNet(channels, cfg.width, len(sigmas))
        else:
            raise ValueError(f"unknown NCSN arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")

    @property
    def gamma(self) -> float:
        """The schedule's ratio sigma_(i+1)/sigma_i."""
        return schedules.ratio(self.sigmas.tolist())

    def score(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """s(x, sigma_levels), the score of the data perturbed at each example's noise level."""
        sigma = self.sigmas[levels]
        return self.net(x, levels, sigma).float() / sigma.view(-1, 1, 1, 1)

    def step_size(self, steps_per_level: int | None = None) -> float:
        """The step constant eps for `steps_per_level` Langevin steps (default: the config's T).

        With fewer steps than T (the FID ladder's cheap rungs) eps grows by the factor min(T / steps, c(steps) /
        c(T)), where c(n) is the NCSNv2 criterion's eps for n steps: each level's chain covers as much of the same
        Langevin time T * alpha_i as the criterion allows for that few steps (a bigger step only adds
        discretisation error). The factor is the same for every trial with the same schedule and T, so trials keep
        the order of their own eps: a searched eps changes every rung's samples, not only the last rung's.
        """
        T = self.cfg.langevin_steps
        eps = self.cfg.langevin_eps if self.cfg.langevin_eps > 0 else self.criterion_step_size(T)
        if steps_per_level is None or steps_per_level >= T:
            return eps
        return eps * min(T / steps_per_level, self.criterion_step_size(steps_per_level) / self.criterion_step_size(T))

    def criterion_step_size(self, steps_per_level: int) -> float:
        return schedules.ncsnv2_step_size(steps_per_level, self.sigmas[-1].item(), self.gamma)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dsm_loss(self.score, to_unit(x), self.sigmas).mean(), {}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        # a fixed generator: the same levels and noise at every evaluation, so epochs compare
        generator = torch.Generator(device=self.sigmas.device).manual_seed(0)
        total, n = 0.0, 0
        for x in batches:
            total += dsm_loss(self.score, to_unit(x), self.sigmas, generator).sum().item()
            n += len(x)
        return {"test_dsm_loss": total / max(n, 1), "sigma_1": self.sigmas[0].item(),
                "sigma_L": self.sigmas[-1].item(), "num_levels": len(self.sigmas), "gamma": self.gamma,
                "langevin_eps": self.step_size(),
                "langevin_steps": self.cfg.langevin_steps}

    @torch.no_grad()
    def sample(self, n: int, budget: float = 1.0, steps_per_level: int | None = None, progress: bool = False,
               batch_size: int | None = None, graphed: bool | None = None) -> torch.Tensor:
        """n images in [0, 1] by annealed Langevin from the global RNG; `steps_per_level` overrides T, and a
        `budget` below 1 runs that share of T (at least one step per level, with the larger step of `step_size`).

        Chains run `batch_size` at a time: by default as many as `chains_that_fit` on a GPU (thousands), where
        each Langevin step is a replayed CUDA graph; 128 on a CPU (where larger batches fall out of the cache and
        run slower per image). `graphed=False` samples eagerly on a GPU too. `sampling_precision` bf16 runs the
        score network under bf16 autocast.
        """
        if steps_per_level is None and budget < 1:
            steps_per_level = max(1, round(self.cfg.langevin_steps * budget))
        T = steps_per_level or self.cfg.langevin_steps
        eps = self.step_size(steps_per_level)
        batch_size = batch_size or self.sampling_batch()
        device = self.sigmas.device
        graphed = device.type == "cuda" if graphed is None else graphed
        # bf16 for the score network only: the chains, their noise and step sizes stay fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.sampling_precision == "bf16"):
            chunks = [annealed_langevin(self.score, self.sigmas.tolist(), (m, self.channels, 32, 32), T, eps,
                                        init=self.cfg.init, denoise=self.cfg.denoise, device=device,
                                        progress=progress, graphed=graphed)
                      for m in _chunk_sizes(n, batch_size)]
        return torch.cat(chunks).clamp(0, 1)

    def sampling_batch(self) -> int:
        return self.chains_that_fit() if self.sigmas.is_cuda else 128

    @torch.no_grad()
    def chains_that_fit(self, probe: int = 32) -> int:
        """Langevin chains per batch on this GPU: SAMPLING_MEMORY_SHARE of its free memory over twice the memory
        one chain's score evaluation holds at its peak (from a probe batch), rounded down to a power of two within
        [128, MAX_CHAINS]. A share, not all of it: packed trials sample beside each other's training. A power of
        two, so that trials whose free memory differs a little sample in the same batches, from the same noise."""
        device = self.sigmas.device
        base = peak = torch.cuda.memory_allocated(device)

        def record(*_) -> None:  # the allocator's counter, read on the host at each module's end: no sync
            nonlocal peak
            peak = max(peak, torch.cuda.memory_allocated(device))

        handles = [m.register_forward_hook(record) for m in self.modules()]
        try:
            self.score(torch.rand(probe, self.channels, 32, 32, device=device),
                       torch.zeros(probe, dtype=torch.long, device=device))
        finally:
            for handle in handles:
                handle.remove()
        per_chain = 2 * max(peak - base, 1) / probe
        free, _ = torch.cuda.mem_get_info(device)
        fit = int(min(MAX_CHAINS, max(128, SAMPLING_MEMORY_SHARE * free // per_chain)))
        return 1 << (fit.bit_length() - 1)


def _chunk_sizes(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]
