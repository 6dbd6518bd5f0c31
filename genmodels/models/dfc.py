"""Deep-feature-consistent VAE (Hou et al. 2017): a VAE trained with a perceptual loss on a frozen VGG-19.

Loss per image: alpha * sum_l 1/(2 C_l H_l W_l) ||phi_l(x) - phi_l(x_hat)||^2 + beta * KL + pixel_weight * NLL,
where phi_l are VGG-19 activations at a layer set (`123`: relu1_1, relu2_1, relu3_1, Hou et al.'s VAE-123;
`345`: relu3_1, relu4_1, relu5_1, VAE-345; `seed`: relu1_2, relu2_2, relu3_4, what the seed used), x_hat the
decoder mean, and NLL the VAE's explicit Gaussian pixel likelihood (Hou et al. use no pixel term: weight 0).

The perceptual loss changes meaning with alpha, so DFC trials are ranked by a likelihood bound or by sample FID,
not by their training loss. For the bound to be meaningful when no pixel term trains the decoder scale, the scale
is learned by default from the pixel NLL of the (detached) decoder mean: it fits sigma without touching the
decoder. The VGG is frozen and large: it lives outside the module tree, so it is neither in the state_dict
(checkpoints), nor in parameters() (optimizer, EMA), and it is shared, not copied, by the EMA copy.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import torch

from genmodels.data import dequantize, to_unit
from genmodels.models.vae import VAE, VAEConfig
from genmodels.networks.vgg import LAYER_SETS, PerceptualLoss, vgg19_state_dict

if TYPE_CHECKING:
    from genmodels.config import TrialConfig


@dataclasses.dataclass(frozen=True)
class DFCConfig(VAEConfig):
    arch: str = "resnet"  # conv-small | conv | resnet (the DFC seed used the ResNet-VAE)
    norm: str = "group"
    learn_scale: bool = True  # fit the decoder sigma, so the likelihood metrics mean something with no pixel term
    alpha: float = 0.5  # perceptual weight (Hou et al. 0.5)
    layers: str = "123"  # 123 | 345 | seed
    pixel_weight: float = 0.0  # weight of the Gaussian pixel NLL (Hou et al. 0)
    vgg_weights: str = ""  # "" = torchvision IMAGENET1K_V1 (downloaded), a PATH to a state_dict, or "random"
    choices: ClassVar = {**VAEConfig.choices, "layers": tuple(LAYER_SETS)}
    ranges: ClassVar = {**VAEConfig.ranges, "alpha": (0, None), "pixel_weight": (0, None)}


class DFCVAE(VAE):
    Config = DFCConfig

    def __init__(self, cfg: DFCConfig, channels: int):
        super().__init__(cfg, channels)
        # In __dict__, not registered: out of state_dict (checkpoints), parameters() (optimizer, EMA) and .to()
        self.__dict__["perceptual"] = PerceptualLoss(cfg.layers, cfg.vgg_weights)

    @classmethod
    def prepare(cls, cfg: TrialConfig, train_images: torch.Tensor | None = None) -> dict[str, Any]:
        """Download or check the VGG-19 weights once, before any trial starts."""
        weights = cfg.model.vgg_weights
        if weights != "random":
            vgg19_state_dict(weights)
        return {}

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xd = dequantize(x)
        _, _, mean, nll, kl = self._elbo_terms(xd)
        perceptual = self.perceptual(mean, to_unit(x))
        per_image = self.cfg.alpha * perceptual + self.cfg.beta * kl + self.cfg.pixel_weight * nll
        if self.cfg.learn_scale:  # fits sigma only: the decoder mean is detached
            per_image = per_image - self.log_likelihood(xd, mean.detach())
        loss = per_image.mean() / self.dims
        return loss, {"perceptual": perceptual.mean(), "kl": kl.mean(), "recon_nll": nll.mean()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor], full: bool = True) -> dict[str, float]:
        """The VAE family's metrics (test_bpd, with `full` test_iwae_bpd, ...) plus the unweighted perceptual
        distance of posterior-mean reconstructions, the curve of what DFC trains: kept when not `full`."""
        batches = list(batches)
        metrics = super().evaluate(batches, full=full)
        total, n = 0, 0
        for x in batches:
            target = to_unit(x)
            total = total + self.perceptual(self.decode(self.encode(target)[0]), target).sum().double()
            n += len(x)
        metrics["test_perceptual"] = (total / n).item()
        return metrics
