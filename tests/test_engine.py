import math
import subprocess
import sys

import pytest
import torch
from conftest import make_trainer

import genmodels.models.vae as vae_module
from genmodels.data import synthetic_images
from genmodels.engine import Diverged
from genmodels.io import load_checkpoint
from genmodels.metrics.likelihood import nats_to_bpd

TINY = dict(arch="conv-small", width=4, latent=8, batch_size=16, steps_per_epoch=3, lr=1e-3)


@pytest.fixture(scope="module")
def images():
    return synthetic_images(64, seed=0), synthetic_images(32, seed=1)


def test_checkpoint_round_trip_continues_identically(images, tmp_path):
    train, test = images
    params = dict(TINY, ema_decay=0.9, seed=3)
    a = make_trainer("vae", params, train, test, device="cpu")
    a.train_epoch()
    a.extra["best"] = 1.5
    a.save(tmp_path / "state.pt")
    uninterrupted = a.train_epoch()

    b = make_trainer("vae", dict(params, seed=99), train, test, device="cpu")  # other init, other RNG: all restored
    b.load(tmp_path / "state.pt")
    resumed = b.train_epoch()
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    assert (b.step, b.epoch, b.extra) == (a.step, a.epoch, {"best": 1.5})
    for p, q in zip(a.eval_model.parameters(), b.eval_model.parameters()):  # the EMA weights too
        assert torch.equal(p, q)


def test_checkpoint_is_weights_only_and_atomic(images, tmp_path):
    t = make_trainer("vae", TINY, *images, device="cpu")
    path = t.save(tmp_path / "state.pt")
    state = torch.load(path, weights_only=True)  # raises if anything but tensors and plain containers
    assert {"model", "optimizer", "ema", "rng", "step", "epoch"} <= set(state)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert load_checkpoint(path)["model_name"] == "vae"


def test_non_finite_loss_raises_diverged(images, monkeypatch):
    t = make_trainer("vae", TINY, *images, device="cpu")
    monkeypatch.setattr(t.model, "loss", lambda x: (torch.tensor(float("nan"), requires_grad=True), {}))
    with pytest.raises(Diverged):
        t.train_epoch()


def test_elbo_bpd_by_hand(monkeypatch):
    """q(z|x) = N(0, I) (so KL = 0) and a constant decoder mean 0.5: -ELBO is a Gaussian NLL computable by hand."""
    torch.manual_seed(0)
    model = vae_module.VAE(vae_module.VAEConfig(arch="conv-small", width=4, latent=8, likelihood_scale=0.2), 3)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    monkeypatch.setattr(vae_module, "dequantize", lambda x: (x.float() + 0.5) / 256)
    monkeypatch.setattr(model, "encode", lambda x: (torch.zeros(len(x), 8), torch.zeros(len(x), 8)))
    monkeypatch.setattr(model, "decode", lambda z: torch.full((len(z), 3, 32, 32), 0.5))
    m = model.evaluate([x[:3], x[3:]])
    xd = ((x.double() + 0.5) / 256).flatten(1)
    nll = (0.5 * ((xd - 0.5) / 0.2) ** 2 + math.log(0.2) + 0.5 * math.log(2 * math.pi)).sum(1).mean().item()
    assert m["test_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["test_neg_elbo"] == pytest.approx(nll, rel=1e-5)
    assert m["test_bpd"] == pytest.approx(nll / (3072 * math.log(2)) + 8, rel=1e-6)
    assert nats_to_bpd(3072 * math.log(2), 3072) == pytest.approx(9.0)  # 1 bit per dim of [0,1] data -> +8


def test_bpd_ranks_independently_of_training_beta(images):
    """test_bpd is the beta=1 bound: two models identical but for beta report the same test_bpd."""
    train, test = images
    a = make_trainer("vae", dict(TINY, beta=0.1), train, test, device="cpu")
    b = make_trainer("vae", dict(TINY, beta=8.0), train, test, device="cpu")
    torch.manual_seed(0)
    ma = a.evaluate()
    torch.manual_seed(0)
    mb = b.evaluate()
    assert ma["test_bpd"] == pytest.approx(mb["test_bpd"], rel=1e-6)


def test_vae_trains_and_samples_in_range(images, tmp_path):
    t = make_trainer("vae", dict(TINY, steps_per_epoch=10, lr=3e-3), *images, device="cpu")
    before = t.evaluate()["test_bpd"]
    for _ in range(3):
        t.train_epoch()
    assert t.evaluate()["test_bpd"] < before
    s = t.eval_model.sample(8)
    assert s.shape == (8, 3, 32, 32) and s.min() >= 0 and s.max() <= 1
    grids = t.write_grids(tmp_path)
    assert grids["samples"].exists() and grids["reconstructions"].exists()


def test_models_take_channels_from_data():
    one_channel = synthetic_images(32)[:, :1].contiguous()
    t = make_trainer("vae", TINY, one_channel, one_channel, device="cpu")
    assert t.model.sample(2).shape == (2, 1, 32, 32)
    t.train_epoch()


def test_experiment_answers_what_its_callers_ask(images, tmp_path):
    """Callers use the Experiment alone: device, steps, the checkpointed `extra`, test images, progress lines."""
    from genmodels.experiment import Experiment, make_experiment

    train, test = images
    exp = make_experiment("vae", dict(TINY, eval_images=16), train, test, device="cpu")
    assert exp.device == torch.device("cpu") and exp.step == 0 and exp.progress is None
    assert torch.equal(exp.test_images(4), test[:4]) and len(exp.test_images(64)) == 16  # what evaluation sees
    exp.train_epoch(2)  # a step count of its own (benchmarks' warm-up), then the config's
    exp.train_epoch()
    assert (exp.step, exp.epoch) == (5, 2)
    exp.extra["best"] = {"test_bpd": 7.5}
    exp.save(tmp_path / "state.pt")
    lines: list[str] = []
    again = Experiment.setup(exp.cfg, train, test, device="cpu", progress=lines.append, progress_every=0.0)
    again.restore(tmp_path / "state.pt")
    assert (again.step, again.extra) == (5, {"best": {"test_bpd": 7.5}})
    again.run_epoch()
    assert again.progress == lines.append and any(x.startswith("epoch 3: step 3/3") for x in lines)


def test_genmodels_imports_neither_ray_nor_wandb():
    code = ("import sys, pkgutil, importlib, genmodels\n"
            "for m in pkgutil.iter_modules(genmodels.__path__): importlib.import_module('genmodels.' + m.name)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'wandb', 'optuna')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
