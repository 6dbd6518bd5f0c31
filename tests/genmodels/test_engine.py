import copy
import math
import subprocess
import sys

import pytest
import torch
from conftest import make_trainer
from torch import nn

import genmodels.engine as engine
import genmodels.models.vae as vae_module
from genmodels.data import Batches, synthetic_images
from genmodels.engine import Diverged, seed_everything
from genmodels.io import load_checkpoint
from genmodels.metrics.likelihood import nats_to_bpd
from genmodels.registry import build_model

TINY = dict(arch="conv-small", width=4, latent=8, batch_size=16, steps_per_epoch=3, lr=1e-3)
TINY_NCSN = dict(arch="unet", width=8, unet_blocks=1, num_levels=3, batch_size=8, steps_per_epoch=3, lr=1e-3)


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


# The engine's fast-path options (compile, memory format, sync-free divergence check) leave training unchanged.

@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_trainer_matches_a_plain_eager_loop(images, memory_format):
    """compile=False, and channels_last on CPU, train the same as a hand-written loop over the same batches:
    Adam, clipping, EMA with warm-up and BatchNorm statistics, all with the engine's RNG order."""
    train, test = images
    params = dict(TINY, ema_decay=0.9, grad_clip=1.0, seed=5, compile=False, memory_format=memory_format)
    trainer = make_trainer("vae", params, train, test, device="cpu")
    assert trainer.compiled_loss is None and trainer.channels_last == (memory_format == "channels_last")
    got = trainer.train_epoch()

    seed_everything(5)
    model = build_model("vae", params, channels=3)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step, x in enumerate(Batches(train, 16, "cpu", shuffle=True, flip=True, seed=5).epoch(3)):
        loss, logs = model.loss(x)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(0.9, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
            for b_ema, b in zip(ema.buffers(), model.buffers()):
                b_ema.copy_(b)
        losses.append(loss.item())

    # The engine averages the logged losses in fp32, the loop above in float64.
    if memory_format == "channels_last":
        # Convolutions sum in another order, and Adam's first steps are about lr * sign(grad): a conv bias before
        # BatchNorm, whose gradient is rounding noise, moves differently without changing any output. So: the loss.
        assert got["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-4)
        return
    assert got["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    for (name, a), b in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    # The engine's EMA is ema * decay + p * (1 - decay) with the decay on the device (graph-safe), lerp's rounding
    # differs from it in the last bit.
    for (name, a), b in zip(trainer.ema.model.state_dict().items(), ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_channels_last_weights_and_same_loss_as_contiguous_for_groupnorm_unet(images):
    train, test = images
    results = {}
    for fmt in ("contiguous", "channels_last"):
        t = make_trainer("ncsn", dict(TINY_NCSN, memory_format=fmt, ema_decay=0.99), train, test, device="cpu")
        conv = t.model.net.stem.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == (fmt == "channels_last")
        results[fmt] = (t.train_epoch()["train_loss"], t.evaluate()["test_dsm_loss"])
    assert results["channels_last"][0] == pytest.approx(results["contiguous"][0], rel=1e-4)
    assert results["channels_last"][1] == pytest.approx(results["contiguous"][1], rel=1e-4)


def test_auto_memory_format_is_contiguous_on_cpu_and_bad_names_fail(images):
    assert engine.use_channels_last("auto", torch.device("cuda")) and not engine.use_channels_last(
        "auto", torch.device("cpu"))
    t = make_trainer("vae", TINY, *images, device="cpu")
    assert not t.channels_last and t.model.encoder[0].weight.is_contiguous()
    with pytest.raises(ValueError, match="memory_format"):
        make_trainer("vae", dict(TINY, memory_format="nhwc"), *images, device="cpu")


def test_channels_last_checkpoint_resumes_in_nchw_with_matching_optimizer_layout(images, tmp_path):
    train, test = images
    a = make_trainer("vae", dict(TINY, memory_format="channels_last", seed=2), train, test, device="cpu")
    a.train_epoch()
    a.save(tmp_path / "state.pt")
    after_a = a.train_epoch()["train_loss"]
    b = make_trainer("vae", dict(TINY, memory_format="contiguous", seed=9), train, test, device="cpu")
    b.load(tmp_path / "state.pt")
    assert set(b.state_dict()["model"]) == set(a.state_dict()["model"])
    for p in b.model.parameters():
        for value in b.optimizer.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert value.stride() == p.stride()
    assert b.train_epoch()["train_loss"] == pytest.approx(after_a, rel=1e-4)


def test_compile_keeps_state_dict_keys_and_the_original_module(images):
    """torch.compile wraps the loss function only: no `_orig_mod.` prefix in checkpoints, the same module trained.
    (Compiling itself takes about a minute on a CPU; docs/PERFORMANCE.md has the measured compile time.)"""
    plain = make_trainer("vae", TINY, *images, device="cpu")
    compiled = make_trainer("vae", dict(TINY, compile=True), *images, device="cpu")
    assert compiled.compiled_loss is not None and isinstance(compiled.model, type(plain.model))
    keys = list(compiled.state_dict()["model"])
    assert keys == list(plain.state_dict()["model"]) and not any("_orig_mod" in k for k in keys)
    assert compiled.state_dict()["config"]["train.compile"] is True
    plain.model.load_state_dict(compiled.state_dict()["model"])  # loads both ways, strictly


def test_divergence_is_caught_at_the_check_after_it(images, monkeypatch):
    """The loss sent to the host at a check is read at the next one (no wait in between): a NaN from step 1 on
    raises within two check intervals, before the epoch ends."""
    monkeypatch.setattr(engine, "DIVERGENCE_CHECK_EVERY", 2)
    t = make_trainer("vae", dict(TINY, steps_per_epoch=50), *images, device="cpu")
    steps = []

    def nan_loss(x):
        steps.append(1)
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(t.model, "loss", nan_loss)
    with pytest.raises(Diverged, match="loss is nan at step 2"):
        t.train_epoch()
    assert len(steps) == 4  # read at step 4, the check after step 2's


def test_logged_values_are_averaged_per_name(images, monkeypatch):
    t = make_trainer("vae", TINY, *images, device="cpu")
    counter = iter(range(100))

    def loss(x):
        i = float(next(counter))
        w = t.model.to_posterior.weight
        return (w.sum() * 0 + i), {"a": torch.tensor(2 * i), "b": torch.tensor(i, dtype=torch.bfloat16)}

    monkeypatch.setattr(t.model, "loss", loss)
    metrics = t.train_epoch()
    assert metrics == {"train_loss": 1.0, "train_a": 2.0, "train_b": 1.0}  # means of 0, 1, 2
