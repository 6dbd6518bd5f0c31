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

# The VAE family below is ranked by the importance-weighted test NLL estimate test_iwae_bpd (bits/dim, from L_k with
# the space's eval_k, the same k for every trial): it means the same whatever beta, alpha or training k a trial
# used. Smoke presets evaluate on 128 test images with a small k to stay within seconds on one CPU core.
VAE_FAMILY_SMOKE = {**SMOKE_DATA, "epochs": 3, "steps_per_epoch": 8, "batch_size": 32, "eval_images": 128,
                    "eval_k": 8, "final_eval_k": 32}

RESNET_VAE_SPACE = Space(
    name="resnet_vae",
    model="vae",
    description="ResNet-VAE (residual encoder and decoder, GroupNorm); ranked by test IWAE-NLL bpd (eval_k samples)",
    params={
        "arch": "resnet",
        "norm": "group",
        "beta": tune.loguniform(0.1, 4.0),
        "latent": tune.choice([32, 64, 128, 256]),
        "lr": tune.loguniform(1e-4, 3e-3),
        "width": tune.choice([16, 32, 64]),
    },
    metric="test_iwae_bpd",
    presets={
        "smoke": Preset(config={**VAE_FAMILY_SMOKE, "width": 8}, num_samples=6),
        "full": Preset(config={**FULL_DATA, "epochs": 100, "batch_size": 128, "eval_k": 64, "final_eval_k": 1000},
                       num_samples=48, grace_period=10, reduction_factor=3),
    },
)

DFC_SPACE = Space(
    name="dfc",
    model="dfc",
    description="DFC-VAE (ResNet-VAE + VGG-19 perceptual loss); ranked by test IWAE-NLL bpd until sample FID lands "
                "(the perceptual loss changes meaning with alpha, so it is never the ranking metric)",
    params={
        "arch": "resnet",
        "norm": "group",
        "alpha": tune.loguniform(0.05, 5.0),
        "beta": tune.loguniform(0.05, 1.0),
        "layers": tune.choice(["123", "345", "seed"]),
        "pixel_weight": tune.choice([0.0, 1.0]),
    },
    metric="test_iwae_bpd",
    presets={
        "smoke": Preset(config={**VAE_FAMILY_SMOKE, "width": 8, "batch_size": 16, "steps_per_epoch": 4,
                                "vgg_weights": "random"}, num_samples=6),
        "full": Preset(config={**FULL_DATA, "epochs": 50, "batch_size": 128, "lr": 1e-3, "eval_k": 64,
                               "final_eval_k": 1000}, num_samples=32, grace_period=5, reduction_factor=3),
    },
)

IWAE_SPACE = Space(
    name="iwae",
    model="iwae",
    description="IWAE (beta-VAE seed's conv nets, GroupNorm), k and estimator searched; ranked by test IWAE-NLL bpd "
                "with one eval_k for every trial, whatever k it trained with",
    params={
        "k": tune.choice([1, 2, 5, 10, 50]),
        "lr": tune.loguniform(1e-4, 3e-3),
        "latent": tune.choice([32, 64, 128]),
        "estimator": tune.choice(["iwae", "dreg"]),
    },
    metric="test_iwae_bpd",
    presets={
        "smoke": Preset(config={**VAE_FAMILY_SMOKE, "arch": "conv-small", "width": 8, "steps_per_epoch": 6},
                        num_samples=6),
        "full": Preset(config={**FULL_DATA, "arch": "conv", "norm": "group", "epochs": 100, "batch_size": 64,
                               "eval_k": 64, "final_eval_k": 1000}, num_samples=48, grace_period=10,
                       reduction_factor=3),
    },
)

SPACES.update({s.name: s for s in [RESNET_VAE_SPACE, DFC_SPACE, IWAE_SPACE]})
