"""The self-check at CUDA graph capture (genmodels.cuda_graph.first_replay), on a CPU: a real Trainer's step is the
eager reference, and a stand-in for capture-and-replay puts in the faults a graph could have. Also on a CPU: the
GraphedStep's handling of the verdict in a training epoch (its CUDA parts stood in for), and that a Trainer and its
GraphedStep are no reference cycle. The CUDA side is in test_cuda_graphs.py."""
import contextlib
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import make_trainer

from genmodels.cuda_graph import GraphedStep, StepCheck, compare, first_replay
from genmodels.data import synthetic_images

TINY = dict(arch="conv-small", width=4, latent=8, batch_size=16, steps_per_epoch=3, lr=1e-3, ema_decay=0.9,
            grad_clip=1.0, seed=3)
IMAGES = synthetic_images(64, seed=0), synthetic_images(16, seed=1)


def _warm_trainer():
    """A trainer three steps in (Adam's state made, the EMA moving), the next batch, and the RNG state the last of
    those steps began from."""
    trainer = make_trainer("vae", TINY, *IMAGES)
    batches = list(trainer.train_batches.epoch(4))
    for x in batches[:3]:
        previous = torch.get_rng_state()
        trainer._step(x)
    return trainer, batches[3], previous


def _check(trainer):
    return StepCheck(trainer._step_state, trainer._step_values, trainer._step_counters)


def _state(trainer):
    return [t.detach().clone() for t in trainer._step_state()] + [torch.get_rng_state()]


@pytest.fixture(scope="module")
def one_step():
    """Every tensor a step changes, and the RNG state, after one eager step from the warm trainer's state."""
    trainer, x, _ = _warm_trainer()
    trainer._step(x)
    return _state(trainer)


def _assert_one_step(trainer, one_step):
    """The update that stood is exactly one step's, whatever was tried before it."""
    got = _state(trainer)
    assert len(got) == len(one_step) and all(torch.equal(a, b) for a, b in zip(got, one_step))


def test_a_faithful_replay_passes_and_stands_as_the_steps_update(one_step):
    trainer, x, _ = _warm_trainer()
    outputs, graphed, verdict = first_replay(x, trainer._step, trainer._step, _check(trainer))
    assert graphed and verdict == "self-check passed (largest difference 0.0% of its tolerance)"
    assert outputs[2][0] == "loss"
    _assert_one_step(trainer, one_step)


def test_a_replay_that_skips_the_optimizer_step_is_caught(one_step, monkeypatch):
    trainer, x, _ = _warm_trainer()

    def replay(x):  # forward, backward and EMA, but Adam left out of the graph
        with monkeypatch.context() as m:
            m.setattr(trainer.optimizer, "step", lambda: None)
            return trainer._step(x)

    _, graphed, verdict = first_replay(x, trainer._step, replay, _check(trainer))
    assert not graphed and verdict.startswith("self-check failed (parameter norms")
    _assert_one_step(trainer, one_step)  # the bad replay undone, the step run eagerly
    # With the values alone unmoved (a larger model, a smaller learning rate), the step counts give it away.
    _, graphed, verdict = first_replay(x, trainer._step, replay, _check(trainer)._replace(compared=lambda _: {}))
    assert not graphed and verdict.startswith("self-check failed (Adam step counts[0]: ")


def test_a_replay_that_reuses_stale_noise_is_caught(one_step):
    trainer, x, previous = _warm_trainer()

    def replay(x):  # the previous step's noise drawn again, the generator left where the eager step leaves it
        torch.set_rng_state(previous)
        outputs = trainer._step(x)
        torch.set_rng_state(one_step[-1])
        return outputs

    _, graphed, verdict = first_replay(x, trainer._step, replay, _check(trainer))
    assert not graphed and verdict.startswith("self-check failed (")
    _assert_one_step(trainer, one_step)
    # The logged values alone give it away too (a model whose update hides it): the loss is another draw's.
    logged = _check(trainer)._replace(compared=lambda out: {k: v for k, v in trainer._step_values(out).items()
                                                            if k.startswith("train_")})
    _, graphed, verdict = first_replay(x, trainer._step, replay, logged)
    assert not graphed and verdict.startswith("self-check failed (train_")


@pytest.mark.parametrize("times_the_tolerance, caught", [(1.05, True), (0.95, False)])
def test_a_replay_is_held_to_the_tolerance(times_the_tolerance, caught):
    trainer, x, _ = _warm_trainer()
    check = _check(trainer)

    def replay(x):  # the loss off by a share of its tolerance, all else as the eager step
        loss, stacked, names = trainer._step(x)
        stacked = stacked.clone()
        stacked[0] += times_the_tolerance * (check.atol + check.rtol * stacked[0].abs())
        return loss, stacked, names

    _, graphed, verdict = first_replay(x, trainer._step, replay, check)
    assert graphed is not caught
    assert verdict.startswith("self-check failed (train_loss: ") if caught else \
        verdict == "self-check passed (largest difference 95.0% of its tolerance)"


def test_a_step_the_probe_stops_starts_again_from_the_saved_state(one_step, monkeypatch):
    """The host-sync probe raises part way through the step (here after Adam's update): nothing of that half step
    stays, the step runs eagerly, and no capture is attempted."""
    trainer, x, _ = _warm_trainer()
    update = trainer.ema.update

    def syncing(*args):
        update(*args)
        raise RuntimeError("called a synchronizing CUDA operation\nmore")

    @contextlib.contextmanager
    def probe():
        with monkeypatch.context() as m:
            m.setattr(trainer.ema, "update", syncing)
            yield

    def replay(x):
        raise AssertionError("no capture after the probe failed")

    _, graphed, verdict = first_replay(x, trainer._step, replay, _check(trainer), probe=probe)
    assert not graphed and verdict == "not capturable (called a synchronizing CUDA operation)"
    _assert_one_step(trainer, one_step)


def test_a_step_without_state_is_checked_on_its_outputs():
    """The default check (the Langevin step's): the outputs, in units of their RMS, so a chain's pixels near 0
    are held to the tolerance of the chain's scale."""
    def step(x):
        return x + torch.randn_like(x)

    x = torch.zeros(2, 3, 8, 8)
    _, graphed, verdict = first_replay(x, step, step, StepCheck())
    assert graphed, verdict
    stale = torch.randn_like(x)

    def replay(x):  # noise drawn before, the generator moved on as the eager step moves it
        torch.randn_like(x)
        return x + stale

    _, graphed, verdict = first_replay(x, step, replay, StepCheck())
    assert not graphed and verdict.startswith("self-check failed (output 0 / RMS[")


def test_compare_finds_the_worst_element():
    expected = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor(10.0)}
    same = {k: v.clone() for k, v in expected.items()}
    assert compare(expected, same, 1e-3, 0.0) == (0.0, "a[0]: 1 replayed vs 1 eager")
    excess, where = compare(expected, {"a": torch.tensor([1.0, 2.002, 3.0]), "b": torch.tensor(10.0)}, 1e-3, 0.0)
    assert excess == pytest.approx(1.0, rel=1e-3) and where == "a[1]: 2.002 replayed vs 2 eager"
    assert compare(expected, {"a": expected["a"], "b": torch.tensor(float("nan"))}, 1e-3, 0.0)[0] == float("inf")
    assert compare({"n": torch.tensor([4.0])}, {"n": torch.tensor([5.0])}, 0.0, 0.0) == (
        float("inf"), "n: 5 replayed vs 4 eager")  # exact: any difference
    assert compare({"n": torch.ones(2)}, {"n": torch.ones(3)}, 0.0, 0.0)[0] == float("inf")


def test_a_trainer_with_a_graphed_step_is_freed_without_the_garbage_collector():
    """The GraphedStep holds the trainer's methods weakly: no reference cycle keeps a finished trainer (its model,
    Adam state, data and graph memory pool) alive until a full collection."""
    trainer, _, _ = _warm_trainer()
    trainer.cuda_graphs = True  # on a CPU only to build the GraphedStep: nothing here runs it
    graphed = trainer._step_function()
    assert isinstance(graphed, GraphedStep) and graphed.check.state()  # reaches the live trainer's state
    gc.collect()
    gc.disable()
    try:
        alive = weakref.ref(trainer)
        del trainer
        assert alive() is None
    finally:
        gc.enable()


def _epochs_with_a_stand_in_graph(monkeypatch, replay_fault=None):
    """Two epochs of a CPU trainer through GraphedStep, its CUDA parts stood in for: warm-up on the current
    stream, no probe, and a 'graph' that runs the step eagerly at each replay (with `replay_fault` patched in)."""
    import genmodels.cuda_graph as cuda_graph

    def capture(self, x):
        def replay():
            with monkeypatch.context() as m:
                if replay_fault:
                    m.setattr(*replay_fault(trainer))
                self.outputs = self.step(self.static_input)

        self.static_input, self.graph = x.clone(), SimpleNamespace(replay=replay)
        replay()
        return self.outputs

    monkeypatch.setattr(cuda_graph.GraphedStep, "_on_side_stream", lambda self, x: self.step(x))
    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture", capture)
    monkeypatch.setattr(cuda_graph, "_no_host_syncs", contextlib.nullcontext)
    trainer = make_trainer("vae", dict(TINY, steps_per_epoch=6), *IMAGES)
    trainer.cuda_graphs = True
    return [trainer.train_epoch()["train_loss"] for _ in range(2)], trainer._graphed


@pytest.fixture(scope="module")
def eager_losses():
    trainer = make_trainer("vae", dict(TINY, steps_per_epoch=6), *IMAGES)
    return [trainer.train_epoch()["train_loss"] for _ in range(2)]


def test_a_checked_capture_trains_as_the_eager_step_does(monkeypatch, eager_losses):
    """The self-check's extra eager step and its restore leave no trace: the same losses as without graphs."""
    losses, graphed = _epochs_with_a_stand_in_graph(monkeypatch)
    assert graphed.status == "graphed: self-check passed (largest difference 0.0% of its tolerance)"
    assert losses == eager_losses


def test_a_capture_that_fails_its_self_check_warns_and_trains_eagerly(monkeypatch, eager_losses):
    with pytest.warns(UserWarning, match=r"training step: self-check failed \(.*; it runs eagerly"):
        losses, graphed = _epochs_with_a_stand_in_graph(monkeypatch, lambda t: (t.optimizer, "step", lambda: None))
    assert graphed.status.startswith("eager: self-check failed (") and not graphed.captured
    assert losses == eager_losses  # the failed replay undone, every step eager
