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
import os
import re
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import torch
from torch import nn

from genmodels.base import ResourceUnavailable
from genmodels.data import dequantize, to_unit
from genmodels.likelihood import kl_standard_normal
from genmodels.vae import VAE, VAEConfig

LAYER_SETS = {
    "123": ("relu1_1", "relu2_1", "relu3_1"),
    "345": ("relu3_1", "relu4_1", "relu5_1"),
    "seed": ("relu1_2", "relu2_2", "relu3_4"),
}
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_weights_url() -> str:
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1.url


def vgg19_layer_names() -> list[str]:
    """Names of the modules of torchvision's vgg19().features, by index: conv1_1, relu1_1, ..., pool5."""
    names, block, conv = [], 1, 0
    for v in VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return names


def vgg19_features(upto: int) -> nn.Sequential:
    """torchvision's vgg19().features cut after module index `upto`, randomly initialised as torchvision does."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG19_CFG:
        if len(layers) > upto:
            break
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            conv = nn.Conv2d(c_in, v, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers[:upto + 1])


def vgg19_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """The VGG-19 weights `weights` names: "" = torchvision's IMAGENET1K_V1 (downloaded once into the torch hub
    cache), or a path to a saved state_dict of vgg19() or of vgg19().features. Memory-mapped, so loading the
    548 MB file to use its first layers costs little. Raises ResourceUnavailable, one line, when neither works."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ResourceUnavailable(f"VGG-19 weights file {path} not found; pass --vgg-weights PATH to a saved "
                                      f"torchvision vgg19 state_dict")
        source = str(path)
    else:
        url = vgg19_weights_url()
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        source = url
        if not path.is_file():
            match = torch.hub.HASH_REGEX.search(path.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None,
                                               progress=False)
            except Exception as e:  # URLError, socket errors, hash mismatches: all mean "not obtainable here"
                raise ResourceUnavailable(f"could not download the VGG-19 weights from {url} ({type(e).__name__}: "
                                          f"{e}); pass --vgg-weights PATH to a saved torchvision vgg19 state_dict"
                                          ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ResourceUnavailable(f"cannot read VGG-19 weights from {source} ({type(e).__name__}); pass "
                                  f"--vgg-weights PATH to a saved torchvision vgg19 state_dict") from None
    # vgg19().state_dict() has features.N.*; vgg19().features.state_dict() has N.*
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    return features or {k: v for k, v in state.items() if re.match(r"\d+\.", k)}


def load_vgg19(weights: str, upto: int) -> nn.Sequential:
    """Frozen VGG-19 features up to module `upto`; weights: "" (ImageNet), a PATH, or "random" (tests, smoke)."""
    net = vgg19_features(upto)
    if weights != "random":
        state = vgg19_state_dict(weights)
        needed = net.state_dict().keys()
        missing = sorted(set(needed) - set(state), key=lambda k: (int(k.split(".")[0]), k))
        if missing:
            raise ResourceUnavailable(f"VGG-19 weights {weights or 'IMAGENET1K_V1'} lack {missing[0]}; pass "
                                      f"--vgg-weights PATH to a saved torchvision vgg19 state_dict")
        net.load_state_dict({k: state[k] for k in needed})
    return net.eval().requires_grad_(False)


class PerceptualLoss:
    """Hou et al.'s feature loss on a frozen VGG-19; a plain object, so no module tree holds the VGG."""

    def __init__(self, layers: str, weights: str):
        if layers not in LAYER_SETS:
            raise ValueError(f"unknown layer set {layers!r}; choose one of {', '.join(LAYER_SETS)}")
        names = vgg19_layer_names()
        self.indices = [names.index(n) for n in LAYER_SETS[layers]]
        self.net = load_vgg19(weights, max(self.indices))
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __deepcopy__(self, memo: dict) -> PerceptualLoss:
        return self  # frozen: an EMA copy of the model can share it

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations at the layer set for images in [0, 1]; one channel is repeated to three."""
        if self.mean.device != x.device:  # follow the model to its device on first use
            self.net.to(x.device)
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in self.indices:
                out.append(h)
        return out

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example sum over layers of 1/(2 C H W) * squared feature error; gradients reach x_hat only."""
        with torch.no_grad():
            target = self.features(x)
        return sum(0.5 * ((f - t.to(f.dtype)) ** 2).flatten(1).mean(1).float()
                   for f, t in zip(self.features(x_hat), target))


@dataclasses.dataclass
class DFCConfig(VAEConfig):
    arch: str = "resnet"  # conv-small | conv | resnet (the DFC seed used the ResNet-VAE)
    norm: str = "group"
    learn_scale: bool = True  # fit the decoder sigma, so the likelihood metrics mean something with no pixel term
    alpha: float = 0.5  # perceptual weight (Hou et al. 0.5)
    layers: str = "123"  # 123 | 345 | seed
    pixel_weight: float = 0.0  # weight of the Gaussian pixel NLL (Hou et al. 0)
    vgg_weights: str = ""  # "" = torchvision IMAGENET1K_V1 (downloaded), a PATH to a state_dict, or "random"


class DFCVAE(VAE):
    Config = DFCConfig

    def __init__(self, cfg: DFCConfig, channels: int):
        super().__init__(cfg, channels)
        # In __dict__, not registered: out of state_dict (checkpoints), parameters() (optimizer, EMA) and .to()
        self.__dict__["perceptual"] = PerceptualLoss(cfg.layers, cfg.vgg_weights)

    @classmethod
    def prepare(cls, params: dict[str, Any], train_images: torch.Tensor | None = None) -> dict[str, Any]:
        """Download or check the VGG-19 weights once, before any trial starts."""
        weights = str(params.get("vgg_weights", cls.Config.vgg_weights))
        if weights != "random":
            vgg19_state_dict(weights)
        return {}

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xd = dequantize(x)
        mu, logvar = self.encode(xd)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        mean = self.decode(z)
        perceptual = self.perceptual(mean, to_unit(x))
        kl = kl_standard_normal(mu.float(), logvar.float())
        nll = -self.log_likelihood(xd, mean)
        per_image = self.cfg.alpha * perceptual + self.cfg.beta * kl + self.cfg.pixel_weight * nll
        if self.cfg.learn_scale:  # fits sigma only: the decoder mean is detached
            per_image = per_image - self.log_likelihood(xd, mean.detach())
        loss = per_image.mean() / self.dims
        return loss, {"perceptual": perceptual.mean(), "kl": kl.mean(), "recon_nll": nll.mean()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """The VAE family's metrics (test_bpd, test_iwae_bpd, ...) plus the unweighted perceptual distance of
        posterior-mean reconstructions."""
        batches = list(batches)
        metrics = super().evaluate(batches)
        total, n = 0.0, 0
        for x in batches:
            target = to_unit(x)
            total += self.perceptual(self.decode(self.encode(target)[0]), target).sum().item()
            n += len(x)
        metrics["test_perceptual"] = total / n
        return metrics
