"""The typed trial config: strict keys with close matches, types and ranges, domains checked through their values,
and every space and preset valid as written."""
from __future__ import annotations

import dataclasses

import pytest
from ray import tune

from genmodels.config import ConfigError, TrialConfig
from genmodels.registry import MODELS, trial_config
from sweeps.param_space import build_param_space, check_param_space, representative
from sweeps.spaces import SPACES


def test_flat_round_trip_and_bare_names():
    cfg = trial_config({"beta": 4, "train.lr": "3e-4", "dataset": "synthetic", "flip": "false"}, "vae")
    assert (cfg.model.beta, cfg.train.lr, cfg.data.dataset, cfg.train.flip) == (4.0, 3e-4, "synthetic", False)
    flat = cfg.flat()
    assert flat["model.beta"] == 4.0 and flat["model_name"] == "vae" and "model.latent" in flat  # defaults too
    assert trial_config(flat) == cfg


@pytest.mark.parametrize("settings, message", [
    ({"bta": 1}, "unknown setting 'bta' for model vae; did you mean model.beta?"),
    ({"model.btea": 1}, "did you mean model.beta?"),
    ({"train.beta": 1}, "did you mean model.beta?"),
    ({"beta": "notanumber"}, "model.beta must be a number, got 'notanumber'"),
    ({"beta": -1}, "model.beta must be >= 0, got -1"),
    ({"batch_size": 0}, "train.batch_size must be >= 1, got 0"),
    ({"latent": 0}, "model.latent must be >= 1, got 0"),
    ({"latent": 2.5}, "model.latent must be an integer, got 2.5"),
    ({"epochs": 0}, "train.epochs must be >= 1, got 0"),
    ({"lr": 0}, "train.lr must be > 0, got 0"),
    ({"arch": "convv"}, "model.arch must be one of conv-small, conv, resnet, got 'convv'"),
    ({"likelihood_scale": float("nan")}, "model.likelihood_scale must be a finite number"),
    ({"flip": "maybe"}, "train.flip must be true or false"),
])
def test_bad_settings_fail_in_one_line(settings, message):
    with pytest.raises(ConfigError) as e:
        trial_config(settings, "vae")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(SPACES))
@pytest.mark.parametrize("preset", ["smoke", "full"])
def test_every_space_and_preset_is_valid(name, preset):
    space = SPACES[name]
    param_space = build_param_space(space, preset, {}, {}, seed=0)
    assert all("." in k for k in param_space if k not in ("model_name", "checkpoint"))
    point = trial_config(representative(param_space))
    assert point.model_name == space.model and point.train.epochs >= 1


def test_a_typo_in_a_space_or_a_domain_value_fails_at_sweep_start():
    space = SPACES["vae"]
    broken = type(space)(**{**space.__dict__, "params": {**space.params, "latnet": tune.choice([8, 16])}})
    with pytest.raises(ConfigError, match="space 'vae': unknown setting 'latnet'.*model.latent"):
        build_param_space(broken, "smoke", {}, {}, seed=0)
    with pytest.raises(ConfigError, match="model.latent must be >= 1, got 0"):
        check_param_space({"model_name": "vae", "model.latent": tune.choice([0, 8])})
    with pytest.raises(ConfigError, match="model.beta must be >= 0"):
        check_param_space({"model_name": "vae", "model.beta": tune.uniform(-1, 2)})
    with pytest.raises(ConfigError, match="--fixed: unknown setting 'epochz'"):
        build_param_space(space, "smoke", {"epochz": 3}, {}, seed=0)


def test_fixed_values_replace_domains_and_keep_their_section():
    param_space = build_param_space(SPACES["vae"], "smoke", {"beta": 4, "train.epochs": 2}, {}, seed=3)
    assert param_space["model.beta"] == 4 and param_space["train.epochs"] == 2 and param_space["train.seed"] == 3


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_builds_from_its_defaults(model):
    cfg = trial_config({}, model)
    assert isinstance(cfg, TrialConfig) and cfg.model_name == model


def test_a_checked_config_is_changed_only_by_replacing_it():
    """Frozen sections: whoever wants other values (a benchmark's steps, a sampler's precision) builds a new config."""
    cfg = trial_config({"beta": 4}, "vae")
    for section, field in (("train", "steps_per_epoch"), ("model", "beta"), ("data", "dataset")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, section), field, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model_name = "iwae"
    longer = cfg.replace("train", steps_per_epoch=7)
    assert (longer.train.steps_per_epoch, cfg.train.steps_per_epoch, longer.model) == (7, 0, cfg.model)
    with pytest.raises(ConfigError, match="train.steps_per_epoch must be >= 0"):  # replace() checks values too
        cfg.replace("train", steps_per_epoch=-1)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_seed_defaults_pin_every_searched_value_to_a_valid_one(name):
    space = SPACES[name]
    assert space.seed_defaults, f"space {name} has no seed configuration"
    param_space = build_param_space(space, "full", space.seed_defaults, {}, seed=0)
    assert not [k for k, v in param_space.items() if hasattr(v, "sample")], "a searched value is left unpinned"
