"""Convolutional and residual VAE / beta-VAE with an explicit Gaussian decoder likelihood.

The seeds trained "SSE + beta*KL", which is a Gaussian decoder with sigma^2 = 0.5 and no constant: beta meant
nothing without sigma. Here the decoder scale is a config value (or learned), the training loss is
-E[log p(x|z)] + beta*KL with full densities, and evaluation reports the beta = 1 negative ELBO in bits/dim,
a true bound that ranks trials the same way whatever beta they trained with. Every VAE-family model (this one,
IWAE, DFC-VAE) also reports the importance-weighted bound L_k (Burda et al. 2016) with one evaluation k, a tighter
estimate of the test NLL, and the number of active latent units.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar, Iterable

import torch
from torch import nn

from genmodels.config import ModelConfig
from genmodels.data import dequantize, to_unit
from genmodels.metrics.latent import latent_grids
from genmodels.metrics.likelihood import (
    diag_gaussian_log_prob,
    gaussian_log_prob,
    kl_standard_normal,
    nats_to_bpd,
    psnr,
    standard_normal_log_prob,
)
from genmodels.models.base import GenerativeModel
from genmodels.networks.convnets import (
    ARCHS,
    conv_decoder,
    conv_encoder,
    resnet_decoder,
    resnet_encoder,
)

ACTIVE_UNIT_THRESHOLD = 1e-2  # Burda et al. 2016: unit i is active when Cov_x(E_q[z_i]) exceeds this


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
    arch: str = "conv"  # conv-small (3-32-64-128, the VAE seed) | conv (3-64-128-256-512, the beta-VAE seed) | resnet
    latent: int = 128
    width: int = 0  # first conv's channels; 0 = the arch's default
    blocks: int = 1  # resnet only: residual blocks per resolution (the first of each stage resamples)
    beta: float = 1.0
    likelihood_scale: float = 0.1  # decoder sigma, in units of [0,1] pixels
    learn_scale: bool = False  # learn one log-sigma instead
    norm: str = "batch"  # batch | group | none (IWAE training needs group or none; evaluation runs in eval mode)
    eval_k: int = 64  # importance samples of the test_iwae_bpd reported every epoch (same k for trials compared)
    final_eval_k: int = 1000  # importance samples of the end-of-trial NLL estimate (run by the trainable); 0: none
    choices: ClassVar = {"arch": tuple(ARCHS), "norm": ("batch", "group", "none")}
    ranges: ClassVar = {"latent": (1, None), "width": (0, None), "blocks": (1, None), "beta": (0, None),
                        "likelihood_scale": (0, None), "eval_k": (1, None), "final_eval_k": (0, None)}
    open_low: ClassVar = ("likelihood_scale",)


class VAE(GenerativeModel):
    Config = VAEConfig
    importance_weighted: ClassVar[bool] = False  # trained on L_k (IWAE): final images show best-weight samples
    full_only_metrics: ClassVar[tuple[str, ...]] = ("test_iwae_bpd", "test_iwae_nll")

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown VAE arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
        if cfg.blocks < 1 or (cfg.blocks != 1 and cfg.arch != "resnet"):
            raise ValueError(f"blocks={cfg.blocks}: blocks per stage is a setting of arch resnet (at least 1)")
        if cfg.eval_k < 1 or cfg.final_eval_k < 0:
            raise ValueError("eval_k must be at least 1 and final_eval_k at least 0")
        if cfg.arch == "resnet":
            self.encoder, self.feature_shape = resnet_encoder(channels, cfg.width, cfg.blocks, cfg.norm)
            self.decoder = resnet_decoder(channels, cfg.width, cfg.blocks, cfg.norm)
        else:
            self.encoder, self.feature_shape = conv_encoder(cfg.arch, channels, cfg.width, cfg.norm)
            self.decoder = conv_decoder(cfg.arch, channels, cfg.width, cfg.norm)
        self._init_heads(cfg, channels)

    def _init_heads(self, cfg: VAEConfig, channels: int) -> None:
        features = math.prod(self.feature_shape)
        self.to_posterior = nn.Linear(features, 2 * cfg.latent)
        self.from_latent = nn.Linear(cfg.latent, features)
        log_scale = torch.tensor(math.log(cfg.likelihood_scale))
        self.log_scale = nn.Parameter(log_scale) if cfg.learn_scale else nn.Buffer(log_scale)
        self.dims = channels * 32 * 32

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance for float images in [0, 1]."""
        mu, logvar = self.to_posterior(self.encoder(x * 2 - 1).flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder mean in [0, 1]."""
        h = self.from_latent(z).view(-1, *self.feature_shape)
        return torch.sigmoid(self.decoder(h))

    def log_likelihood(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per example, for dequantised x in [0, 1]."""
        return gaussian_log_prob(x.float(), mean.float(), self.log_scale.float())

    def _elbo_terms(self, xd: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One reparameterised pass over dequantised x: the posterior (mu, logvar), the decoder mean of a sample
        z ~ q(z|x), and per example -log p(x|z) and KL(q(z|x) || p(z)), the two terms of the negative ELBO. The
        training loss and the evaluation of every VAE-family model start here."""
        mu, logvar = self.encode(xd)
        mean = self.decode(mu + torch.randn_like(mu) * (0.5 * logvar).exp())
        return mu, logvar, mean, -self.log_likelihood(xd, mean), kl_standard_normal(mu.float(), logvar.float())

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, _, _, nll, kl = self._elbo_terms(dequantize(x))
        loss = (nll + self.cfg.beta * kl).mean() / self.dims  # per-dim nats keeps the lr scale-free
        return loss, {"recon_nll": nll.mean(), "kl": kl.mean()}

    def log_weights(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, k: int,
                    detach_posterior: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw k samples z ~ q(z|x) = N(mu, exp(logvar)) per example; return the log importance weights
        log p(x|z) + log p(z) - log q(z|x), shape (k, N), and z, shape (k, N, latent).

        Full normalised densities in fp32, so logsumexp of the weights is a bound in real nats. `detach_posterior`
        stops the gradient through q's parameters inside log q (DReG); z keeps its reparameterised gradient.
        """
        mu, logvar = mu.float(), logvar.float()
        z = mu + (0.5 * logvar).exp() * torch.randn(k, *mu.shape, device=mu.device)
        if detach_posterior:
            mu, logvar = mu.detach(), logvar.detach()
        zf = z.flatten(0, 1)
        xk = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        log_px = self.log_likelihood(xk, self.decode(zf))
        log_qz = diag_gaussian_log_prob(zf, mu.expand(k, *mu.shape).flatten(0, 1),
                                        logvar.expand(k, *logvar.shape).flatten(0, 1))
        return (log_px + standard_normal_log_prob(zf) - log_qz).view(k, len(x)), z

    @torch.no_grad()
    def iwae_bound(self, x: torch.Tensor, k: int, posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
                   chunk_decodes: int = 4096) -> torch.Tensor:
        """L_k = log (1/k) sum_i w_i per example, in nats, for dequantised x in [0, 1].

        The k samples are drawn in chunks of at most `chunk_decodes` decoder inputs, so k = 5000 needs no more
        memory than k = 64; only the (k, N) log weights are kept.
        """
        mu, logvar = posterior if posterior is not None else self.encode(x)
        per_chunk = max(1, chunk_decodes // len(x))
        log_w = torch.cat([self.log_weights(x, mu, logvar, min(per_chunk, k - start))[0]
                           for start in range(0, k, per_chunk)])
        return torch.logsumexp(log_w, 0) - math.log(k)

    @torch.no_grad()
    def iwae_bpd(self, batches: Iterable[torch.Tensor], k: int) -> float:
        """Importance-weighted estimate of the test NLL in bits/dim with k samples (an upper bound in expectation,
        tighter as k grows), over uint8 batches; evaluates in eval mode."""
        was_training = self.training
        self.eval()
        total, n = 0.0, 0
        for x in batches:
            total -= self.iwae_bound(dequantize(x), k).sum().item()
            n += len(x)
        self.train(was_training)
        return nats_to_bpd(total / n, self.dims)

    @torch.no_grad()
    def final_evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """The end-of-trial NLL estimate with `final_eval_k` importance samples (the same k for every trial; none
        at 0)."""
        k = self.cfg.final_eval_k
        if not k:
            return {}
        bpd = self.iwae_bpd(batches, k)
        return {"final_test_iwae_bpd": bpd, f"final_test_iwae_bpd_k{k}": bpd}

    @torch.no_grad()
    def final_images(self, test_images: torch.Tensor, out_dir: Path) -> dict[str, Path]:
        """Interpolations (linear, spherical), traversals of the most active latents, and for models trained on an
        importance-weighted bound, best-weight reconstructions."""
        return latent_grids(self, test_images, out_dir, best_weight=self.importance_weighted)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor], full: bool = True) -> dict[str, float]:
        """The beta = 1 negative ELBO (test_bpd) and its terms, reconstruction error and active units: two decoder
        passes per image. `full` adds the importance-weighted bound with eval_k samples (test_iwae_*), eval_k more
        passes. Sums stay on the device, read to the host once at the end."""
        k = self.cfg.eval_k
        names = ["neg_elbo", "kl", "recon_nll", "mse", "psnr"] + (["iwae_nll"] if full else [])
        sums = mu_sum = mu_sq_sum = 0
        n = 0
        for x in batches:
            xd = dequantize(x)
            mu, logvar, _, nll, kl = self._elbo_terms(xd)
            recon, target = self.decode(mu), to_unit(x)
            terms = [nll + kl, kl, nll, ((recon - target) ** 2).flatten(1).mean(1), psnr(recon, target)]
            if full:
                terms.append(-self.iwae_bound(xd, k, posterior=(mu, logvar)))
            sums = sums + torch.stack([t.sum().double() for t in terms])
            mu_sum = mu_sum + mu.double().sum(0)  # float64: the variance below is a difference of moments
            mu_sq_sum = mu_sq_sum + (mu.double() ** 2).sum(0)
            n += len(x)
        mu_var = mu_sq_sum / n - (mu_sum / n) ** 2
        active = (mu_var > ACTIVE_UNIT_THRESHOLD).sum().double()
        *means, active, scale = torch.cat([sums / n, torch.stack([active, self.log_scale.exp().double()])]).tolist()
        m = {f"test_{name}": v for name, v in zip(names, means)}
        m["test_bpd"] = nats_to_bpd(m["test_neg_elbo"], self.dims)
        if full:
            m["test_iwae_bpd"] = m[f"test_iwae_bpd_k{k}"] = nats_to_bpd(m["test_iwae_nll"], self.dims)
        m["test_active_units"], m["likelihood_scale"] = active, scale
        return m

    @torch.no_grad()
    def sample(self, n: int, budget: float = 1.0) -> torch.Tensor:
        return self.decode(torch.randn(n, self.cfg.latent, device=self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(to_unit(x))[0])
