"""Annealed Langevin dynamics, NCSN Algorithm 1 (Song & Ermon 2019)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

# score_fn(x, levels) -> score at x, where levels holds one noise-level index per example
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def annealed_langevin(score_fn: ScoreFn, sigmas: Sequence[float], shape: Sequence[int], steps_per_level: int,
                      eps: float, init: str = "uniform", denoise: bool = False,
                      generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                      progress: bool = False) -> torch.Tensor:
    """Run `shape[0]` chains through every level of `sigmas` (largest first) and return the last states.

    Level i takes `steps_per_level` steps x <- x + alpha_i/2 * s(x, sigma_i) + sqrt(alpha_i) * z with
    alpha_i = eps * sigma_i^2 / sigma_L^2. Chains start from U[0, 1] ("uniform", the paper's) or from
    N(0.5, sigma_1^2 I) ("gaussian": p_sigma_1 is close to a Gaussian of that scale around the data, whose mean
    for [0, 1] images is near 0.5). `denoise` adds NCSNv2's final step x + sigma_L^2 * s(x, sigma_L), the
    posterior mean E[x_0 | x] by Tweedie's formula. Randomness comes from `generator` (the global RNG if None).
    """
    sigmas = [float(s) for s in sigmas]
    if init == "uniform":
        x = torch.rand(*shape, generator=generator, device=device)
    elif init == "gaussian":
        x = 0.5 + sigmas[0] * torch.randn(*shape, generator=generator, device=device)
    else:
        raise ValueError(f"unknown init {init!r}; choose uniform or gaussian")
    bar = _progress_bar(len(sigmas) * steps_per_level, progress)
    for i, sigma in enumerate(sigmas):
        levels = torch.full((shape[0],), i, dtype=torch.long, device=device)
        alpha = eps * sigma ** 2 / sigmas[-1] ** 2
        for _ in range(steps_per_level):
            z = torch.randn(*shape, generator=generator, device=device)
            x = x + (alpha / 2) * score_fn(x, levels) + math.sqrt(alpha) * z
            if bar:
                bar.update()
    if bar:
        bar.close()
    if denoise:
        levels = torch.full((shape[0],), len(sigmas) - 1, dtype=torch.long, device=device)
        x = x + sigmas[-1] ** 2 * score_fn(x, levels)
    return x


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import (
        tqdm,  # imported only when asked for: trials run without a terminal
    )

    return tqdm(total=total, desc="langevin", unit="step", leave=False)
