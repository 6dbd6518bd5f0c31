"""U-Net score network conditioned on log(sigma): residual blocks, GroupNorm, SiLU, unit-variance inputs at every
sigma."""
from __future__ import annotations

import math

import torch
from torch import nn

from genmodels.networks.convnets import GroupNormSiLU, group_count, norm_layer

DATA_STD = 0.25  # rough per-pixel std of [0, 1] natural images; sets the unet's input scaling at small sigma
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


class NoiseResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the noise embedding added in between; the residual branch starts at zero.
    The norms are GroupNormSiLU: no layout copies around them in channels_last."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = GroupNormSiLU(group_count(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = GroupNormSiLU(group_count(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # norm1 makes a new tensor: the skip sees x itself (the seeds' in-place ReLU changed it, mistake 6)
        h = self.conv1(self.norm1(x))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.norm2(h))
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
                self.down.append(NoiseResBlock(c, width * m, emb_dim))
                c = width * m
                skips.append(c)
            if i < len(self.mults) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.middle = nn.ModuleList([NoiseResBlock(c, c, emb_dim), NoiseResBlock(c, c, emb_dim)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(self.mults))):
            for _ in range(blocks + 1):
                self.up.append(NoiseResBlock(c + skips.pop(), width * m, emb_dim))
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
            h = layer(h, emb) if isinstance(layer, NoiseResBlock) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, NoiseResBlock) else layer(h)
        return self.out(h)
