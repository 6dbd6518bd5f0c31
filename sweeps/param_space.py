"""The param space of a sweep: a space's searched domains and constants, its preset, and the command line's
overrides, as one flat dict of `section.field` keys (Ray Tune's param space), every key and value checked against
the model's and the training config's declared fields before Ray starts.

A search domain is checked through the values it can produce: every choice of a `tune.choice`, both bounds of a
range. So `--fixed beta=-1`, a typo in a preset or a space, and a choice outside a field's allowed values all
fail at sweep start, in one line.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.search.sample import Categorical, Domain, Float, Integer

from genmodels.config import SECTIONS, ConfigError, check_value, section_classes
from genmodels.io import load_checkpoint
from genmodels.registry import model_class, qualified, trial_config
from sweeps.domains import to_tune
from sweeps.errors import UsageError
from sweeps.spaces import Space

if TYPE_CHECKING:
    import argparse


def is_domain(value: Any) -> bool:
    return isinstance(value, Domain)


def parse_fixed(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; values as Python literals where they parse (4, 1e-3, True), else as strings."""
    fixed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--fixed takes KEY=VALUE, got {item!r}")
        try:
            fixed[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            fixed[key.strip()] = raw  # bare strings such as arch=conv
    return fixed


def build_param_space(space: Space, preset: str, fixed: dict[str, Any], overrides: dict[str, Any],
                      seed: int) -> dict[str, Any]:
    """Searched domains, then the preset's values, then `overrides` (from flags such as --dataset), then --fixed;
    every key qualified (`model.beta`) and every value or domain checked. A pinned value replaces a domain."""
    def qualify(values: dict[str, Any], where: str) -> dict[str, Any]:
        try:
            return qualified(space.model, values)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    param_space = {"model_name": space.model,
                   **qualify(to_tune(space.params), f"space {space.name!r}"),
                   **qualify(to_tune(space.presets[preset].config), f"preset {preset!r} of space {space.name!r}"),
                   "train.seed": seed,
                   **qualify(overrides, "command line"),
                   **qualify(fixed, "--fixed")}
    check_param_space(param_space)
    return param_space


def check_param_space(param_space: dict[str, Any]) -> None:
    """ConfigError (one line) unless every constant, and every value a domain can produce, is valid; and the
    constants together make a valid trial config."""
    classes = section_classes(model_class(param_space["model_name"]).Config)
    for key, value in param_space.items():
        section, _, field = key.partition(".")
        if section not in SECTIONS:
            continue
        for example in domain_values(value) if is_domain(value) else [value]:
            check_value(classes[section], field, example, key)
    trial_config(representative(param_space))


def domain_values(domain: Domain) -> list[Any]:
    """The values that bound what a domain produces: all choices, or the range's ends (upper end exclusive for
    integers, as in tune.randint)."""
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, Integer):
        return [domain.lower, domain.upper - 1]
    if isinstance(domain, Float):
        return [domain.lower, domain.upper]
    return []


def representative(param_space: dict[str, Any]) -> dict[str, Any]:
    """One concrete point of the space (each domain's first value): for checks and values derived once per sweep."""
    point = {}
    for key, value in param_space.items():
        if is_domain(value):
            values = domain_values(value)
            point[key] = values[0] if values else value.sample()
        else:
            point[key] = value
    return point


def describe_domain(domain: Domain) -> str:
    """A domain as the dry run prints it: {a, b, c} or [low, high] (log-uniform where it samples so)."""
    if isinstance(domain, Categorical):
        return "{" + ", ".join(map(str, domain.categories)) + "}"
    low, high = domain_values(domain) or ["?", "?"]
    log = "LogUniform" in type(domain.get_sampler()).__name__
    return f"{'log-uniform ' if log else ''}[{low:g}, {high:g}]"


def searched_keys(param_space: dict[str, Any]) -> list[str]:
    return [k for k, v in param_space.items() if is_domain(v)]


def constants(param_space: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in param_space.items() if not is_domain(v)}


def cli_overrides(space: Space, args: argparse.Namespace) -> dict[str, Any]:
    """Config values that flags other than --fixed set: data, weights files, the checkpoint to evaluate."""
    overrides: dict[str, Any] = {}
    if args.dataset:
        overrides["data.dataset"] = args.dataset
    if args.data_dir:
        overrides["data.data_dir"] = absolute(args.data_dir)
    if args.vgg_weights:
        if not hasattr(model_class(space.model).Config, "vgg_weights"):
            raise UsageError(f"--vgg-weights applies to spaces with a perceptual loss, not {space.name!r}")
        overrides["model.vgg_weights"] = absolute(args.vgg_weights)
    if args.checkpoint:
        path = Path(args.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"--checkpoint {args.checkpoint} is not a file; pass a trial's checkpoint_*/state.pt")
        check_checkpoint(path, space.model)
        overrides["checkpoint"] = str(path)
    elif space.needs_checkpoint:
        raise UsageError(f"space {space.name!r} evaluates a trained model: pass --checkpoint PATH/state.pt")
    return overrides


def check_checkpoint(path: Path, model_name: str) -> None:
    """UsageError (one line) unless `path` loads (weights only) as a finished run of `model_name` with a config that
    this version reads: checked here, once, not in every trial."""
    try:
        state = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - truncated, garbage, or not weights-only: one line, whatever it was
        raise UsageError(f"--checkpoint {path} cannot be read as a gensweep checkpoint ({type(e).__name__}); pass "
                         f"a trial's checkpoint_*/state.pt") from None
    found = state.get("model_name") if isinstance(state, dict) else None
    if found != model_name or "config" not in state:
        raise UsageError(f"--checkpoint {path} holds {'a ' + repr(found) + ' model' if found else 'no gensweep run'}; "
                         f"this space evaluates {model_name} checkpoints")
    try:
        trial_config(state["config"])
    except ConfigError as e:
        raise UsageError(f"--checkpoint {path}: its config does not load ({e})") from None


def absolute(path: str | None) -> str | None:
    """A path from the command line as every node reads it: user expanded, absolute; None stays None."""
    return str(Path(path).expanduser().resolve()) if path else None
