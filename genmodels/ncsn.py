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
  training set, so the sweep driver computes it with genmodels.sigmas.cached_max_pairwise_distance and puts it in
  the config); the ratio from the NCSNv2 rule for D = C*32*32 and L from sigma_1, sigma_L and the ratio. `sigma_1`,
  `num_levels` and `gamma` are not used.
The sigmas are a buffer, so they travel with every checkpoint.

Sampling: annealed Langevin (genmodels.langevin) with T = `langevin_steps` and eps = `langevin_eps` in NCSN's step
convention, in which NCSNv2's eps is doubled (its CIFAR-10 6.2e-6 is 1.24e-5 here); langevin_eps = 0 takes the
NCSNv2 criterion's eps for T and the schedule. `sample(n, steps_per_level=k)` runs k < T steps per level (the FID
ladder's cheap rungs) with a larger step, see `NCSN.step_size`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from genmodels import sigmas as schedules
from genmodels.base import GenerativeModel, ModelConfig
from genmodels.data import to_unit
from genmodels.langevin import annealed_langevin
from genmodels.vae import norm_layer

ARCHS = ("unet", "refinenet")
DATA_STD = 0.25  # rough per-pixel std of [0, 1] natural images; sets the unet's input scaling at small sigma


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
                             "distance (genmodels.sigmas.cached_max_pairwise_distance); the sweep driver sets it")
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


# ---------------------------------------------------------------------------------------------------- U-Net

class LogSigmaEmbedding(nn.Module):
    """Sinusoids of log(sigma) at fixed frequencies 0.05 ... 50 rad per unit of log sigma.

    A function of log sigma, so levels a ratio gamma apart are exactly as far apart at sigma = 50 as at 0.01. The
    lowest frequency keeps the whole range 1e-3 ... 1e2 on one unwrapped arc; the highest turns 1.9 rad between
    NCSNv2's neighbouring levels (log 1/0.963 = 0.038).
    """

    def __init__(self, dim: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(math.log10(0.05), math.log10(50.0), dim // 2),
                             persistent=False)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        phase = sigma.float().log()[:, None] * self.freqs
        return torch.cat([phase.sin(), phase.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the noise embedding added in between; the residual branch starts at zero."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = norm_layer("group", c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = norm_layer("group", c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # F.silu out of place: the skip must see x itself (the seeds' in-place ReLU changed it, mistake 6)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """Residual U-Net over 32, 16, 8, 4 pixels with widths (1, 2, 2, 2) x width, `blocks` per resolution."""

    mults = (1, 2, 2, 2)

    def __init__(self, channels: int, width: int, blocks: int = 2):
        super().__init__()
        emb_dim = 4 * width
        self.embed = nn.Sequential(LogSigmaEmbedding(32), nn.Linear(32, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [width], width
        for i, m in enumerate(self.mults):
            for _ in range(blocks):
                self.down.append(ResBlock(c, width * m, emb_dim))
                c = width * m
                skips.append(c)
            if i < len(self.mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.middle = nn.ModuleList([ResBlock(c, c, emb_dim), ResBlock(c, c, emb_dim)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(self.mults))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), width * m, emb_dim))
                c = width * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.out = nn.Sequential(norm_layer("group", c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, levels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        del levels  # conditioned on sigma itself
        emb = self.embed(sigma)
        # x = data + sigma z: centre and scale so the input has about unit variance at every sigma (1e-2 ... 50)
        h = (x - 0.5) / torch.sqrt(sigma ** 2 + DATA_STD ** 2).view(-1, 1, 1, 1)
        hs = [self.stem(h)]
        h = hs[0]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)


# ------------------------------------------------------------------------------------------------ RefineNet
# After CondRefineNetDilated of the NCSN code release (ermongroup/ncsn): ELU, CondInstanceNorm++ everywhere,
# four residual stages (32, 16, 16 dilated 2, 16 dilated 4 pixels) and four RefineNet blocks back up.

class CondInstanceNormPlus(nn.Module):
    """Conditional instance norm++: instance norm, plus the channel means it removes (normalised across channels)
    added back with a learned weight, each of gamma, alpha, beta looked up per noise level."""

    def __init__(self, channels: int, num_levels: int):
        super().__init__()
        self.channels = channels
        self.embed = nn.Embedding(num_levels, 3 * channels)
        nn.init.normal_(self.embed.weight[:, :2 * channels], 1.0, 0.02)
        nn.init.zeros_(self.embed.weight[:, 2 * channels:])

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        means = x.mean(dim=(2, 3))
        m, v = means.mean(dim=1, keepdim=True), means.var(dim=1, keepdim=True)
        means = (means - m) / torch.sqrt(v + 1e-5)
        h = F.instance_norm(x, eps=1e-5)
        gamma, alpha, beta = self.embed(levels).chunk(3, dim=1)
        h = h + means[:, :, None, None] * alpha[:, :, None, None]
        return gamma[:, :, None, None] * h + beta[:, :, None, None]


def _conv3x3(c_in: int, c_out: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)


class CondResBlock(nn.Module):
    """norm-ELU-conv twice; `down` halves the resolution by mean pooling, unless dilated (then it keeps it)."""

    def __init__(self, c_in: int, c_out: int, num_levels: int, down: bool = False, dilation: int = 1):
        super().__init__()
        self.pool = down and dilation == 1
        self.norm1 = CondInstanceNormPlus(c_in, num_levels)
        mid = c_in if down else c_out
        self.conv1 = _conv3x3(c_in, mid, dilation)
        self.norm2 = CondInstanceNormPlus(mid, num_levels)
        self.conv2 = _conv3x3(mid, c_out, dilation)
        if c_in != c_out or down:
            self.shortcut = nn.Conv2d(c_in, c_out, 1) if self.pool else _conv3x3(c_in, c_out, dilation)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.elu(self.norm1(x, levels)))
        h = self.conv2(F.elu(self.norm2(h, levels)))
        skip = self.shortcut(x)
        if self.pool:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return skip + h


class CondRCU(nn.Module):
    """Residual conv units: `blocks` x (residual of `stages` x norm-ELU-conv)."""

    def __init__(self, channels: int, num_levels: int, blocks: int, stages: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList(nn.ModuleList([CondInstanceNormPlus(channels, num_levels),
                                                                 _conv3x3(channels, channels, bias=False)])
                                                  for _ in range(stages)) for _ in range(blocks))

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = x
            for norm, conv in block:
                h = conv(F.elu(norm(h, levels)))
            x = x + h
        return x


class CondMSF(nn.Module):
    """Multi-resolution fusion: norm and conv each input, resize to the finest, sum."""

    def __init__(self, in_channels: list[int], channels: int, num_levels: int):
        super().__init__()
        self.norms = nn.ModuleList(CondInstanceNormPlus(c, num_levels) for c in in_channels)
        self.convs = nn.ModuleList(_conv3x3(c, channels) for c in in_channels)

    def forward(self, xs: list[torch.Tensor], levels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = 0
        for x, norm, conv in zip(xs, self.norms, self.convs):
            h = conv(norm(x, levels))
            if h.shape[-2:] != size:
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
            out = out + h
        return out


class CondCRP(nn.Module):
    """Chained residual pooling: a chain of norm-avgpool(5x5)-conv, each stage's output added to the input."""

    def __init__(self, channels: int, num_levels: int, stages: int = 2):
        super().__init__()
        self.norms = nn.ModuleList(CondInstanceNormPlus(channels, num_levels) for _ in range(stages))
        self.convs = nn.ModuleList(_conv3x3(channels, channels, bias=False) for _ in range(stages))

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        x = F.elu(x)
        path = x
        for norm, conv in zip(self.norms, self.convs):
            path = conv(F.avg_pool2d(norm(path, levels), 5, stride=1, padding=2))
            x = x + path
        return x


class CondRefineBlock(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, num_levels: int, end: bool = False):
        super().__init__()
        self.adapt = nn.ModuleList(CondRCU(c, num_levels, blocks=2) for c in in_channels)
        self.fuse = CondMSF(in_channels, channels, num_levels) if len(in_channels) > 1 else None
        self.crp = CondCRP(channels, num_levels)
        self.out = CondRCU(channels, num_levels, blocks=3 if end else 1)

    def forward(self, xs: list[torch.Tensor], levels: torch.Tensor) -> torch.Tensor:
        hs = [adapt(x, levels) for adapt, x in zip(self.adapt, xs)]
        h = self.fuse(hs, levels, hs[0].shape[-2:]) if self.fuse else hs[0]
        return self.out(self.crp(h, levels), levels)


class RefineNet(nn.Module):
    """The NCSN RefineNet, conditioned on the noise-level index; width 128 is the paper's CIFAR-10 network."""

    def __init__(self, channels: int, width: int, num_levels: int):
        super().__init__()
        w, L = width, num_levels
        self.begin = _conv3x3(channels, w)
        self.res = nn.ModuleList([
            nn.ModuleList([CondResBlock(w, w, L), CondResBlock(w, w, L)]),
            nn.ModuleList([CondResBlock(w, 2 * w, L, down=True), CondResBlock(2 * w, 2 * w, L)]),
            nn.ModuleList([CondResBlock(2 * w, 2 * w, L, down=True, dilation=2),
                           CondResBlock(2 * w, 2 * w, L, dilation=2)]),
            nn.ModuleList([CondResBlock(2 * w, 2 * w, L, down=True, dilation=4),
                           CondResBlock(2 * w, 2 * w, L, dilation=4)]),
        ])
        self.refine = nn.ModuleList([
            CondRefineBlock([2 * w], 2 * w, L),
            CondRefineBlock([2 * w, 2 * w], 2 * w, L),
            CondRefineBlock([2 * w, 2 * w], w, L),
            CondRefineBlock([w, w], w, L, end=True),
        ])
        self.norm = CondInstanceNormPlus(w, L)
        self.end = _conv3x3(w, channels)

    def forward(self, x: torch.Tensor, levels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        del sigma  # conditioned on the level index
        h = self.begin(2 * x - 1)
        features = []
        for stage in self.res:
            for block in stage:
                h = block(h, levels)
            features.append(h)
        h = self.refine[0]([features[3]], levels)
        for block, skip in zip(self.refine[1:], reversed(features[:3])):
            h = block([skip, h], levels)
        return self.end(F.elu(self.norm(h, levels)))


# -------------------------------------------------------------------------------------------------- model

class NCSN(GenerativeModel):
    Config = NCSNConfig

    @classmethod
    def prepare(cls, params: dict[str, Any], train_images: torch.Tensor | None = None) -> dict[str, Any]:
        """NCSNv2's sigma_1 from the training data, computed (and cached on disk) once by the driver for all trials."""
        if float(params.get("data_sigma_1", 0) or 0) > 0 or train_images is None:
            return {}
        dataset = str(params.get("dataset", "data"))
        return {"data_sigma_1": schedules.cached_max_pairwise_distance(dataset, train_images)}

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

        With fewer steps than T (the FID ladder's cheap rungs) eps grows by T / steps, so each level's chain still
        covers the same Langevin time T * alpha_i, but at most up to the NCSNv2 criterion's eps for that many
        steps (or the configured eps, if larger): beyond it a bigger step only adds discretisation error.
        """
        T = self.cfg.langevin_steps
        eps = self.cfg.langevin_eps if self.cfg.langevin_eps > 0 else self.criterion_step_size(T)
        if steps_per_level is None or steps_per_level >= T:
            return eps
        return min(eps * T / steps_per_level, max(eps, self.criterion_step_size(steps_per_level)))

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
                "langevin_eps": self.step_size()}

    @torch.no_grad()
    def sample(self, n: int, steps_per_level: int | None = None, progress: bool = False,
               batch_size: int | None = None) -> torch.Tensor:
        """n images in [0, 1] by annealed Langevin from the global RNG; `steps_per_level` overrides T.

        Chains run `batch_size` at a time: by default 1000 on a GPU, 128 on a CPU (where larger batches fall
        out of the cache and run slower per image).
        """
        T = steps_per_level or self.cfg.langevin_steps
        eps = self.step_size(steps_per_level)
        batch_size = batch_size or (1000 if self.sigmas.is_cuda else 128)
        chunks = [annealed_langevin(self.score, self.sigmas.tolist(), (m, self.channels, 32, 32), T, eps,
                                    init=self.cfg.init, denoise=self.cfg.denoise, device=self.sigmas.device,
                                    progress=progress)
                  for m in _chunk_sizes(n, batch_size)]
        return torch.cat(chunks).clamp(0, 1)


def _chunk_sizes(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]
