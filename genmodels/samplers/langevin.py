"""Annealed Langevin dynamics, NCSN Algorithm 1 (Song & Ermon 2019)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from genmodels.cuda_graph import GraphedStep
from genmodels.samplers.sigmas import NoiseSchedule

# score_fn(x, levels) -> score at x, where levels holds one noise-level index per example
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def annealed_langevin(score_fn: ScoreFn, schedule: NoiseSchedule, shape: Sequence[int], T: int | None = None,
                      init: str = "uniform", denoise: bool = False, generator: torch.Generator | None = None,
                      progress: bool = False, graphed: bool = False) -> torch.Tensor:
    """Run `shape[0]` chains through every level of `schedule` (largest sigma first) and return the last states.

    Level i takes T steps (default: the schedule's) x <- x + alpha_i/2 * s(x, sigma_i) + sqrt(alpha_i) * z with the
    schedule's alpha_i for T steps. Chains start from U[0, 1] ("uniform", the paper's) or from N(0.5, sigma_1^2 I)
    ("gaussian": p_sigma_1 is close to a Gaussian of that scale around the data, whose mean for [0, 1] images is
    near 0.5). `denoise` adds NCSNv2's final step x + sigma_L^2 * s(x, sigma_L), the posterior mean E[x_0 | x] by
    Tweedie's formula. Chains live on the schedule's device; randomness comes from `generator` (the global RNG if
    None). `graphed` (CUDA, global RNG only) replays each step as a CUDA graph: the same draws and the same
    arithmetic.
    """
    T = T or schedule.T
    device = schedule.sigmas.device
    if init == "uniform":
        x = torch.rand(*shape, generator=generator, device=device)
    elif init == "gaussian":
        x = 0.5 + schedule.sigma_1 * torch.randn(*shape, generator=generator, device=device)
    else:
        raise ValueError(f"unknown init {init!r}; choose uniform or gaussian")
    bar = _progress_bar(schedule.L * T, progress)
    # The step reads its level and step sizes from tensors that are refilled per level, so one CUDA graph (where
    # asked for) serves every level: ~1 launch per step instead of the score network's hundreds.
    levels = torch.zeros(shape[0], dtype=torch.long, device=device)
    half_alpha, noise_scale = torch.zeros((), device=device), torch.zeros((), device=device)

    kind = device.type
    # A caller's autocast (bf16 sampling) without its cast cache: see genmodels.cuda_graph.
    autocast = torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), enabled=torch.is_autocast_enabled(kind),
                              cache_enabled=False)

    def step(x: torch.Tensor) -> torch.Tensor:
        z = torch.randn(*shape, generator=generator, device=device)
        with autocast:
            score = score_fn(x, levels)
        return x + (half_alpha * score + noise_scale * z)

    if graphed and generator is None and kind == "cuda":
        step = GraphedStep(step, warmup=2, name="Langevin step", off_switch="train.cuda_graphs=false")
    for i, alpha in enumerate(schedule.alphas(T)):
        levels.fill_(i)
        half_alpha.fill_(alpha / 2)
        noise_scale.fill_(math.sqrt(alpha))
        for _ in range(T):
            x = step(x)
            if bar:
                bar.update()
    if bar:
        bar.close()
    if denoise:
        levels.fill_(schedule.L - 1)
        x = x + schedule.sigma_L ** 2 * score_fn(x, levels)
    return x.clone() if isinstance(step, GraphedStep) else x  # a graph's output is overwritten by its next use


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import (
        tqdm,  # imported only when asked for: trials run without a terminal
    )

    return tqdm(total=total, desc="langevin", unit="step", leave=False)
