"""Importance-weighted autoencoder (Burda et al. 2016), with the DReG gradient estimator (Tucker et al. 2018).

Trains on L_k = E[log (1/k) sum_i w_i], w_i = p(x, z_i) / q(z_i | x), z_i ~ q(z | x), computed with logsumexp over
full log-densities, so the training bound is in real nats (the seed dropped the 2823-nat Gaussian constant).
The networks are the VAE's (any arch); BatchNorm is refused because in training mode it makes each importance
weight depend on the rest of the batch, and the per-datapoint bound no longer holds.

DReG: the IWAE gradient of the encoder has a score-function part whose signal-to-noise ratio falls as k grows
(Rainforth et al. 2018). Tucker et al. rewrite it by reparameterising twice: encoder gradient
sum_i w~_i^2 d log w_i / dz_i dz_i / dphi with q's parameters held fixed inside log q, where w~ are the normalised
weights; the decoder keeps the IWAE gradient sum_i w~_i d log w_i / dtheta. Both estimators optimise the same bound.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from genmodels.data import dequantize
from genmodels.models.vae import VAE, VAEConfig

ESTIMATORS = ("iwae", "dreg")


@dataclasses.dataclass(frozen=True)
class IWAEConfig(VAEConfig):
    norm: str = "group"  # group | none; batch is refused (see the module docstring)
    k: int = 5  # importance samples per training example; k = 1 is the VAE's ELBO
    estimator: str = "iwae"  # iwae | dreg: gradient estimator of the encoder
    choices: ClassVar = {**VAEConfig.choices, "norm": ("group", "none"), "estimator": ESTIMATORS}
    # group | none only: in training mode BatchNorm couples a batch's importance weights, and the per-example
    # bound no longer holds. beta is 1: IWAE trains the unweighted bound L_k.
    ranges: ClassVar = {**VAEConfig.ranges, "k": (1, None), "beta": (1, 1)}


class IWAE(VAE):
    Config = IWAEConfig
    importance_weighted = True

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xd = dequantize(x)
        mu, logvar = self.encode(xd)
        dreg = self.cfg.estimator == "dreg"
        log_w, z = self.log_weights(xd, mu, logvar, self.cfg.k, detach_posterior=dreg)
        bound = torch.logsumexp(log_w, 0) - math.log(self.cfg.k)  # (N,) nats
        weights = torch.softmax(log_w.detach(), 0)  # normalised importance weights w~, (k, N)
        value = -bound.mean() / self.dims  # per-dim nats keeps the lr scale-free
        if dreg:
            # d(sum_i w~_i log w_i) gives the decoder its IWAE gradient; the hook turns the encoder's pathwise
            # gradient w~_i d log w_i/dz_i into DReG's w~_i^2 d log w_i/dz_i (log q already has q's parameters held).
            z.register_hook(lambda grad: grad * weights.unsqueeze(-1))
            surrogate = -(weights * log_w).sum(0).mean() / self.dims
            loss = value.detach() + (surrogate - surrogate.detach())  # the bound's value, DReG's gradient
        else:
            loss = value
        ess = 1.0 / (weights ** 2).sum(0)  # effective sample size of the k weights, 1..k
        return loss, {"bound_nats": bound.mean().detach(), "ess": ess.mean()}
