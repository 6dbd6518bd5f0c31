"""NCSN: noise-conditional score networks trained by denoising score matching, sampled by annealed Langevin.

Song & Ermon 2019 (NCSN) with the NCSNv2 techniques (Song & Ermon 2020) as options. Two score networks:
- `unet`: the seed's U-Net made sound: residual blocks, GroupNorm, SiLU, noise conditioning on log(sigma) (the seed
  embedded raw sigma with random Fourier features of scale 30, so neighbouring large sigmas got unrelated
  embeddings while small ones were indistinguishable), inputs scaled to unit variance at every sigma.
- `refinenet`: the NCSN paper's RefineNet with conditional instance normalisation++ on the noise-level index.
Both divide their output by sigma (NCSNv2 Technique 3): the true score of p_sigma has norm ~ sqrt(D) / sigma.

Sigma schedules (`sigma_schedule`):
- `geometric`: sigma_1 -> sigma_L in `num_levels` levels, or, with num_levels None, in as many as the ratio `gamma`
  = sigma_(i+1)/sigma_i asks for.
- `ncsnv2`: sigma_1 = `data_sigma_1`, the training data's maximum pairwise distance (the model never sees the
  training set, so `prepare` computes it once, with genmodels.samplers.sigmas.cached_max_pairwise_distance, into
  the config); the ratio from the NCSNv2 rule for D = C*32*32 and L from sigma_1, sigma_L and the ratio. `sigma_1`,
  `num_levels` and `gamma` are not used.

Sampling: annealed Langevin (genmodels.samplers.langevin) with T = `langevin_steps` and eps = `langevin_eps` in
NCSN's step convention, in which NCSNv2's eps is doubled (its CIFAR-10 6.2e-6 is 1.24e-5 here); langevin_eps None
takes the NCSNv2 criterion's eps for T and the schedule. `sample(n, budget=b)` runs a share b < 1 of T steps per
level (the FID ladder's cheap rungs) with a larger step (NoiseSchedule.eps_for).

The model builds its NoiseSchedule (sigmas, gamma, the step sizes for every T up to langevin_steps) once, from the
config; the DSM loss and the sampler read everything from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import torch

from genmodels.config import ModelConfig
from genmodels.data import to_unit
from genmodels.models.base import GenerativeModel
from genmodels.networks.refinenet import RefineNet
from genmodels.networks.unet import UNet
from genmodels.samplers import sigmas as schedules
from genmodels.samplers.langevin import annealed_langevin
from genmodels.samplers.sigmas import NoiseSchedule

if TYPE_CHECKING:
    from genmodels.config import TrialConfig

ARCHS = ("unet", "refinenet")
MAX_CHAINS = 8192  # most chains per batch: a final fid_10k in two
CPU_CHAINS = 128  # chains per batch on a CPU
# Of the GPU's free memory that the sampling batches of the trials sharing it may plan to use together: a trial
# plans this times its GPU fraction (gpu_share), so trials packed on one GPU that sample at once fit side by side.
SAMPLING_MEMORY_SHARE = 0.25
# Settings for which older runs stored 0 as "not set" (state.pt's flat config, a sweep's constants and param space).
# 0 is a valid value of none of them, so NCSNConfig reads it as None: those runs load and mean what they meant.
ZERO_MEANT_NONE = ("num_levels", "gamma", "data_sigma_1", "langevin_eps")


@dataclasses.dataclass(frozen=True)
class NCSNConfig(ModelConfig):
    arch: str = "unet"  # unet | refinenet
    width: int = 128  # channels at 32x32; deeper stages use 2x
    unet_blocks: int = 2  # unet: residual blocks per resolution (the refinenet's depth is the paper's)
    sigma_schedule: str = "geometric"  # geometric | ncsnv2
    sigma_1: float = 1.0  # geometric only
    sigma_L: float = 0.01
    num_levels: int | None = 10  # geometric: L; None = as many as gamma asks for
    gamma: float | None = None  # geometric with num_levels None: the ratio sigma_(i+1)/sigma_i in (0, 1)
    data_sigma_1: float | None = None  # ncsnv2: the training images' max pairwise distance, set by NCSN.prepare
    langevin_steps: int = 100  # T, steps per noise level
    langevin_eps: float | None = 2e-5  # eps, the step constant of NCSN Algorithm 1; None = the NCSNv2 criterion's
    denoise: bool = True  # final step x + sigma_L^2 s(x, sigma_L)
    init: str = "uniform"  # uniform | gaussian: where Langevin chains start
    # bf16: the score network samples under bf16 autocast; fp32 adds no autocast of its own (a caller's applies)
    sampling_precision: str = "fp32"  # fp32 | bf16
    choices: ClassVar = {"arch": ARCHS, "sigma_schedule": ("geometric", "ncsnv2"), "init": ("uniform", "gaussian"),
                         "sampling_precision": ("fp32", "bf16")}
    # the ZERO_MEANT_NONE settings accept 0, read as None (__post_init__)
    ranges: ClassVar = {"width": (1, None), "unet_blocks": (1, None), "sigma_1": (0, None), "sigma_L": (0, None),
                        "num_levels": (0, None), "gamma": (0, 1), "data_sigma_1": (0, None),
                        "langevin_steps": (1, None), "langevin_eps": (0, None)}
    open_low: ClassVar = ("sigma_1", "sigma_L")

    def __post_init__(self) -> None:
        for name in ZERO_MEANT_NONE:
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)

    def unused(self) -> dict[str, str]:
        if self.sigma_schedule == "ncsnv2":  # sigma_1 from the data, L from NCSNv2's rule (noise_schedule)
            why = "sigma_schedule=ncsnv2 derives the levels from the data"
            return {"sigma_1": why, "num_levels": why, "gamma": why}
        if self.num_levels is not None:
            return {"gamma": "num_levels is set, so the geometric schedule does not use the ratio gamma"}
        return {}


def noise_schedule(cfg: NCSNConfig, dims: int) -> NoiseSchedule:
    """The config's noise levels, largest first, and Langevin step sizes, for data of `dims` dimensions."""
    if cfg.sigma_schedule == "geometric":
        L = cfg.num_levels
        if L is None:
            if cfg.gamma is None:
                raise ValueError("the geometric schedule needs num_levels, or num_levels none and a ratio gamma")
            L = schedules.levels_for_ratio(cfg.sigma_1, cfg.sigma_L, cfg.gamma)
        sigmas = schedules.geometric(cfg.sigma_1, cfg.sigma_L, L)
    elif cfg.sigma_schedule == "ncsnv2":
        if cfg.data_sigma_1 is None:
            raise ValueError("sigma_schedule=ncsnv2 needs data_sigma_1, the training images' maximum pairwise "
                             "distance; NCSN.prepare sets it from the training data")
        sigmas = schedules.ncsnv2(cfg.data_sigma_1, cfg.sigma_L, dims)
    else:
        raise ValueError(f"unknown sigma_schedule {cfg.sigma_schedule!r}; choose geometric or ncsnv2")
    return NoiseSchedule(sigmas, T=cfg.langevin_steps, eps=cfg.langevin_eps)


def dsm_loss(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score matching with lambda(sigma) = sigma^2, one of the schedule's levels drawn uniformly per
    example.

    With x~ = x + sigma z, the target score is -z / sigma, so lambda * 1/2 ||s(x~) + z/sigma||^2 =
    1/2 ||sigma s(x~) + z||^2: the same scale at every level. Returns it per example, summed over dimensions
    (the papers' convention).
    """
    levels = torch.randint(schedule.L, (len(x),), device=x.device, generator=generator)
    sigma = schedule.sigmas[levels].view(-1, *[1] * (x.ndim - 1))
    z = torch.randn(x.shape, device=x.device, generator=generator)
    s = score_fn(x + sigma * z, levels).float()
    return 0.5 * (sigma * s + z).pow(2).flatten(1).sum(1)


# -------------------------------------------------------------------------------------------------- model

class NCSN(GenerativeModel):
    Config = NCSNConfig

    @classmethod
    def prepare(cls, cfg: TrialConfig, train_images: torch.Tensor | None = None) -> dict[str, Any]:
        """NCSNv2's sigma_1 from the training data, computed (and cached on disk) once for all trials."""
        if cfg.model.sigma_schedule != "ncsnv2" or cfg.model.data_sigma_1 is not None or train_images is None:
            return {}
        return {"data_sigma_1": schedules.cached_max_pairwise_distance(train_images)}

    def __init__(self, cfg: NCSNConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.init not in ("uniform", "gaussian"):
            raise ValueError(f"unknown init {cfg.init!r}; choose uniform or gaussian")
        self.schedule = noise_schedule(cfg, channels * 32 * 32)
        if cfg.arch == "unet":
            self.net = UNet(channels, cfg.width, cfg.unet_blocks)
        elif cfg.arch == "refinenet":
            self.net = RefineNet(channels, cfg.width, self.schedule.L)
        else:
            raise ValueError(f"unknown NCSN arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
        self._plan: tuple[torch.device, int] | None = None  # sampling_batch's last plan: (device, chains per batch)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before NoiseSchedule kept the sigmas at the model's top level
        if prefix + "sigmas" in state_dict:
            state_dict[prefix + "schedule.sigmas"] = state_dict.pop(prefix + "sigmas")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def score(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """s(x, sigma_levels), the score of the data perturbed at each example's noise level."""
        sigma = self.schedule.sigmas[levels]
        return self.net(x, levels, sigma).float() / sigma.view(-1, 1, 1, 1)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dsm_loss(self.score, to_unit(x), self.schedule).mean(), {}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor], full: bool = True) -> dict[str, float]:
        # Already cheap (one score-network pass per image): the same metrics whatever `full` says.
        # a fixed generator: the same levels and noise at every evaluation, so epochs compare
        generator = torch.Generator(device=self.schedule.sigmas.device).manual_seed(0)
        total, n = 0, 0
        for x in batches:
            total = total + dsm_loss(self.score, to_unit(x), self.schedule, generator).sum().double()
            n += len(x)
        s = self.schedule  # the schedule this trial used, whatever settings it came from
        test_dsm_loss = float(total) / max(n, 1)  # one host read, after the last batch
        return {"test_dsm_loss": test_dsm_loss, "sigma_1": s.sigma_1, "sigma_L": s.sigma_L, "num_levels": s.L,
                "gamma": s.gamma, "langevin_eps": s.eps, "langevin_steps": s.T}

    @torch.no_grad()
    def sample(self, n: int, budget: float = 1.0, T: int | None = None, progress: bool = False,
               batch_size: int | None = None, graphed: bool | None = None) -> torch.Tensor:
        """n images in [0, 1] by annealed Langevin from the global RNG; `T` overrides the steps per level, and a
        `budget` below 1 runs that share of them (at least one step per level, with the larger step of
        NoiseSchedule.eps_for).

        Chains run `batch_size` at a time: by default the last `sampling_batch` plan (made now if there is none):
        as many as `chains_that_fit` on a GPU (thousands), where each Langevin step is a replayed CUDA graph; 128
        on a CPU (where larger batches fall out of the cache and run slower per image). `graphed=False` samples
        eagerly on a GPU too; by default a GPU replays graphs when the engine's train.cuda_graphs is on (opt-in).
        `sampling_precision` bf16 runs the score network under bf16 autocast; fp32 leaves the caller's autocast, if
        any, as it is (an autocast(enabled=False) here would switch a caller's bf16 off).
        """
        if T is None and budget < 1:
            T = self.steps_per_level(budget)
        device = self.schedule.sigmas.device
        if batch_size is None:  # sample_fid has just planned (one probe per FID run); a bare call plans once
            batch_size = self._plan[1] if self._plan and self._plan[0] == device else self.sampling_batch()
        graphed = device.type == "cuda" and self.cuda_graphs if graphed is None else graphed
        # bf16 for the score network only: the chains, their noise and step sizes stay fp32
        bf16 = self.cfg.sampling_precision == "bf16"
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            chunks = [annealed_langevin(self.score, self.schedule, (m, self.channels, 32, 32), T,
                                        init=self.cfg.init, denoise=self.cfg.denoise, progress=progress,
                                        graphed=graphed)
                      for m in _chunk_sizes(n, batch_size)]
        return torch.cat(chunks).clamp(0, 1)

    def steps_per_level(self, budget: float = 1.0) -> int:
        """Langevin steps per level at `budget`: the schedule's T, or that share of it (at least one)."""
        return self.schedule.T if budget >= 1 else max(1, round(self.schedule.T * budget))

    def score_passes(self, budget: float = 1.0) -> int:
        """Score-network passes a chain of `sample(n, budget)` takes: the steps at each of the L levels, and the
        denoising step. At full scale that is hundreds to thousands: the dry run's forecast counts them instead of
        running them all (sweeps/forecast.py)."""
        return self.schedule.L * self.steps_per_level(budget) + int(self.cfg.denoise)

    def sampling_batch(self) -> int:
        """Chains per batch, planned now: `chains_that_fit` on a GPU (a probe of its memory), CPU_CHAINS on a
        CPU. The plan is kept: `sample` without a batch size follows the last one, so an FID run (sample_fid asks
        here first, then samples) probes the GPU once, and every batch of the run is the size it planned."""
        device = self.schedule.sigmas.device
        self._plan = (device, self.chains_that_fit() if _plans_by_memory(device) else CPU_CHAINS)
        return self._plan[1]

    @torch.no_grad()
    def chains_that_fit(self, probe: int = 32) -> int:
        """Langevin chains per batch on this GPU: SAMPLING_MEMORY_SHARE of its free memory, times this trial's
        share of the GPU (gpu_share), over twice the memory one chain's score evaluation holds at its peak (from a
        probe batch), rounded down to a power of two within [128, MAX_CHAINS]. A share, not all of it: packed
        trials sample beside each other's training; times the trial's fraction, because the trials packed on one
        GPU that reach a milestone together each probe the same free memory (eight trials at 1/8 plan a quarter of
        it between them, not two times all of it). A power of two, so that trials whose free memory differs a
        little sample in the same batches, from the same noise."""
        device = self.schedule.sigmas.device
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
        fit = int(min(MAX_CHAINS, max(128, SAMPLING_MEMORY_SHARE * gpu_share() * free // per_chain)))
        return 1 << (fit.bit_length() - 1)


def _plans_by_memory(device: torch.device) -> bool:
    """Whether sampling batches on `device` are sized to its free memory (a GPU) or fixed (a CPU)."""
    return device.type == "cuda"


def gpu_share() -> float:
    """This process's share of its GPU: the GPU fraction Ray gave this trial's worker (0.125 when eight trials are
    packed per GPU, by --gpus-per-trial 0.125 or auto), 1 outside a Ray worker or with whole GPUs. Ray is read only
    where the process has already imported it (trial workers): genmodels itself never imports it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 1.0
    try:
        gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    except Exception:  # a driver, not a worker (Ray asserts it): nothing assigned, the GPU is its own
        return 1.0
    return min(1.0, float(gpus)) if gpus and gpus > 0 else 1.0


def _chunk_sizes(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]
