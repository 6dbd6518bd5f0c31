"""Image datasets as uint8 tensors, and an in-memory batch iterator.

Every dataset is loaded once into a uint8 tensor of shape (N, C, 32, 32). Batches are slices of that tensor
(on the GPU when there is one) with random horizontal flips done on the device: no DataLoader, no worker processes,
no host round trip per step. Models turn uint8 into floats themselves (dequantised for likelihoods, scaled for
score matching), so one iterator serves every model.
"""
from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from genmodels.config import DATASETS
from genmodels.errors import ResourceUnavailable

if TYPE_CHECKING:
    from genmodels.config import DataConfig

IMAGE_SIZE = 32


class DataUnavailable(ResourceUnavailable):
    """The dataset is neither on disk nor downloadable; the message says which flag fixes it."""


def default_data_dir() -> Path:
    return Path(os.environ.get("GENSWEEP_DATA", Path.home() / ".cache" / "gensweep" / "data"))


def load_images(name: str, split: str = "train", data_dir: str | Path | None = None, download: bool = True,
                limit: int | None = None) -> torch.Tensor:
    """Return `split` ('train' or 'test') of dataset `name` as a uint8 tensor (N, C, 32, 32)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(data_dir) if data_dir else default_data_dir()
    download = download and not os.environ.get("GENSWEEP_OFFLINE")  # for clusters with no way out
    if name == "cifar10":
        images = _torchvision_images("CIFAR10", root, split, download)
    elif name == "fashion_mnist":
        images = _torchvision_images("FashionMNIST", root, split, download)
    elif name == "synthetic":
        images = synthetic_images(limit or (10_000 if split == "train" else 2_000), seed=0 if split == "train" else 1)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return images[:limit] if limit else images


def load_splits(data: DataConfig) -> dict[str, torch.Tensor]:
    """The train and test images a run's data section names, each cut to its size (0 = all): what
    `genmodels.train` loads for one run and a sweep's driver loads once for all its trials."""
    return {split: load_images(data.dataset, split, data.data_dir or None,
                               limit=(data.train_size if split == "train" else data.test_size) or None)
            for split in ("train", "test")}


def _torchvision_images(cls_name: str, root: Path, split: str, download: bool) -> torch.Tensor:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    train = split == "train"
    try:
        ds = cls(str(root), train=train, download=False)
    except Exception:  # missing, failing torchvision's md5 check, or unreadable: sorted out below
        ds = None
    problem = f"{cls_name} not found under {root}"
    if ds is None and download:
        try:
            ds = cls(str(root), train=train, download=True)  # also repairs a damaged CIFAR copy
        except Exception as e:  # URLError, socket errors, checksum failures: all mean "not obtainable here"
            problem = f"could not download {cls_name} into {root} ({type(e).__name__}: {' '.join(str(e).split())})"
    if ds is None:
        folder = root / getattr(cls, "base_folder", f"{cls_name}/raw")
        damage = _damage(cls, folder) if folder.is_dir() else None
        if damage:
            raise DataUnavailable(f"the {cls_name} copy in {folder} is corrupt: {damage}; delete that folder (the "
                                  f"next run downloads it again) or point --data-dir at a good copy")
        raise DataUnavailable(f"{problem}; point --data-dir at a folder that holds it")
    data = torch.as_tensor(ds.data)
    if data.ndim == 4:  # CIFAR: (N, H, W, C) numpy
        return data.permute(0, 3, 1, 2).contiguous()
    pad = (IMAGE_SIZE - data.shape[-1]) // 2  # Fashion-MNIST: 28x28 -> 32x32, one channel
    return F.pad(data, (pad, pad, pad, pad)).unsqueeze(1).contiguous()


def _damage(cls: type, folder: Path) -> str | None:
    """What is wrong with the first bad file in `folder`, the on-disk copy of torchvision dataset `cls`: missing,
    failing torchvision's md5 (CIFAR lists one per file) or unreadable; None when every file is fine."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    from torchvision.datasets.utils import check_md5

    if hasattr(cls, "base_folder"):  # CIFAR: pickled batches
        files = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
        read = lambda path: pickle.loads(path.read_bytes(), encoding="latin1")  # noqa: E731
    else:  # the MNIST family: the md5s are of the .gz downloads, not of the raw files read here
        files = [(Path(gz).stem, None) for gz, _ in cls.resources]
        read = read_sn3_pascalvincent_tensor
    for name, md5 in files:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if md5 and not check_md5(path, md5):
            return f"{name} does not match its md5 checksum"
        try:
            read(path)
        except Exception as e:  # noqa: BLE001 - truncated or garbage: pickle, assertion, reshape errors alike
            return f"{name} cannot be read ({type(e).__name__})"
    return None


def synthetic_images(n: int, seed: int = 0, size: int = IMAGE_SIZE, chunk: int = 512) -> torch.Tensor:
    """Deterministic 32x32 colour images: a gradient background, a striped or checked texture, and 1-3 shapes.

    Enough structure (edges, colours, textures) for a model to learn something in seconds, and reproducible
    anywhere with no download: the smoke preset's data.
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    # every draw first, in one order, so that an image depends only on (n, seed, its index), not on `chunk`
    angle = u(n, 1, 1, 1) * 2 * math.pi
    c0, c1 = u(n, 3, 1, 1), u(n, 3, 1, 1)
    freq = 2 + u(n, 1, 1, 1) * 6
    striped, textured = u(n, 1, 1, 1) < 0.5, (u(n, 1, 1, 1) < 0.6).float()
    shapes = []
    for k in range(3):
        present = (u(n, 1, 1, 1) < (1.0 if k == 0 else 0.5)).float()
        cx, cy, r = 0.2 + 0.6 * u(n, 1, 1, 1), 0.2 + 0.6 * u(n, 1, 1, 1), 0.08 + 0.2 * u(n, 1, 1, 1)
        shapes.append((present, cx, cy, r, u(n, 1, 1, 1), u(n, 3, 1, 1)))  # ... kind, colour
    grid_y, grid_x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    # painted a chunk at a time: the sweep driver's 10,000 train images take 0.7 s, not the 2.8 s of one pass whose
    # (n, 3, 32, 32) intermediates leave the CPU's cache
    for i in range(0, n, chunk):
        at = slice(i, min(n, i + chunk))
        ys, xs = grid_y.expand(at.stop - i, 1, size, size), grid_x.expand(at.stop - i, 1, size, size)
        a, f = angle[at], freq[at]
        t = (xs * torch.cos(a) + ys * torch.sin(a) + 1.5) / 3  # in [0,1]
        img = c0[at] + (c1[at] - c0[at]) * t
        stripes = (torch.sin(2 * math.pi * f * (xs * torch.cos(a * 3) + ys * torch.sin(a * 3))) > 0).float()
        checks = ((torch.floor(xs * f) + torch.floor(ys * f)) % 2)
        texture = torch.where(striped[at], stripes, checks)
        img = img * (1 - 0.25 * texture * textured[at])
        for present, cx, cy, r, kind, colour in shapes:
            cx, cy, r, kind = cx[at], cy[at], r[at], kind[at]
            circle = ((xs - cx) ** 2 + (ys - cy) ** 2 < r ** 2)
            square = ((xs - cx).abs() < r) & ((ys - cy).abs() < r)
            triangle = (ys - cy < r) & ((xs - cx).abs() < (ys - cy + r) / 2)
            mask = torch.where(kind < 1 / 3, circle, torch.where(kind < 2 / 3, square, triangle)).float() * present[at]
            img = img * (1 - mask) + colour[at] * mask
        out[at] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


class Batches:
    """Minibatches of a uint8 image tensor that stays in memory (on the GPU when `device` is one).

    `epoch()` yields `steps` batches (default: one pass, dropping the ragged tail when training) drawn from a
    fresh permutation; the generator is the only randomness, so its state in a checkpoint makes resumes exact.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device | str = "cpu",
                 shuffle: bool = True, flip: bool = True, seed: int = 0):
        if images.dtype != torch.uint8:
            raise TypeError("Batches expects uint8 images")
        self.images = images.to(device)
        self.batch_size = min(batch_size, len(images))
        self.shuffle, self.flip = shuffle, flip
        self.generator = torch.Generator(device=self.images.device).manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images) // self.batch_size if self.shuffle else math.ceil(len(self.images) / self.batch_size)

    def epoch(self, steps: int | None = None) -> Iterator[torch.Tensor]:
        n, bs, dev = len(self.images), self.batch_size, self.images.device
        steps = steps or len(self)
        order = torch.arange(n, device=dev)
        done = 0
        while done < steps:
            if self.shuffle:
                order = torch.randperm(n, device=dev, generator=self.generator)
            for i in range(0, n, bs):
                if done == steps or (self.shuffle and i + bs > n):
                    break
                x = self.images[order[i:i + bs]]
                if self.flip:
                    flipped = torch.rand(len(x), device=dev, generator=self.generator) < 0.5
                    x = torch.where(flipped[:, None, None, None], x.flip(3), x)
                yield x
                done += 1
            if not self.shuffle:
                break


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]."""
    return x.float() / 255.0


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> (x + u) / 256 with u ~ U[0,1): continuous data whose density gives a bound on discrete bits/dim."""
    return (x.float() + torch.rand_like(x, dtype=torch.float)) / 256.0
