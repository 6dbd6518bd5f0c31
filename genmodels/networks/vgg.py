"""Frozen VGG-19 features and the per-layer normalised perceptual distance of DFC-VAE (Hou et al. 2017)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from genmodels.errors import ResourceUnavailable

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
