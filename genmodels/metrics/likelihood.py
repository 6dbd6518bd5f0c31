"""Log-densities and unit conversions shared by the likelihood-based models.

All densities are full normalised log-densities in nats (Gaussian constants included), over data dequantised to
[0, 1] as (x + u) / 256, so a bound on log p converts to bits/dim of the discrete 8-bit data by `nats_to_bpd`.
"""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, exp(log_scale)^2), summed over every dim but the first."""
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device)
    lp = -0.5 * ((x - mean) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * LOG_2PI
    return lp.flatten(1).sum(1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * z ** 2 - 0.5 * LOG_2PI).flatten(1).sum(1)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return gaussian_log_prob(z, mu, 0.5 * logvar)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form, per example."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def nats_to_bpd(nll_nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Negative log-likelihood of data in [0,1] (dequantised from 8 bits) -> bits per dimension of the 8-bit data.

    A density on [0,1]^D is 256^D times the density on [0,256)^D, hence the + 8.
    """
    return nll_nats / (dims * math.log(2)) + 8.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)
