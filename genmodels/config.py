"""The trial config: typed `data`, `train` and `model` sections, strict about every key and value.

Each section is a dataclass; a field's annotation is its type, `choices` and `ranges` (class attributes) bound its
values. A trial's config is flattened to `section.field` keys only where a flat dict is needed: Ray Tune's param
space, W&B's config table, `--fixed` on the command line. `TrialConfig.from_flat` reads such a dict back and
rejects an unknown key with one line naming the close matches, and a value of the wrong type or out of range with
one line naming the field and what it accepts. A bare field name (`beta`) is accepted where it names exactly one
field of the model's sections, so `--fixed beta=4` works as well as `--fixed model.beta=4`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

SECTIONS = ("data", "train", "model")
NONE = ("none", "null")  # how a command line or a JSON-less source says None for an optional field
TOP_LEVEL = ("model_name", "checkpoint")  # keys outside the sections


class ConfigError(ValueError):
    """A config key or value is wrong; the message is one line that says what is wrong and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of every config section. `choices[field]` lists allowed values, `ranges[field]` is (low, high), either
    bound None for open, inclusive unless the field is named in `open_low` (then value > low)."""
    choices: ClassVar[dict[str, tuple]] = {}
    ranges: ClassVar[dict[str, tuple]] = {}
    open_low: ClassVar[tuple[str, ...]] = ()


class ModelConfig(Section):
    """Base of each model's config section."""

    def unused(self) -> dict[str, str]:
        """The fields this config's other values make the model ignore, each with why (none by default): a value
        pinned for one of them would change nothing the trial computes."""
        return {}


DATASETS = ("cifar10", "fashion_mnist", "synthetic")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    dataset: str = "cifar10"
    data_dir: str = ""  # "" = $GENSWEEP_DATA or ~/.cache/gensweep/data
    train_size: int = 0  # use only the first N training images; 0 = all
    test_size: int = 0  # use only the first N test images; 0 = all
    choices: ClassVar = {"dataset": DATASETS}
    ranges: ClassVar = {"train_size": (0, None), "test_size": (0, None)}


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    ema_decay: float = 0.0  # 0 = no EMA copy of the weights
    steps_per_epoch: int = 0  # 0 = one pass over the training split; otherwise a fixed report interval
    eval_images: int = 0  # test images per evaluation; 0 = the whole test split
    # test images of the cheap evaluation (Experiment.run's epochs that need no full one: a sweep's epochs between
    # ASHA's milestones), the first N, the same for every trial; 0 = a full evaluation every epoch
    eval_subset: int = 256
    seed: int = 0
    flip: bool = True
    amp: bool = True  # bf16 autocast, on CUDA only
    memory_format: str = "auto"  # auto (channels_last on CUDA, contiguous on CPU) | channels_last | contiguous
    compile: bool = False  # torch.compile the loss; costs tens of seconds up front (docs/PERFORMANCE.md)
    compile_mode: str = "default"  # torch.compile's mode; the two with Inductor's own CUDA graphs turn cuda_graphs off
    # on CUDA, capture the whole training step (and NCSN's Langevin step) in a CUDA graph and replay it. Off until a
    # GPU check shows every model's capture passing its self-check and the CUDA tests green (docs/PERFORMANCE.md)
    cuda_graphs: bool = False
    choices: ClassVar = {"memory_format": ("auto", "channels_last", "contiguous"),
                         "compile_mode": ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")}
    ranges: ClassVar = {"epochs": (1, None), "batch_size": (1, None), "lr": (0, None), "weight_decay": (0, None),
                        "grad_clip": (0, None), "ema_decay": (0, 1), "steps_per_epoch": (0, None),
                        "eval_images": (0, None), "eval_subset": (0, None), "seed": (0, None)}
    open_low: ClassVar = ("lr",)


# Cached per class: resolving a class's type hints costs about 0.2 ms, and building one trial's config asks for them
# some 80 times (13 ms a trial uncached, paid by each trial's start and by the driver's W&B hook at each trial start).
@functools.cache
def fields_of(cls: type[Section]) -> Mapping[str, type]:
    """Field name -> Python type (int, float, bool or str) of a section class; `int | None` gives int (see
    `optional_fields`)."""
    hints = typing.get_type_hints(cls)
    return types.MappingProxyType({f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)})


@functools.cache
def optional_fields(cls: type[Section]) -> frozenset[str]:
    """Fields annotated `X | None`: None says "not set" (no 0 sentinels), and the command line spells it `none`."""
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in dataclasses.fields(cls) if type(None) in typing.get_args(hints[f.name]))


def _base_type(hint: Any) -> type:
    kinds = [a for a in typing.get_args(hint) if a is not type(None)]
    return kinds[0] if kinds else hint


def check_value(section: type[Section], key: str, value: Any, label: str | None = None) -> Any:
    """`value` cast to the field's type and checked against its choices and range; ConfigError otherwise."""
    label = label or key
    kind = fields_of(section)[key]
    if key in optional_fields(section) and (value is None or (isinstance(value, str) and value.lower() in NONE)):
        return None
    value = _cast(value, kind, label)
    choices = section.choices.get(key)
    if choices is not None and value not in choices:
        raise ConfigError(f"{label} must be one of {', '.join(map(str, choices))}, got {value!r}")
    low, high = section.ranges.get(key, (None, None))
    if low is not None and (value <= low if key in section.open_low else value < low):
        raise ConfigError(f"{label} must be {'>' if key in section.open_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{label} must be <= {high}, got {value!r}")
    return value


def _cast(value: Any, kind: type, label: str) -> Any:
    # Ray and Optuna hand back numpy scalars, the CLI strings and Python literals: normalise to the declared type.
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if value in (0, 1):
            return bool(value)
        raise ConfigError(f"{label} must be true or false, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{label} must be a string, got {value!r}")
    try:
        if isinstance(value, bool) or (isinstance(value, str) and kind is int and not value.lstrip("-").isdigit()):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and isinstance(value, float) and number != value:
        raise ConfigError(f"{label} must be an integer, got {value!r}")
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{label} must be a finite number, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """Everything one trial (or one `genmodels.train` run) computes from."""
    model_name: str
    data: DataConfig
    train: TrainConfig
    model: ModelConfig
    checkpoint: str = ""  # a trained run's state.pt to evaluate instead of training (sampling-only spaces)

    def flat(self) -> dict[str, Any]:
        """`section.field` keys for every field, defaults included."""
        out: dict[str, Any] = {"model_name": self.model_name}
        for name in SECTIONS:
            out.update({f"{name}.{k}": v for k, v in dataclasses.asdict(getattr(self, name)).items()})
        if self.checkpoint:
            out["checkpoint"] = self.checkpoint
        return out

    def replace(self, section: str, **values: Any) -> TrialConfig:
        """A copy with some fields of one section changed (checked like any other value)."""
        cls = type(getattr(self, section))
        checked = {k: check_value(cls, k, v, f"{section}.{k}") for k, v in values.items()}
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **checked)})

    @classmethod
    def from_flat(cls, flat: dict[str, Any], model_name: str, model_config: type[ModelConfig]) -> TrialConfig:
        """Read a flat dict strictly: every key must name a field (qualified or a unique bare name).
        (genmodels.registry.trial_config looks the model's config class up by name.)"""
        classes = section_classes(model_config)
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in flat.items():
            if key in TOP_LEVEL:
                continue
            section, field = resolve_key(model_name, model_config, key)
            values[section][field] = check_value(classes[section], field, value, f"{section}.{field}")
        sections = {name: classes[name](**values[name]) for name in SECTIONS}
        return cls(model_name=model_name, checkpoint=str(flat.get("checkpoint") or ""), **sections)


def section_classes(model_config: type[ModelConfig]) -> dict[str, type[Section]]:
    return {"data": DataConfig, "train": TrainConfig, "model": model_config}


def resolve_key(model_name: str, model_config: type[ModelConfig], key: str) -> tuple[str, str]:
    """(section, field) for a qualified key (`model.beta`) or a bare field name that exists in one section only."""
    classes = section_classes(model_config)
    known = {f"{s}.{f}" for s, c in classes.items() for f in fields_of(c)}
    if key in known:
        section, field = key.split(".", 1)
        return section, field
    owners = [s for s, c in classes.items() if key in fields_of(c)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(f"{key} is ambiguous for model {model_name}: say {' or '.join(f'{s}.{key}' for s in owners)}")
    field = key.split(".", 1)[-1]
    by_field: dict[str, list[str]] = {}
    for k in sorted(known):
        by_field.setdefault(k.split(".", 1)[1], []).append(k)
    close = [q for f in difflib.get_close_matches(field, sorted(by_field), n=3) for q in by_field[f]]
    hint = f"; did you mean {' or '.join(close[:3])}?" if close else \
        f"; `python -m genmodels.train --model {model_name} --help` lists every setting"
    raise ConfigError(f"unknown setting {key!r} for model {model_name}{hint}")


def qualify(model_name: str, model_config: type[ModelConfig], flat: dict[str, Any]) -> dict[str, Any]:
    """The same dict with every key in its `section.field` form (values untouched: they may be search domains)."""
    return {key if key in TOP_LEVEL else ".".join(resolve_key(model_name, model_config, key)): value
            for key, value in flat.items()}
