"""Every searched hyperparameter changes what a trial computes: for each space, two trials that differ in one
searched value (at the smoke preset's point) differ in their training, their test metrics or their samples at the
FID ladder's first rung (the budget the sample grids between rungs use too). A value the space searches and the smoke
preset pins (T, arch, width) is tried at the smoke point too, with the space's first two values; so the NCSN spaces,
one per sigma schedule, show that no schedule ignores a value its space searches."""
from __future__ import annotations

import pytest
import torch

from genmodels.data import synthetic_images
from genmodels.engine import EMA
from genmodels.experiment import Experiment, make_experiment
from genmodels.registry import qualified
from sweeps.domains import to_tune
from sweeps.param_space import build_param_space, domain_values, is_domain, representative
from sweeps.spaces import FID_SETTINGS, SPACES

STEPS = {"vqvae": 30}  # a dead code is restarted only after restart_window (20) steps
# ema_decay: the EMA's warm-up, min(decay, (1 + step) / (10 + step)), sets the average for ~1 / (1 - decay) steps,
# longer than any short run here; test_ema_decay_changes_the_average_after_its_warm_up covers it.
SLOW_TO_SHOW = {"train.ema_decay"}
# a network's width shows in its parameter count; training one at a full preset's width here would take a minute
SIZES = {"model.width"}
RUNG0 = FID_SETTINGS["smoke"].step_fractions[0]


def outcome(exp: Experiment) -> list[torch.Tensor]:
    metrics = exp.run_epoch()
    values = [torch.tensor([float(v) for k, v in sorted(metrics.items()) if k not in ("epoch", "step")])]
    model = exp.eval_model.eval()
    if model.can_sample:
        torch.manual_seed(1)
        values.append(model.sample(4, budget=RUNG0))
    return values


def pairs(space_name: str):
    space = SPACES[space_name]
    param_space = build_param_space(space, "smoke", {}, {}, seed=0)
    point = representative(param_space)
    space_params = qualified(space.model, to_tune(space.params))
    for key, value in param_space.items():
        domain = value if is_domain(value) else space_params.get(key)  # the preset's domain, else the space's
        if is_domain(domain) and key not in SLOW_TO_SHOW:
            a, b = domain_values(domain)[:2]
            yield space, key, {**point, key: a}, {**point, key: b}


CASES = [(name, key, a, b) for name in sorted(SPACES) if not SPACES[name].needs_checkpoint
         for _, key, a, b in pairs(name)]


@pytest.mark.slow
@pytest.mark.parametrize("space_name, key, a, b", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_one_searched_value_changes_the_trial(space_name, key, a, b, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSWEEP_DATA", str(tmp_path))  # NCSNv2's sigma_1 cache
    images = synthetic_images(64, seed=0)
    steps = STEPS.get(SPACES[space_name].model, 3)
    small = {"train.steps_per_epoch": steps, "train.batch_size": 8, "train.eval_images": 16, "train.epochs": 1}

    def trial(cfg: dict) -> list[torch.Tensor]:
        exp = make_experiment(SPACES[space_name].model, {**cfg, **small}, images[:48], images[48:], device="cpu")
        return [torch.tensor([float(sum(p.numel() for p in exp.model.parameters()))])] if key in SIZES else \
            outcome(exp)

    results = [trial(cfg) for cfg in (a, b)]
    assert any(x.shape != y.shape or not torch.allclose(x, y) for x, y in zip(*results)), (key, a[key], b[key])


@pytest.mark.slow
def test_searched_sampler_values_change_a_checkpoints_samples(tmp_path):
    """ncsn-sampling: each searched sampler setting, applied to one trained NCSN, changes its rung-0 samples."""
    space = SPACES["ncsn-sampling"]
    param_space = build_param_space(SPACES["ncsn"], "smoke", {}, {}, seed=0)
    images = synthetic_images(64, seed=0)
    exp = make_experiment("ncsn", {**representative(param_space), "train.steps_per_epoch": 3, "train.epochs": 1,
                                   "train.batch_size": 8}, images[:48], images[48:], device="cpu")
    exp.run_epoch()
    exp.save(tmp_path / "state.pt")
    sampling = build_param_space(space, "smoke", {}, {}, seed=0)
    for key, value in sampling.items():
        if not is_domain(value):
            continue
        a, b = domain_values(value)[:2]
        samples = []
        for v in (a, b):
            model = Experiment.from_checkpoint(tmp_path / "state.pt", images[:48], images[48:], {key: v},
                                               device="cpu").eval_model.eval()
            torch.manual_seed(1)
            samples.append(model.sample(4, budget=RUNG0))
        assert not torch.allclose(*samples), key


def test_ema_decay_changes_the_average_after_its_warm_up():
    model = torch.nn.Linear(2, 2)
    averages = []
    for decay in (0.999, 0.9999):
        ema = EMA(model, decay)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model, step=100_000)  # long past the warm-up: the decay itself applies
        averages.append(torch.cat([p.flatten() for p in ema.model.parameters()]))
    assert not torch.allclose(*averages)
