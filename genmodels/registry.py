"""Models registered by name. Adding a model: one file in genmodels/ and one line here."""
from __future__ import annotations

import importlib
from typing import Any

from genmodels.base import GenerativeModel, config_from_dict

MODELS: dict[str, str] = {
    "vae": "genmodels.vae:VAE",
    "vqvae": "genmodels.vqvae:VQVAE",
    "ncsn": "genmodels.ncsn:NCSN",
    "iwae": "genmodels.iwae:IWAE",
    "dfc": "genmodels.dfc:DFCVAE",
}


def model_class(name: str) -> type[GenerativeModel]:
    try:
        module, cls = MODELS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, params: dict[str, Any], channels: int) -> GenerativeModel:
    """Build model `name` from a flat dict (unknown keys are left for the engine and the trainable)."""
    cls = model_class(name)
    return cls(config_from_dict(cls.Config, params), channels)
