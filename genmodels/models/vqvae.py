"""VQ-VAE (van den Oord et al. 2017) with an EMA codebook, dead-code restarts and a gated PixelCNN prior.

The seed's "EMA" VQ-VAE had no EMA, no dead-code handling (about 23 of 512 codes in use at initialisation) and no
prior, so it could only reconstruct. Here the codebook follows exponential moving averages of the encoder outputs
assigned to each code (Laplace-smoothed counts, as in Sonnet's VectorQuantizerEMA), codes unused for
`restart_window` training steps are re-seeded from the latest encoder outputs, and a PixelCNN over the 8x8 code
grid makes the model generate.

One trial runs both stages on the one engine: epochs [0, stage1_epochs) train the autoencoder and codebook, the
epochs after them train only the prior on the codes of the training batches, with everything else frozen (no
gradients, so Adam leaves it alone; eval mode, so the codebook EMA stops). A run whose epochs end within stage 1
has no trained prior: it reports no prior metrics and draws no samples (`training_plan` says so up front).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.config import ModelConfig
from genmodels.data import to_unit
from genmodels.metrics.likelihood import psnr
from genmodels.models.base import GenerativeModel
from genmodels.networks.pixelcnn import GatedPixelCNN
from genmodels.networks.quantizer import (
    VectorQuantizer,
    code_counts,
    perplexity,
    vq_decoder,
    vq_encoder,
)

if TYPE_CHECKING:
    from genmodels.config import TrialConfig

DECODE_CHUNK = 1024  # images decoded at once by sample(), to bound memory when the FID asks for thousands


@dataclasses.dataclass(frozen=True)
class VQVAEConfig(ModelConfig):
    codebook_size: int = 512  # K
    code_dim: int = 64  # D
    commitment: float = 0.25  # weight of the commitment loss ||z_e - sg(e)||^2 (van den Oord et al.'s beta)
    codebook: str = "ema"  # ema (moving averages of assigned encoder outputs) | loss (trained by ||sg(z_e) - e||^2)
    ema_decay_codebook: float = 0.99  # decay of the codebook averages (not the engine's `ema_decay` of weights)
    kmeans_init: bool = False  # initialise the codebook by k-means on the encoder outputs of the first batch
    restarts: bool = True  # re-seed codes unused for `restart_window` steps from the latest encoder outputs
    restart_window: int = 100  # training steps
    width: int = 128  # channels after the second stride-2 conv (the first has width // 2)
    res_blocks: int = 2
    stage1_epochs: int = 10  # autoencoder + codebook; the epochs after them train the PixelCNN prior
    prior_width: int = 64
    prior_layers: int = 6
    choices: ClassVar = {"codebook": ("ema", "loss")}
    ranges: ClassVar = {"codebook_size": (2, None), "code_dim": (1, None), "commitment": (0, None),
                        "ema_decay_codebook": (0, 1), "restart_window": (1, None), "width": (2, None),
                        "res_blocks": (0, None), "stage1_epochs": (0, None), "prior_width": (1, None),
                        "prior_layers": (1, None)}


class VQVAE(GenerativeModel):
    Config = VQVAEConfig

    def __init__(self, cfg: VQVAEConfig, channels: int):
        super().__init__(cfg, channels)
        self.encoder = vq_encoder(channels, cfg.width, cfg.res_blocks, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.codebook, cfg.ema_decay_codebook,
                                         cfg.kmeans_init, cfg.restart_window)
        self.decoder = vq_decoder(channels, cfg.width, cfg.res_blocks, cfg.code_dim)
        self.prior = GatedPixelCNN(cfg.codebook_size, cfg.prior_width, cfg.prior_layers)
        self.grid = (8, 8)
        self.dims = channels * 32 * 32
        self.stage = 1  # training stage, derived from the epoch by start_epoch (so a resumed run gets it back)
        # Whether stage 2 has begun: a buffer, so checkpoints and the EMA copy carry it.
        self.register_buffer("prior_trained", torch.tensor(False))

    @classmethod
    def training_plan(cls, cfg: TrialConfig) -> str:
        stage1, epochs = cfg.model.stage1_epochs, cfg.train.epochs
        if epochs <= stage1:
            return (f"vqvae: {epochs} epochs <= stage1_epochs {stage1}: trains the autoencoder and codebook only; no "
                    f"prior, so no samples and no prior metrics (set epochs above stage1_epochs to train one)")
        return f"vqvae: stage 1 (autoencoder, codebook) for {stage1} epochs, then the prior for {epochs - stage1}"

    @property
    def can_sample(self) -> bool:
        return bool(self.prior_trained)

    @property
    def autoencoder(self) -> tuple[nn.Module, ...]:
        return self.encoder, self.quantizer, self.decoder

    def start_epoch(self, epoch: int) -> None:
        self.set_stage(2 if epoch >= self.cfg.stage1_epochs else 1)
        if self.stage == 2:
            self.prior_trained.fill_(True)

    def set_stage(self, stage: int) -> None:
        """Stage 1 trains encoder, codebook and decoder; stage 2 freezes them (no grads, eval mode) for the prior."""
        self.stage = stage
        if stage == 2:
            # The restarts' last batch of encoder outputs: under CUDA graphs a tensor of the stage-1 graph's private
            # memory pool, which it would keep pinned through stage 2 (no restarts there; eval mode refills nothing).
            self.quantizer._recent = None
        for module in self.autoencoder:
            module.requires_grad_(stage == 1)
        self.train(self.training)

    def train(self, mode: bool = True) -> VQVAE:
        super().train(mode)
        if self.stage == 2:  # the engine calls train() every epoch: keep the frozen part in eval mode
            for module in self.autoencoder:
                module.eval()
        return self

    def extra_train_step(self, step: int) -> None:
        # A code is dead after restart_window unused steps: checking ten times per window finds it soon enough.
        if self.stage == 1 and self.cfg.restarts and step % max(1, self.cfg.restart_window // 10) == 0:
            self.quantizer.restart_dead_codes()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> encoder outputs (N, D, 8, 8)."""
        return self.encoder(to_unit(x) * 2 - 1)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> code indices (N, 8, 8)."""
        return self.quantizer.codes(self.encode(x))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (N, 8, 8) -> images in [0, 1]."""
        return self.decoder(self.quantizer.embed(codes)).float().clamp(0, 1)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stage == 2:
            with torch.no_grad():
                codes = self.codes(x)
            nll = F.cross_entropy(self.prior(codes).float(), codes)  # nats per code
            return nll, {"prior_bits_per_code": nll / math.log(2)}
        target = to_unit(x)
        z_q, codes, terms = self.quantizer(self.encode(x))
        mse = F.mse_loss(self.decoder(z_q).float(), target)
        loss = mse + self.cfg.commitment * terms["commitment"] + terms["codebook"]
        counts = code_counts(codes, self.cfg.codebook_size)
        logs = {"recon_mse": mse, "commitment": terms["commitment"], "perplexity": perplexity(counts)}
        if self.cfg.codebook == "loss":
            logs["codebook_loss"] = terms["codebook"]
        return loss, logs

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor], full: bool = True) -> dict[str, float]:
        # Already cheap (one encoder, decoder and prior pass per image): the same metrics whatever `full` says.
        prior_trained = bool(self.prior_trained)  # a buffer: read once, not per batch
        usage = torch.zeros(self.cfg.codebook_size, dtype=torch.long, device=self.device)
        sums = 0  # of squared error, PSNR and prior NLL, on the device
        n = 0
        for x in batches:
            codes = self.codes(x)
            recon, target = self.decode_codes(codes), to_unit(x)
            usage += torch.bincount(codes.flatten(), minlength=self.cfg.codebook_size)
            nll = self.prior.nll(codes) if prior_trained else torch.zeros(len(x), device=self.device)
            terms = [((recon - target) ** 2).flatten(1).mean(1), psnr(recon, target), nll]
            sums = sums + torch.stack([t.sum().double() for t in terms])
            n += len(x)
        tallies = [perplexity(usage), (usage == 0).sum(), self.quantizer.dead_codes(), self.quantizer.codes_restarted]
        mse, psnr_sum, prior_nll, test_perplexity, test_dead, dead, restarted = torch.cat(
            [sums, torch.stack([t.double() for t in tallies])]).tolist()
        codes_per_image = self.grid[0] * self.grid[1]
        metrics = {
            "test_mse": mse / n,
            "test_psnr": psnr_sum / n,
            "test_perplexity": test_perplexity,
            "test_dead_codes": int(test_dead),  # codes no test vector is assigned to
            "dead_codes": int(dead),  # unused in the last restart_window training steps
            "codes_restarted": int(restarted),
        }
        if prior_trained:
            metrics["test_prior_bits_per_code"] = prior_nll / (n * codes_per_image * math.log(2))
            # The rate term of the VQ-VAE bound, -log p(z) of the prior, spread over the image's dimensions.
            metrics["test_prior_bpd"] = prior_nll / (n * self.dims * math.log(2))
        return metrics

    @torch.no_grad()
    def sample(self, n: int, budget: float = 1.0) -> torch.Tensor:
        codes = self.prior.sample(n, self.grid, self.device)
        return torch.cat([self.decode_codes(c) for c in codes.split(DECODE_CHUNK)])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.codes(x))
