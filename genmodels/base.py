"""The interface every model implements, so one engine trains them all."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from torch import nn


@dataclasses.dataclass
class ModelConfig:
    """Base for each model's config: a flat dataclass, so a sweep's flat dict maps onto it one key at a time."""


class ResourceUnavailable(RuntimeError):
    """Data or weights are missing and cannot be downloaded; the message is one line naming the flag that fixes it."""


class GenerativeModel(nn.Module):
    """A generative model over uint8 images (N, C, 32, 32).

    Subclasses set `Config` and implement `loss`; `evaluate`, `sample` and `reconstruct` where they apply.
    """

    Config: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        self.cfg, self.channels = cfg, channels

    @classmethod
    def prepare(cls, params: dict[str, Any], train_images: torch.Tensor | None = None) -> dict[str, Any]:
        """Run once by the driver before any trial: check the config, fetch or check external weights (raise
        ResourceUnavailable with one line naming the flag), and derive values from the training data that every
        trial needs (returned as config entries, e.g. NCSNv2's sigma_1), so no trial repeats the work."""
        return {}

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss on a uint8 batch, and named scalar tensors to log (no host syncs)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Metrics on the test split, averaged per image."""
        return {}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images in [0, 1], float (n, C, 32, 32)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions in [0, 1] of a uint8 batch."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct")

    @property
    def can_sample(self) -> bool:
        return type(self).sample is not GenerativeModel.sample

    @property
    def can_reconstruct(self) -> bool:
        return type(self).reconstruct is not GenerativeModel.reconstruct

    @torch.no_grad()
    def final_evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Expensive metrics computed once, at the end of a trial (e.g. a bound with many importance samples)."""
        return {}

    @torch.no_grad()
    def final_images(self, test_images: torch.Tensor, out_dir: Path) -> dict[str, Path]:
        """PNG grids written once at the end of a trial (e.g. latent interpolations); name -> path."""
        return {}

    def start_epoch(self, epoch: int) -> None:
        """Hook before each training epoch (0-based), e.g. to switch training stages; most models need none."""

    def extra_train_step(self, step: int) -> None:
        """Hook after each optimizer step (e.g. codebook restarts); most models need none."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def config_from_dict(cls: type[ModelConfig], values: dict[str, Any]) -> ModelConfig:
    """Build `cls` from the keys of `values` that are its fields, casting to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key in fields:
            kwargs[key] = _cast(value, fields[key].type)
    return cls(**kwargs)


def _cast(value: Any, type_name: Any) -> Any:
    # Ray/Optuna hand back numpy scalars and sometimes strings from the CLI: normalise to the declared type.
    t = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if t == "bool" and isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    for name, fn in (("int", int), ("float", float), ("bool", bool), ("str", str)):
        if t == name:
            return fn(value)
    return value
