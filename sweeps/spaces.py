"""Search spaces and presets, one `Space` per sweepable model family.

A space is the model name, the searched hyperparameters (Ray Tune domains, which OptunaSearch converts), the
ranking metric (one that means the same for every trial in the space), and presets: fixed values for the
engine, the model and the data, plus the sweep's own budget. Everything a trial sees is one flat dict.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ray import tune


@dataclasses.dataclass
class Preset:
    config: dict[str, Any]  # fixed trial config: TrainConfig, model config and data keys
    num_samples: int  # trials
    grace_period: int = 1  # ASHA: epochs before the first stop decision
    reduction_factor: int = 2


@dataclasses.dataclass
class Space:
    name: str
    model: str
    params: dict[str, Any]  # searched hyperparameters (tune domains) and constants
    metric: str  # ranking metric, reported at every epoch
    mode: str = "min"
    presets: dict[str, Preset] = dataclasses.field(default_factory=dict)
    description: str = ""

    @property
    def searched(self) -> list[str]:
        return [k for k, v in self.params.items() if isinstance(v, tune.search.sample.Domain)]


# Data keys every trial understands (the rest is TrainConfig and the model's Config).
SMOKE_DATA = {"dataset": "synthetic", "train_size": 512, "test_size": 256}
FULL_DATA = {"dataset": "cifar10", "train_size": 0, "test_size": 0}

VAE_SPACE = Space(
    name="vae",
    model="vae",
    description="conv VAE / beta-VAE; ranked by test negative ELBO (beta=1) in bits/dim",
    params={
        "beta": tune.loguniform(0.05, 16.0),
        "latent": tune.choice([32, 64, 128, 256]),
        "lr": tune.loguniform(1e-4, 3e-3),
        "likelihood_scale": tune.loguniform(0.02, 0.3),
    },
    metric="test_bpd",
    presets={
        "smoke": Preset(config={**SMOKE_DATA, "arch": "conv-small", "width": 8, "epochs": 4, "steps_per_epoch": 8,
                                "batch_size": 64}, num_samples=8),
        "full": Preset(config={**FULL_DATA, "arch": "conv", "epochs": 150, "batch_size": 128, "ema_decay": 0.0},
                       num_samples=64, grace_period=10, reduction_factor=3),
    },
)

SPACES: dict[str, Space] = {s.name: s for s in [VAE_SPACE]}
