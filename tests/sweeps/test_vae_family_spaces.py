"""The resnet_vae, dfc and iwae search spaces: the searched ranges, and a smoke trial's config trains and reports the
ranking metric (without Ray: the engine alone, on a few steps)."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
from conftest import make_trainer
from ray import tune

from genmodels.config import TrainConfig
from genmodels.data import synthetic_images
from genmodels.metrics.latent import latent_grids
from genmodels.registry import model_class
from sweeps.domains import to_tune
from sweeps.spaces import SMOKE_DATA, SPACES

DATA_KEYS = set(SMOKE_DATA) | {"data_dir"}
FAMILY = ("resnet_vae", "dfc", "iwae")


def test_each_space_ranks_by_a_metric_that_means_the_same_for_every_trial():
    # the ELBO at beta = 1 ranks what trains on it; the bound ranks what trains on L_k, whose ELBO depends on k
    assert SPACES["resnet_vae"].metric == "test_bpd" and SPACES["resnet_vae"].mode == "min"
    assert SPACES["iwae"].metric == "test_iwae_bpd" and SPACES["iwae"].mode == "min"
    # the perceptual loss changes meaning with alpha: dfc ranks by sample FID, or the likelihood bound on request
    assert SPACES["dfc"].metric == "fid" and set(SPACES["dfc"].metrics) == {"fid", "test_iwae_bpd"}
    assert SPACES["dfc"].presets["smoke"].config["vgg_weights"] == "random"


@pytest.mark.parametrize("name", FAMILY)
def test_preset_keys_are_settings(name):
    space = SPACES[name]
    known = ({f.name for f in dataclasses.fields(TrainConfig)} | DATA_KEYS
             | {f.name for f in dataclasses.fields(model_class(space.model).Config)})
    for preset in space.presets.values():
        assert set(space.params) | set(preset.config) <= known
        assert (preset.config.get("norm", space.params.get("norm")) != "batch")  # the family reports L_k


@pytest.mark.parametrize("name", FAMILY)
def test_smoke_trial_config_trains_and_reports_the_metric(name, tmp_path):
    space = SPACES[name]
    random.seed(0)
    config = to_tune({**space.params, **space.presets["smoke"].config})
    config = {k: (v.sample() if isinstance(v, tune.search.sample.Domain) else v) for k, v in config.items()}
    if name == "iwae":
        config["k"] = 50  # the slowest choice
    config.update(steps_per_epoch=1, epochs=1)
    images = synthetic_images(48, seed=0)
    trainer = make_trainer(space.model, config, images[:32], images[32:], device="cpu")
    metrics = {**trainer.train_epoch(), **trainer.evaluate()}
    assert math.isfinite(metrics["test_iwae_bpd"])  # fid (dfc's ranking metric) comes from the trainable's ladder
    assert f"test_iwae_bpd_k{config['eval_k']}" in metrics
    model = trainer.eval_model
    final = model.iwae_bpd(trainer.test_batches.epoch(), k=config["final_eval_k"])
    assert math.isfinite(final)
    paths = latent_grids(model, trainer.test_images(16), tmp_path, n_pairs=2, steps=4,
                         best_weight=model.importance_weighted)
    assert all(p.exists() for p in paths.values())
    assert ("best_weight_recon" in paths) == (name == "iwae")
    # the same through the engine's end-of-trial hook, as the trainable calls it
    final_metrics, final_paths = trainer.final_evaluate(tmp_path / "final")
    assert math.isfinite(final_metrics[f"final_test_iwae_bpd_k{config['final_eval_k']}"])
    assert set(final_paths) == set(paths) and all(p.exists() for p in final_paths.values())
