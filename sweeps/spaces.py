"""Search spaces and presets, one `Space` per sweepable model family.

A space is the model name, the searched hyperparameters (sweeps/domains.py; Ray Tune's once the sweep is built), the
ranking metric (one that means the same for every trial in the space), and presets: fixed values for the
engine, the model and the data, plus the sweep's own budget. Everything a trial sees is one flat dict.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from sweeps.budgets import FIDSettings
from sweeps.domains import choice, is_searched, loguniform

# The sweep's FID budgets by preset (a preset may set its own): ladder[i] samples at ASHA rung i, `final` at the end.
FID_SETTINGS = {
    "smoke": FIDSettings(network="standin", ladder=(128, 256), final=256),
    "full": FIDSettings(network="inception", ladder=(1000, 5000, 10000), final=10000),
}


@dataclasses.dataclass
class Preset:
    config: dict[str, Any]  # fixed trial config: TrainConfig, model config and data keys
    num_samples: int  # trials
    grace_period: int = 1  # ASHA: epochs before the first stop decision
    reduction_factor: int = 2
    fid: FIDSettings | None = None  # None: FID_SETTINGS[preset name]


@dataclasses.dataclass
class Space:
    name: str
    model: str
    params: dict[str, Any]  # searched hyperparameters (sweeps/domains.py) and constants
    metric: str  # default ranking metric; "fid"/"rfid" come from the trainable's FID ladder
    mode: str = "min"
    metrics: tuple[str, ...] = ()  # other ranking metrics --metric may choose (each comparable across the space)
    needs_checkpoint: bool = False  # evaluates a trained model (--checkpoint) instead of training one
    presets: dict[str, Preset] = dataclasses.field(default_factory=dict)
    description: str = ""
    # The seed project's own configuration of this model (../shared/SEED-NOTES.md): every searched value pinned, for
    # one comparison trial at any preset's budget (run.py --seed-defaults).
    seed_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def searched(self) -> list[str]:
        return [k for k, v in self.params.items() if is_searched(v)]


# Said wherever a smoke sweep's results are shown: its trials are too small and short to rank models by.
SMOKE_NOTE = ("the smoke preset is a pipeline check (tiny networks, a few epochs, the stand-in FID network): its "
              "rankings and importances are not evidence; use --preset full on a GPU for results")

# Data keys every trial understands (the rest is TrainConfig and the model's Config).
SMOKE_DATA = {"dataset": "synthetic", "train_size": 512, "test_size": 256}
FULL_DATA = {"dataset": "cifar10", "train_size": 0, "test_size": 0}

VAE_SPACE = Space(
    name="vae",
    model="vae",
    description="conv VAE / beta-VAE; ranked by test negative ELBO (beta=1) in bits/dim",
    params={
        "beta": loguniform(0.05, 16.0),
        "latent": choice([32, 64, 128, 256]),
        "lr": loguniform(1e-4, 3e-3),
        # up to 1: the seeds' "SSE + beta * KL" is a Gaussian decoder with scale sqrt(0.5) = 0.707
        "likelihood_scale": loguniform(0.02, 1.0),
        "learn_scale": choice([False, True]),  # learned: likelihood_scale is where sigma starts
    },
    metric="test_bpd",
    metrics=("test_bpd", "test_iwae_bpd", "fid"),
    # the beta-VAE seed (the full preset's conv arch): beta 1, Adam 1e-4, latent 128, "SSE + KL"
    seed_defaults={"beta": 1.0, "lr": 1e-4, "latent": 128, "likelihood_scale": 0.707, "learn_scale": False},
    presets={
        "smoke": Preset(config={**SMOKE_DATA, "arch": "conv-small", "width": 8, "epochs": 4, "steps_per_epoch": 8,
                                "batch_size": 64, "eval_k": 8, "final_eval_k": 32}, num_samples=8),
        "full": Preset(config={**FULL_DATA, "arch": "conv", "epochs": 150, "batch_size": 128, "ema_decay": 0.0},
                       num_samples=64, grace_period=10, reduction_factor=3),
    },
)

def vqvae_preset(stage1_epochs: int, prior_epochs: int, config: dict[str, Any], num_samples: int,
                 reduction_factor: int = 2) -> Preset:
    """A VQ-VAE preset: `epochs` is the sum of the two stages, and ASHA's first decision waits for the end of the
    first prior epoch, since sample FID before it measures an untrained prior."""
    config = {**config, "stage1_epochs": stage1_epochs, "epochs": stage1_epochs + prior_epochs}
    return Preset(config=config, num_samples=num_samples, grace_period=stage1_epochs + 1,
                  reduction_factor=reduction_factor)


VQVAE_SPACE = Space(
    name="vqvae",
    model="vqvae",
    description="VQ-VAE (EMA codebook, dead-code restarts) + gated PixelCNN prior over the 8x8 codes, both stages in "
                "one trial (the epochs after stage1_epochs train the prior on frozen codes). Ranked by the "
                "FID of samples (prior codes, decoded); ASHA's grace period ends at the first prior epoch because "
                "earlier milestones would score samples of an untrained prior. --metric can rank by reconstruction "
                "FID instead.",
    params={
        "codebook_size": choice([128, 256, 512, 1024]),
        "code_dim": choice([16, 32, 64]),
        "commitment": loguniform(0.1, 2.0),
        "ema_decay_codebook": choice([0.95, 0.99, 0.999]),
        "restarts": choice([True, False]),
        "lr": loguniform(1e-4, 1e-3),
    },
    metric="fid",
    metrics=("fid", "rfid"),
    # the VQ-VAE seed: K=512, D=64, commitment 0.25, a codebook trained by its loss (the seed's "EMA" had none), no
    # dead-code restarts, Adam 1e-3
    seed_defaults={"codebook_size": 512, "code_dim": 64, "commitment": 0.25, "codebook": "loss", "restarts": False,
                   "ema_decay_codebook": 0.99, "lr": 1e-3},  # (the decay is unused by a loss-trained codebook)
    presets={
        # Tiny model, small codebooks (K is still searched), ~9 s of CPU per trial before FID.
        "smoke": vqvae_preset(6, 4, {**SMOKE_DATA, "codebook_size": choice([16, 32, 64, 128]), "width": 32,
                                     "res_blocks": 1, "prior_width": 16, "prior_layers": 4, "restart_window": 20,
                                     "steps_per_epoch": 25, "batch_size": 32}, num_samples=8),
        # Paper sizes (van den Oord et al. 2017: 128-wide encoder with 2 residual blocks, batch 128); 60 epochs of
        # CIFAR-10 is ~23k steps of stage 1, a tenth of the paper's 250k, to keep a 32-trial sweep affordable.
        "full": vqvae_preset(60, 30, {**FULL_DATA, "width": 128, "res_blocks": 2, "prior_width": 128,
                                      "prior_layers": 6, "restart_window": 100, "batch_size": 128},
                             num_samples=32, reduction_factor=3),
    },
)



# NCSN's presets share a tiny U-Net for smoke runs, and NCSN's 200k steps of batch 128 at full scale.
NCSN_SMOKE = {**SMOKE_DATA, "arch": "unet", "width": 8, "unet_blocks": 1, "ema_decay": 0.999, "epochs": 4,
              "steps_per_epoch": 8, "batch_size": 64}
NCSN_FULL = Preset(config={**FULL_DATA, "epochs": 100, "steps_per_epoch": 2000, "batch_size": 128}, num_samples=32,
                   grace_period=10, reduction_factor=3)

NCSN_SPACE = Space(
    name="ncsn",
    model="ncsn",
    description="NCSN score networks (unet | refinenet) on a geometric sigma schedule (sigma_1 -> sigma_L, L from "
                "the ratio gamma), trained by denoising score matching, sampled by annealed Langevin; ranked by "
                "sample FID, because the DSM loss changes meaning with the sigma schedule (reported as a training "
                "curve only); every trial reports the schedule it used (sigma_1, sigma_L, num_levels, gamma, "
                "langevin_eps). The NCSNv2 schedule is space ncsn-v2.",
    params={
        "sigma_schedule": "geometric",
        "sigma_1": choice([1.0, 20.0, 50.0]),
        "sigma_L": choice([0.005, 0.01]),
        "num_levels": None,  # L follows from gamma: the ratio means the same whatever sigma_1 is
        "gamma": choice([0.6, 0.9, 0.963]),  # NCSN (L=10 over 1..0.01), the seed (L=50), NCSNv2's ratio
        "langevin_steps": choice([5, 20, 100]),
        "langevin_eps": loguniform(1e-6, 5e-5),
        "lr": choice([1e-4, 2e-4, 1e-3]),
        "ema_decay": choice([0.999, 0.9999]),
        "arch": choice(["unet", "refinenet"]),
        "width": choice([64, 128]),
    },
    metric="fid",
    # the NCSN seed: geometric 1 -> 0.01 in L=50, T=100, eps 2e-5, start N(0, I), no final denoising, Adam 1e-3,
    # EMA 0.999, grad clip 1, the U-Net at width 128
    seed_defaults={"sigma_schedule": "geometric", "sigma_1": 1.0, "sigma_L": 0.01, "num_levels": 50, "gamma": None,
                   "langevin_steps": 100, "langevin_eps": 2e-5, "init": "gaussian", "denoise": False, "lr": 1e-3,
                   "ema_decay": 0.999, "grad_clip": 1.0, "arch": "unet", "width": 128},
    presets={
        # coarse ratios: 3 to 5 levels, seconds of Langevin on a CPU
        "smoke": Preset(config={**NCSN_SMOKE, "gamma": choice([0.05, 0.1]), "langevin_steps": 5}, num_samples=8),
        "full": NCSN_FULL,
    },
)

NCSN_V2_SPACE = Space(
    name="ncsn-v2",
    model="ncsn",
    description="NCSN score networks (unet | refinenet) on the NCSNv2 schedule: sigma_1 the training data's "
                "maximum pairwise distance (computed once by the driver), the ratio from the NCSNv2 rule (0.963 "
                "for D = 3072), L from sigma_1, sigma_L and the ratio, Langevin eps from the NCSNv2 criterion for "
                "T; ranked by sample FID; every trial reports the schedule it used (sigma_1, sigma_L, num_levels, "
                "gamma, langevin_eps).",
    params={
        "sigma_schedule": "ncsnv2",
        "sigma_L": choice([0.005, 0.01]),
        "langevin_steps": choice([5, 10, 20]),  # NCSNv2 took 5 for CIFAR-10; L ~ 230 levels of T steps each
        "langevin_eps": None,  # the NCSNv2 criterion's eps for T
        "lr": choice([1e-4, 2e-4, 1e-3]),
        "ema_decay": choice([0.999, 0.9999]),
        "arch": choice(["unet", "refinenet"]),
        "width": choice([64, 128]),
    },
    metric="fid",
    # the NCSN seed's own run (its geometric schedule, as in space ncsn): the trial this space has to beat
    seed_defaults=NCSN_SPACE.seed_defaults,
    presets={
        # sigma_L close to sigma_1 (~35 for the smoke's synthetic images, ~50 for CIFAR-10): the NCSNv2 ratio then
        # needs 10 to 26 levels, not ~230, and T = 1: seconds of Langevin on a CPU
        "smoke": Preset(config={**NCSN_SMOKE, "sigma_L": choice([20.0, 25.0]), "langevin_steps": 1},
                        num_samples=8),
        # NCSNv2 (CIFAR-10) trained 300k steps of batch 128; 200k here, as space ncsn
        "full": NCSN_FULL,
    },
)

NCSN_SAMPLING_SPACE = Space(
    name="ncsn-sampling",
    model="ncsn",
    description="annealed Langevin settings (T, eps, final denoising, start) for one trained NCSN checkpoint "
                "(--checkpoint); no training; ranked by sample FID",
    params={
        "langevin_steps": choice([5, 20, 100]),
        "langevin_eps": loguniform(1e-6, 5e-5),
        "denoise": choice([True, False]),
        "init": choice(["uniform", "gaussian"]),
    },
    metric="fid",
    seed_defaults={"langevin_steps": 100, "langevin_eps": 2e-5, "init": "gaussian", "denoise": False},
    needs_checkpoint=True,
    presets={
        # One evaluation per trial (epochs=1): nothing for ASHA to stop early.
        "smoke": Preset(config={**SMOKE_DATA, "langevin_steps": choice([2, 5]), "epochs": 1}, num_samples=8),
        "full": Preset(config={**FULL_DATA, "epochs": 1}, num_samples=32),
    },
)


# The VAE family's ranking metrics mean the same whatever beta, alpha or training k a trial used: resnet_vae, trained
# on the ELBO as vae is, ranks as vae does by the beta = 1 test ELBO (test_bpd: two decoder passes per test image);
# iwae, whose training k changes its ELBO, by the importance-weighted test NLL estimate test_iwae_bpd (L_k with the
# space's eval_k, the same k for every trial: eval_k more decoder passes). Smoke presets evaluate on 128 test images
# with a small k to stay within seconds on one CPU core.
VAE_FAMILY_SMOKE = {**SMOKE_DATA, "epochs": 3, "steps_per_epoch": 8, "batch_size": 32, "eval_images": 128,
                    "eval_k": 8, "final_eval_k": 32}

RESNET = {"arch": "resnet", "norm": "group"}  # GroupNorm: the family reports L_k, which BatchNorm would bias

RESNET_VAE_SPACE = Space(
    name="resnet_vae",
    model="vae",
    description="ResNet-VAE (residual encoder and decoder, GroupNorm); ranked by test negative ELBO (beta=1) in "
                "bits/dim, as vae is (--metric test_iwae_bpd for the bound at eval_k)",
    params={
        **RESNET,
        "beta": loguniform(0.1, 4.0),
        "latent": choice([32, 64, 128, 256]),
        "lr": loguniform(1e-4, 3e-3),
        "width": choice([16, 32, 64]),
    },
    metric="test_bpd",
    metrics=("test_bpd", "test_iwae_bpd", "fid"),
    # the ResNet-VAE seed: beta 0.1, Adam 1e-3, latent 128, stem width 32, "SSE + beta * KL"
    seed_defaults={"beta": 0.1, "lr": 1e-3, "latent": 128, "width": 32, "likelihood_scale": 0.707},
    presets={
        "smoke": Preset(config={**VAE_FAMILY_SMOKE, "width": 8}, num_samples=6),
        "full": Preset(config={**FULL_DATA, "epochs": 100, "batch_size": 128, "eval_k": 64, "final_eval_k": 1000},
                       num_samples=48, grace_period=10, reduction_factor=3),
    },
)

DFC_SPACE = Space(
    name="dfc",
    model="dfc",
    description="DFC-VAE (ResNet-VAE + VGG-19 perceptual loss); ranked by sample FID (--metric test_iwae_bpd for "
                "the likelihood bound instead); the perceptual loss changes meaning with alpha, so it never ranks",
    params={
        **RESNET,  # the ResNet-VAE with a perceptual loss
        "alpha": loguniform(0.05, 5.0),
        "beta": loguniform(0.05, 1.0),
        "layers": choice(["123", "345", "seed"]),
        "pixel_weight": choice([0.0, 1.0]),
    },
    metric="fid",
    metrics=("fid", "test_iwae_bpd"),
    # the DFC seed: perceptual weight 0.5 at relu1_2, relu2_2, relu3_4 plus the pixel SSE, beta 0.1
    seed_defaults={"alpha": 0.5, "beta": 0.1, "layers": "seed", "pixel_weight": 1.0},
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
        "k": choice([1, 2, 5, 10, 50]),
        "lr": loguniform(1e-4, 3e-3),
        "latent": choice([32, 64, 128]),
        "estimator": choice(["iwae", "dreg"]),
    },
    metric="test_iwae_bpd",
    metrics=("test_iwae_bpd", "fid"),
    # the IWAE seed: k 5, Adam 1e-4, latent 128, the IWAE gradient
    seed_defaults={"k": 5, "lr": 1e-4, "latent": 128, "estimator": "iwae"},
    presets={
        "smoke": Preset(config={**VAE_FAMILY_SMOKE, "arch": "conv-small", "width": 8, "steps_per_epoch": 6},
                        num_samples=6),
        "full": Preset(config={**FULL_DATA, "arch": "conv", "norm": "group", "epochs": 100, "batch_size": 64,
                               "eval_k": 64, "final_eval_k": 1000}, num_samples=48, grace_period=10,
                       reduction_factor=3),
    },
)

SPACES: dict[str, Space] = {s.name: s for s in [VAE_SPACE, RESNET_VAE_SPACE, DFC_SPACE, IWAE_SPACE, VQVAE_SPACE,
                                                NCSN_SPACE, NCSN_V2_SPACE, NCSN_SAMPLING_SPACE]}
