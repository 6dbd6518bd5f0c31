"""Convolutional VAE / beta-VAE with an explicit Gaussian decoder likelihood.

The seeds trained "SSE + beta*KL", which is a Gaussian decoder with sigma^2 = 0.5 and no constant: beta meant
nothing without sigma. Here the decoder scale is a config value (or learned), the training loss is
-E[log p(x|z)] + beta*KL with full densities, and evaluation reports the beta = 1 negative ELBO in bits/dim,
a true bound that ranks trials the same way whatever beta they trained with.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from genmodels.base import GenerativeModel, ModelConfig
from genmodels.data import dequantize, to_unit
from genmodels.likelihood import gaussian_log_prob, kl_standard_normal, nats_to_bpd, psnr

# (default first width, kernel, number of stride-2 stages); widths double per stage
ARCHS = {"conv-small": (32, 3, 3), "conv": (64, 4, 4)}


@dataclasses.dataclass
class VAEConfig(ModelConfig):
    arch: str = "conv"  # conv-small (3-32-64-128, the VAE seed) | conv (3-64-128-256-512, the beta-VAE seed)
    latent: int = 128
    width: int = 0  # first conv's channels; 0 = the arch's default
    beta: float = 1.0
    likelihood_scale: float = 0.1  # decoder sigma, in units of [0,1] pixels
    learn_scale: bool = False  # learn one log-sigma instead
    norm: str = "batch"  # batch | group | none (group or none for models that report importance-weighted bounds)


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose batch, group or none")


def conv_encoder(arch: str, channels: int, width: int, norm: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """Stride-2 conv stack; returns the module and its output shape (C, H, W)."""
    default_width, k, stages = ARCHS[arch]
    w = width or default_width
    layers, c_in = [], channels
    for i in range(stages):
        c_out = w * 2 ** i
        layers += [nn.Conv2d(c_in, c_out, k, 2, (k - 1) // 2), norm_layer(norm, c_out), nn.LeakyReLU(0.2)]
        c_in = c_out
    side = 32 // 2 ** stages
    return nn.Sequential(*layers), (c_in, side, side)


def conv_decoder(arch: str, channels: int, width: int, norm: str) -> nn.Module:
    """Mirror of `conv_encoder` with transposed convs; the last layer outputs `channels` logits."""
    default_width, _, stages = ARCHS[arch]
    w = width or default_width
    layers = []
    for i in reversed(range(1, stages)):
        c_in, c_out = w * 2 ** i, w * 2 ** (i - 1)
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), norm_layer(norm, c_out), nn.LeakyReLU(0.2)]
    layers.append(nn.ConvTranspose2d(w, channels, 4, 2, 1))
    return nn.Sequential(*layers)


class VAE(GenerativeModel):
    Config = VAEConfig

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__(cfg, channels)
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown VAE arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
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

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xd = dequantize(x)
        mu, logvar = self.encode(xd)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        nll = -self.log_likelihood(xd, self.decode(z))
        kl = kl_standard_normal(mu.float(), logvar.float())
        loss = (nll + self.cfg.beta * kl).mean() / self.dims  # per-dim nats keeps the lr scale-free
        return loss, {"recon_nll": nll.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        totals = {"neg_elbo": 0.0, "kl": 0.0, "recon_nll": 0.0, "mse": 0.0, "psnr": 0.0}
        n = 0
        for x in batches:
            xd = dequantize(x)
            mu, logvar = self.encode(xd)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            nll = -self.log_likelihood(xd, self.decode(z))
            kl = kl_standard_normal(mu, logvar)
            recon = self.decode(mu)
            target = to_unit(x)
            totals["neg_elbo"] += (nll + kl).sum().item()
            totals["kl"] += kl.sum().item()
            totals["recon_nll"] += nll.sum().item()
            totals["mse"] += ((recon - target) ** 2).flatten(1).mean(1).sum().item()
            totals["psnr"] += psnr(recon, target).sum().item()
            n += len(x)
        m = {f"test_{k}": v / n for k, v in totals.items()}
        m["test_bpd"] = nats_to_bpd(m["test_neg_elbo"], self.dims)
        m["likelihood_scale"] = self.log_scale.exp().item()
        return m

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.decode(torch.randn(n, self.cfg.latent, device=self.device))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(to_unit(x))[0])
