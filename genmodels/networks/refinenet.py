"""RefineNet score network of NCSN (Song & Ermon 2019), conditioned on the noise-level index by CondInstanceNorm++."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        # gamma * (norm(x) + alpha * standardised means) + beta is one scale and shift per example and channel: a
        # single multiply-add over x in its own layout (F.instance_norm would copy channels_last to NCHW), with
        # the statistics in fp32 and one reduction giving both the instance norm's and the "++" term's means.
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(2, 3), unbiased=False, keepdim=True)  # (N, C, 1, 1)
        means = mean.flatten(1)
        m, v = means.mean(dim=1, keepdim=True), means.var(dim=1, keepdim=True)
        gamma, alpha, beta = (t[:, :, None, None] for t in self.embed(levels).float().chunk(3, dim=1))
        rstd = torch.rsqrt(var + 1e-5)
        shift = gamma * (alpha * ((means - m) / torch.sqrt(v + 1e-5))[:, :, None, None] - mean * rstd) + beta
        return torch.addcmul(shift, xf, gamma * rstd).to(x.dtype)


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
