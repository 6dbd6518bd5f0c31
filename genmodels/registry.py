"""Models registered by name. Adding a model: one file in genmodels/models/ and one line here."""
from __future__ import annotations

import importlib
from typing import Any

from genmodels.config import ConfigError, TrialConfig, qualify
from genmodels.models.base import GenerativeModel

MODELS: dict[str, str] = {
    "vae": "genmodels.models.vae:VAE",
    "vqvae": "genmodels.models.vqvae:VQVAE",
    "ncsn": "genmodels.models.ncsn:NCSN",
    "iwae": "genmodels.models.iwae:IWAE",
    "dfc": "genmodels.models.dfc:DFCVAE",
}


def model_class(name: str) -> type[GenerativeModel]:
    try:
        module, cls = MODELS[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None
    return getattr(importlib.import_module(module), cls)


def trial_config(settings: dict[str, Any], model_name: str | None = None) -> TrialConfig:
    """A strictly checked TrialConfig from flat settings (qualified keys or unique bare names), defaults filled."""
    name = model_name or settings.get("model_name")
    if not name:
        raise ConfigError("the settings name no model (model_name)")
    return TrialConfig.from_flat(settings, name, model_class(name).Config)


def qualified(model_name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with every key in its `section.field` form; values untouched (they may be search domains)."""
    return qualify(model_name, model_class(model_name).Config, settings)


def build_model(model_name: str, settings: dict[str, Any], channels: int) -> GenerativeModel:
    """The model alone, from flat settings (model keys; data and train keys are checked and ignored)."""
    return model_class(model_name)(trial_config(settings, model_name).model, channels)
