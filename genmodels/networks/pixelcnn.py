"""A small gated PixelCNN over a grid of discrete codes (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders"), used as the VQ-VAE prior.

Two stacks keep the model causal without the blind spot of masked 3x3 convolutions: the vertical stack at (i, j)
sees only rows above i (all columns within its receptive field), the horizontal stack at (i, j) sees the columns
left of j in row i plus the vertical stack at (i, j). Causality comes from padding and one shift at the input
(PixelCNN++ style) rather than weight masks: every conv after the first layer covers rows <= i (vertical) or
columns <= j (horizontal) of features that are already strictly causal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL = 5  # each layer adds two rows and two columns of context: 4 layers see the whole 8x8 grid


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row down by one (row 0 becomes zeros), so position (i, j) holds row i - 1."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column right by one, so position (i, j) holds column j - 1."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks: v <- gate(conv_v(v)); h <- h + 1x1(gate(conv_h(h) + 1x1(conv_v(v))))."""

    def __init__(self, dim: int, k: int = KERNEL):
        super().__init__()
        self.r = k // 2
        self.vertical = nn.Conv2d(dim, 2 * dim, (self.r + 1, k))  # rows i-r..i, columns j-r..j+r
        self.horizontal = nn.Conv2d(dim, 2 * dim, (1, self.r + 1))  # row i, columns j-r..j
        self.vertical_to_horizontal = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.horizontal_out = nn.Conv2d(dim, dim, 1)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.r
        v_features = self.vertical(F.pad(v, (r, r, r, 0)))
        h_features = self.horizontal(F.pad(h, (r, 0, 0, 0))) + self.vertical_to_horizontal(v_features)
        return gate(v_features), h + self.horizontal_out(gate(h_features))


class GatedPixelCNN(nn.Module):
    """Autoregressive model p(c) = prod_i p(c_i | c_<i) over (H, W) grids of integers in [0, num_codes), raster
    order; `forward` returns (N, num_codes, H, W) logits where position i depends only on codes before i."""

    def __init__(self, num_codes: int, dim: int = 64, layers: int = 6, hidden: int = 0):
        super().__init__()
        self.num_codes = num_codes
        self.embed = nn.Embedding(num_codes, dim)
        self.layers = nn.ModuleList(GatedLayer(dim) for _ in range(layers))
        hidden = hidden or 2 * dim
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_codes, 1))

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """Horizontal-stack output (N, dim, H, W); position i depends on codes[< i] only."""
        e = self.embed(codes).permute(0, 3, 1, 2)
        v, h = down_shift(e), right_shift(e)
        for layer in self.layers:
            v, h = layer(v, h)
        return h

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(codes))

    def nll(self, codes: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per example, summed over the grid."""
        logits = self(codes).float()
        return F.cross_entropy(logits, codes, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, int], device: torch.device | str | None = None,
               chunk: int = 1024) -> torch.Tensor:
        """n grids of codes (n, H, W) in raster order, `chunk` grids at a time to bound memory."""
        device = device or self.embed.weight.device
        return torch.cat([self._sample(min(chunk, n - i), shape, device) for i in range(0, n, chunk)])

    def _sample(self, n: int, shape: tuple[int, int], device: torch.device | str) -> torch.Tensor:
        height, width = shape
        codes = torch.zeros(n, height, width, dtype=torch.long, device=device)
        for i in range(height):
            for j in range(width):
                # The head is 1x1 convs: apply it at (i, j) only instead of to the whole grid.
                logits = self.head(self.features(codes)[:, :, i:i + 1, j:j + 1])[:, :, 0, 0]
                codes[:, i, j] = torch.multinomial(torch.softmax(logits.float(), dim=1), 1)[:, 0]
        return codes
