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

NCSN_SPACE = Space(
    name="ncsn",
    model="ncsn",
    description="NCSN score networks (unet | refinenet) trained by denoising score matching, sampled by annealed "
                "Langevin; ranked by sample FID, because the DSM loss changes meaning with the sigma schedule "
                "(reported as a training curve only). ncsnv2 trials take sigma_1 from the data and the ratio and L "
                "from the NCSNv2 rule, so their sampled sigma_1 and gamma go unused; every trial reports the "
                "schedule it used (sigma_1, sigma_L, num_levels, gamma, langevin_eps).",
    params={
        "sigma_schedule": tune.choice(["geometric", "ncsnv2"]),
        "sigma_1": tune.choice([1.0, 20.0, 50.0]),  # geometric only
        "sigma_L": tune.choice([0.005, 0.01]),
        "num_levels": 0,  # L follows from gamma: the ratio means the same whatever sigma_1 is
        "gamma": tune.choice([0.6, 0.9, 0.963]),  # geometric only: NCSN (L=10 over 1..0.01), the seed (L=50), NCSNv2
        "langevin_steps": tune.choice([5, 20, 100]),
        "langevin_eps": tune.loguniform(1e-6, 5e-5),
        "lr": tune.choice([1e-4, 2e-4, 1e-3]),
        "ema_decay": tune.choice([0.999, 0.9999]),
        "arch": tune.choice(["unet", "refinenet"]),
        "width": tune.choice([64, 128]),
    },
    metric="fid",
    presets={
        # geometric only: an ncsnv2 schedule for D = 3072 has ~230 levels, minutes of Langevin on a CPU
        "smoke": Preset(config={**SMOKE_DATA, "sigma_schedule": "geometric", "num_levels": 3, "gamma": 0.0,
                                "langevin_steps": 5, "arch": "unet", "width": 8, "unet_blocks": 1,
                                "ema_decay": 0.999, "epochs": 4, "steps_per_epoch": 8, "batch_size": 64},
                        num_samples=8),
        # NCSN: 200k steps of batch 128
        "full": Preset(config={**FULL_DATA, "epochs": 100, "steps_per_epoch": 2000, "batch_size": 128},
                       num_samples=32, grace_period=10, reduction_factor=3),
    },
)

NCSN_SAMPLING_SPACE = Space(
    name="ncsn-sampling",
    model="ncsn",
    description="annealed Langevin settings (T, eps, final denoising, start) for one trained NCSN checkpoint "
                "(--checkpoint); no training; ranked by sample FID",
    params={
        "langevin_steps": tune.choice([5, 20, 100]),
        "langevin_eps": tune.loguniform(1e-6, 5e-5),
        "denoise": tune.choice([True, False]),
        "init": tune.choice(["uniform", "gaussian"]),
    },
    metric="fid",
    presets={
        "smoke": Preset(config={**SMOKE_DATA, "langevin_steps": tune.choice([2, 5])}, num_samples=8),
        "full": Preset(config={**FULL_DATA}, num_samples=32),
    },
)

SPACES: dict[str, Space] = {s.name: s for s in [VAE_SPACE, NCSN_SPACE, NCSN_SAMPLING_SPACE]}
