"""Image grids on disk."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save float images in [0, 1] (N, C, H, W) as one PNG grid."""
    from torchvision.utils import save_image  # here: torchvision costs every process that imports the engine 1.4 s

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().clamp(0, 1).cpu()
    save_image(images, path, nrow=nrow or max(1, int(math.sqrt(len(images)))), padding=1, pad_value=1.0)
    return path
