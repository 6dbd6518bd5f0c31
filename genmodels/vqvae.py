"""VQ-VAE (van den Oord et al. 2017) with an EMA codebook, dead-code restarts and a gated PixelCNN prior.

The seed's "EMA" VQ-VAE had no EMA, no dead-code handling (about 23 of 512 codes in use at initialisation) and no
prior, so it could only reconstruct. Here the codebook follows exponential moving averages of the encoder outputs
assigned to each code (Laplace-smoothed counts, as in Sonnet's VectorQuantizerEMA), codes unused for
`restart_window` training steps are re-seeded from the latest encoder outputs, and a PixelCNN over the 8x8 code
grid makes the model generate.

One trial runs both stages on the one engine: epochs [0, stage1_epochs) train the autoencoder and codebook, epochs
[stage1_epochs, stage1_epochs + prior_epochs) train only the prior on the codes of the training batches, with
everything else frozen (no gradients, so Adam leaves it alone; eval mode, so the codebook EMA stops). The trial's
`epochs` must be the sum: `prepare` checks it before a sweep starts.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from genmodels.base import GenerativeModel, ModelConfig
from genmodels.data import to_unit
from genmodels.likelihood import psnr
from genmodels.pixelcnn import GatedPixelCNN

LAPLACE_EPS = 1e-5  # pseudo-count added to every cluster size, so a code that loses its vectors never divides by 0
KMEANS_ITERS = 10
DECODE_CHUNK = 1024  # images decoded at once by sample(), to bound memory when the FID asks for thousands


@dataclasses.dataclass
class VQVAEConfig(ModelConfig):
    codebook_size: int = 512  # K
    code_dim: int = 64  # D
    beta: float = 0.25  # commitment weight
    codebook: str = "ema"  # ema (moving averages of assigned encoder outputs) | loss (trained by ||sg(z_e) - e||^2)
    ema_decay_codebook: float = 0.99  # decay of the codebook averages (not the engine's `ema_decay` of weights)
    kmeans_init: bool = False  # initialise the codebook by k-means on the encoder outputs of the first batch
    restarts: bool = True  # re-seed codes unused for `restart_window` steps from the latest encoder outputs
    restart_window: int = 100  # training steps
    width: int = 128  # channels after the second stride-2 conv (the first has width // 2)
    res_blocks: int = 2
    stage1_epochs: int = 10  # autoencoder + codebook
    prior_epochs: int = 10  # PixelCNN prior on the frozen codes; the trial's `epochs` must be the sum
    prior_width: int = 64
    prior_layers: int = 6


def check_stage_epochs(params: dict[str, Any]) -> None:
    """Raise ValueError unless epochs == stage1_epochs + prior_epochs (values that are search domains are skipped)."""
    defaults = VQVAEConfig()
    stage1 = params.get("stage1_epochs", defaults.stage1_epochs)
    prior = params.get("prior_epochs", defaults.prior_epochs)
    epochs = params.get("epochs")
    values = (stage1, prior, epochs)
    if all(isinstance(v, numbers.Number) for v in values) and int(epochs) != int(stage1) + int(prior):
        raise ValueError(f"vqvae: epochs ({epochs}) must equal stage1_epochs ({stage1}) + prior_epochs ({prior}); "
                         f"set all three together")


def code_counts(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each code occurs. torch.bincount on CUDA reads the indices' min and max on the host first (two syncs
    per training step); an index_add into a fixed-size histogram never leaves the device."""
    flat = codes.flatten()
    return torch.zeros(num_codes, dtype=torch.long, device=codes.device).index_add_(0, flat, torch.ones_like(flat))


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code usage histogram: K when all codes are used equally, 1 when one code takes all."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))). The activations are not in-place: the seed's in-place ReLU turned the
    skip into relu(x) and the block into relu(x) + F(relu(x))."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.residual = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


def vq_encoder(channels: int, width: int, res_blocks: int, code_dim: int) -> nn.Sequential:
    """32x32 images -> (code_dim, 8, 8): two stride-2 4x4 convs, a 3x3 conv, residual blocks, a 1x1 to code_dim."""
    hidden = max(width // 4, 1)  # residual hidden channels: 32 for width 128, as in Sonnet's VQ-VAE example
    return nn.Sequential(
        nn.Conv2d(channels, width // 2, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(width // 2, width, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        *[ResidualBlock(width, hidden) for _ in range(res_blocks)], nn.ReLU(),
        nn.Conv2d(width, code_dim, 1))


def vq_decoder(channels: int, width: int, res_blocks: int, code_dim: int) -> nn.Sequential:
    """Mirror of `vq_encoder`; linear output (images in [0, 1] are clamped only when returned)."""
    hidden = max(width // 4, 1)
    return nn.Sequential(
        nn.Conv2d(code_dim, width, 3, padding=1),
        *[ResidualBlock(width, hidden) for _ in range(res_blocks)], nn.ReLU(),
        nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(width // 2, channels, 4, 2, 1))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser of (N, D, H, W) vectors with a K x D codebook and straight-through gradients.

    `forward` is the training path (updates the EMA codebook and the usage counters when in training mode);
    `nearest` and `embed` have no side effects and serve evaluation, reconstruction and the prior.
    """

    def __init__(self, num_codes: int, dim: int, mode: str = "ema", decay: float = 0.99, kmeans_init: bool = False,
                 restart_window: int = 100):
        super().__init__()
        if mode not in ("ema", "loss"):
            raise ValueError(f"unknown codebook {mode!r}; choose ema or loss")
        self.num_codes, self.dim, self.mode, self.decay = num_codes, dim, mode, decay
        self.restart_window = restart_window
        # Small codes near the origin: the nearest one to an encoder output is then decided by direction, not by
        # which random code happens to have the smallest norm (a unit-normal codebook gives 1 code in use at init).
        init = (torch.rand(num_codes, dim) * 2 - 1) / num_codes
        if mode == "ema":
            self.register_buffer("codebook", init)
            # As if every code had been assigned once at its initial position: an unused code then stays put
            # (its count and sum decay together) instead of collapsing to 0 on the first update.
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("code_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("codes_restarted", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self._kmeans_pending = kmeans_init  # host-side flag, so the buffer is read (a sync) only once
        self._recent: torch.Tensor | None = None  # encoder outputs of the latest training batch, for restarts

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of (M, D)."""
        cb = self.codebook.detach().float()
        flat = flat.detach().float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)
        return dist.argmin(1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, H, W) code indices -> (N, D, H, W) code vectors."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """(N, D, H, W) encoder outputs -> (N, H, W) code indices."""
        n, d, h, w = z_e.shape
        return self.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantised vectors with straight-through gradients, code indices (N, H, W), and the loss terms
        `commitment` (||z_e - sg(e)||^2, to be weighted by beta) and `codebook` (||sg(z_e) - e||^2; 0 for EMA)."""
        with torch.autocast(z_e.device.type, enabled=False):  # distances and averages in fp32 under bf16 autocast
            z = z_e.float()
            n, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            if self.training and self._kmeans_pending:
                self._kmeans_pending = False
                if not bool(self.initialised):
                    self.kmeans_init_(flat.detach())
            codes = self.nearest(flat)
            z_q = self.embed(codes.view(n, h, w))
            if self.training:
                self._track(flat.detach(), codes)
            terms = {"commitment": F.mse_loss(z, z_q.detach())}
            terms["codebook"] = F.mse_loss(z_q, z.detach()) if self.mode == "loss" else torch.zeros((), device=z.device)
            z_st = z + (z_q - z).detach()
        return z_st, codes.view(n, h, w), terms

    @torch.no_grad()
    def _track(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        counts = code_counts(codes, self.num_codes)
        self.unused_steps.add_(1).mul_(counts == 0)
        self._recent = flat
        if self.mode == "ema":
            sums = torch.zeros_like(self.code_sum).index_add_(0, codes, flat)
            self.cluster_size.lerp_(counts.float(), 1 - self.decay)
            self.code_sum.lerp_(sums, 1 - self.decay)
            self.codebook.copy_(self.code_sum / self._smoothed_sizes()[:, None])

    def _smoothed_sizes(self) -> torch.Tensor:
        n = self.cluster_size.sum()
        return (self.cluster_size + LAPLACE_EPS) / (n + self.num_codes * LAPLACE_EPS) * n

    @torch.no_grad()
    def kmeans_init_(self, flat: torch.Tensor, iters: int = KMEANS_ITERS) -> None:
        """Set the codebook to k-means centroids of `flat` (M, D), seeded by K random rows."""
        m = len(flat)
        pick = torch.randperm(m, device=flat.device)[:self.num_codes] if m >= self.num_codes else \
            torch.randint(m, (self.num_codes,), device=flat.device)
        centroids = flat[pick].clone()
        counts = torch.zeros(self.num_codes, device=flat.device)
        for _ in range(iters):
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ centroids.t() + centroids.pow(2).sum(1)
            codes = dist.argmin(1)
            counts = torch.bincount(codes, minlength=self.num_codes).float()
            sums = torch.zeros_like(centroids).index_add_(0, codes, flat)
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        self.codebook.copy_(centroids)
        if self.mode == "ema":
            self.cluster_size.copy_(counts.clamp_min(1))
            self.code_sum.copy_(centroids * self.cluster_size[:, None])
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self) -> None:
        """Re-seed every code unused for `restart_window` training steps with a random encoder output of the latest
        training batch. No host sync: dead codes are replaced through a mask. (With codebook=loss, Adam's moments
        of a restarted row are left as they are.)"""
        if self._recent is None:
            return
        dead = self.unused_steps >= self.restart_window
        recent = self._recent
        picks = recent[torch.randint(len(recent), (self.num_codes,), device=recent.device)]
        self.codebook.copy_(torch.where(dead[:, None], picks, self.codebook))
        if self.mode == "ema":
            self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))
            self.code_sum.copy_(torch.where(dead[:, None], picks, self.code_sum))
        self.unused_steps.masked_fill_(dead, 0)
        self.codes_restarted.add_(dead.sum())

    def dead_codes(self) -> torch.Tensor:
        """Codes no training vector was assigned to in the last `restart_window` steps."""
        return (self.unused_steps >= self.restart_window).sum()


class VQVAE(GenerativeModel):
    Config = VQVAEConfig

    def __init__(self, cfg: VQVAEConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.width < 2 or cfg.res_blocks < 0 or cfg.stage1_epochs < 0 or cfg.prior_epochs < 0:
            raise ValueError("vqvae: width >= 2, res_blocks >= 0 and non-negative stage epochs required")
        self.encoder = vq_encoder(channels, cfg.width, cfg.res_blocks, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.codebook, cfg.ema_decay_codebook,
                                         cfg.kmeans_init, cfg.restart_window)
        self.decoder = vq_decoder(channels, cfg.width, cfg.res_blocks, cfg.code_dim)
        self.prior = GatedPixelCNN(cfg.codebook_size, cfg.prior_width, cfg.prior_layers)
        self.grid = (8, 8)
        self.dims = channels * 32 * 32
        self.stage = 1  # training stage, derived from the epoch by start_epoch (so a resumed run gets it back)

    @classmethod
    def prepare(cls, params: dict[str, Any], train_images: torch.Tensor | None = None) -> dict[str, Any]:
        check_stage_epochs(params)
        return {}

    @property
    def autoencoder(self) -> tuple[nn.Module, ...]:
        return self.encoder, self.quantizer, self.decoder

    def start_epoch(self, epoch: int) -> None:
        self.set_stage(2 if epoch >= self.cfg.stage1_epochs else 1)

    def set_stage(self, stage: int) -> None:
        """Stage 1 trains encoder, codebook and decoder; stage 2 freezes them (no grads, eval mode) for the prior."""
        self.stage = stage
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
        if self.stage == 1 and self.cfg.restarts:
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
        loss = mse + self.cfg.beta * terms["commitment"] + terms["codebook"]
        counts = code_counts(codes, self.cfg.codebook_size)
        logs = {"recon_mse": mse, "commitment": terms["commitment"], "perplexity": perplexity(counts)}
        if self.cfg.codebook == "loss":
            logs["codebook_loss"] = terms["codebook"]
        return loss, logs

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        usage = torch.zeros(self.cfg.codebook_size, dtype=torch.long, device=self.device)
        mse = psnr_sum = prior_nll = 0.0
        n = 0
        for x in batches:
            codes = self.codes(x)
            recon, target = self.decode_codes(codes), to_unit(x)
            usage += torch.bincount(codes.flatten(), minlength=self.cfg.codebook_size)
            mse += ((recon - target) ** 2).flatten(1).mean(1).sum().item()
            psnr_sum += psnr(recon, target).sum().item()
            prior_nll += self.prior.nll(codes).sum().item()
            n += len(x)
        codes_per_image = self.grid[0] * self.grid[1]
        return {
            "test_mse": mse / n,
            "test_psnr": psnr_sum / n,
            "test_perplexity": perplexity(usage).item(),
            "test_dead_codes": int((usage == 0).sum()),  # codes no test vector is assigned to
            "test_prior_bits_per_code": prior_nll / (n * codes_per_image * math.log(2)),
            # The rate term of the VQ-VAE bound, -log p(z) of the prior, spread over the image's dimensions.
            "test_prior_bpd": prior_nll / (n * self.dims * math.log(2)),
            "dead_codes": int(self.quantizer.dead_codes()),  # unused in the last restart_window training steps
            "codes_restarted": int(self.quantizer.codes_restarted),
        }

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        codes = self.prior.sample(n, self.grid, self.device)
        return torch.cat([self.decode_codes(c) for c in codes.split(DECODE_CHUNK)])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.codes(x))
