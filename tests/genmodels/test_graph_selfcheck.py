"""The self-check at CUDA graph capture (genmodels.cuda_graph.first_replay), on a CPU: a real Trainer's step is the
eager reference, and a stand-in for capture-and-replay puts in the faults a graph could have, at a tiny size and at
a full preset's width and learning rate. Also on a CPU: the GraphedStep's handling of the verdict in a training epoch
and in chunks of Langevin chains (its CUDA parts stood in for), its streams after a probe that fires, and that a
Trainer and its GraphedStep are no reference cycle. The CUDA side is in test_cuda_graphs.py."""
import contextlib
import gc
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
from conftest import make_trainer

import genmodels.cuda_graph as cuda_graph
from bench.common import bench_config
from genmodels.cuda_graph import GraphedStep, StepCheck, compare, first_replay
from genmodels.data import synthetic_images
from sweeps.spaces import NCSN_SPACE

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
    return StepCheck(trainer._step_state, trainer._step_values, trainer._step_counters, moved=trainer._step_moved)


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
    assert not graphed and verdict.startswith("self-check failed (model update")
    _assert_one_step(trainer, one_step)  # the bad replay undone, the step run eagerly
    # With no values or updates compared, the step counts give it away.
    _, graphed, verdict = first_replay(x, trainer._step, replay,
                                       _check(trainer)._replace(compared=lambda _: {}, moved=dict))
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


# ------------------------------------------------------------------ a wrong update at a full preset's size

FULL_LR = 2e-4  # one of the learning rates NCSN's full sweeps search


@pytest.fixture(scope="module")
def full_width():
    """The NCSN U-Net at its full presets' width with a learning rate they search, three steps in (Adam's state
    made, the EMA moving), at batch 2 on a CPU; and the batches that follow."""
    model_name, params = bench_config("ncsn", "full", batch_size=2)
    assert params["width"] == max(NCSN_SPACE.params["width"].values) == 128
    assert FULL_LR in NCSN_SPACE.params["lr"].values and params["ema_decay"] > 0
    images = synthetic_images(32, seed=0)
    trainer = make_trainer(model_name, {**params, "lr": FULL_LR, "seed": 3}, images, images[:2])
    batches = iter(trainer.train_batches.epoch(8))
    for _ in range(3):
        trainer._step(next(batches))
    return trainer, batches


def _with_old_norms(check, trainer, seen):
    """`check`, recording at each comparison what the self-check compared of the weights before: their norms."""
    models = {"parameter norms": trainer.model, "EMA norms": trainer.ema.model}

    def compared(outputs):
        seen.append({k: torch.stack(torch._foreach_norm(list(m.parameters()))).double().clone()
                     for k, m in models.items()})
        return check.compared(outputs)

    return check._replace(compared=compared)


def test_a_wrong_update_is_caught_at_a_full_presets_width_and_learning_rate(full_width):
    """One Adam step at width 128 and lr 2e-4 moves a large parameter's norm by far less than any tolerance on it,
    so the norms (what the self-check compared before) pass a replay that loses that tensor's gradient while the
    step counts advance. The update itself (after - before, per tensor) gives that away, and a missing update and
    a wrong gradient scale too; a faithful replay passes."""
    trainer, batches = full_width
    parameters = list(trainer.model.parameters())
    largest = max(parameters, key=torch.Tensor.numel)
    adam = trainer.optimizer.step

    def no_update():  # the step counts advance, the weights stay
        for state in trainer.optimizer.state.values():
            state["step"] += 1

    def one_gradient_lost():  # one tensor's gradient never reaches Adam
        largest.grad.zero_()
        adam()

    def gradients_doubled():  # e.g. a loss scale left in
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(2)
        adam()

    seen = []
    _, graphed, verdict = first_replay(next(batches), trainer._step, trainer._step,
                                       _with_old_norms(_check(trainer), trainer, seen))
    assert graphed and verdict == "self-check passed (largest difference 0.0% of its tolerance)"
    for name, fault in {"no update": no_update, "one gradient lost": one_gradient_lost,
                        "gradients doubled": gradients_doubled}.items():
        def replay(x):
            with pytest.MonkeyPatch.context() as m:
                m.setattr(trainer.optimizer, "step", fault)
                return trainer._step(x)

        seen = []
        x = next(batches)
        before = [p.detach().clone() for p in parameters]
        _, graphed, verdict = first_replay(x, trainer._step, replay, _with_old_norms(_check(trainer), trainer, seen))
        assert not graphed and verdict.startswith("self-check failed (model update["), (name, verdict)
        assert any(not torch.equal(p, b) for p, b in zip(parameters, before))  # the eager step's update stands
        if name == "one gradient lost":
            # The norms, at the old tolerance, miss it: the large tensor's norm moves by ~4e-5 of itself. (They
            # catch the other two this early only through tensors that start at zero and are still small.)
            excess, where = compare(*seen, 1e-3, 1e-5)
            assert excess < 1, where


@pytest.mark.parametrize("times_the_tolerance, caught", [(1.1, True), (0.9, False)])
def test_an_update_is_held_to_its_tolerance(times_the_tolerance, caught):
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(5))
    directions = torch.randn(4, 5), torch.randn(5)
    check = StepCheck(state=lambda: [weight, bias], compared=lambda _: {}, moved=lambda: {"update": [weight, bias]})

    def step(x, bias_share=1.0):
        with torch.no_grad():
            weight.add_(directions[0], alpha=1e-3)
            bias.add_(directions[1], alpha=1e-3 * bias_share)

    def replay(x):  # the bias's update off by a share of the update tolerance
        step(x, 1 + times_the_tolerance * check.update_rtol)

    _, graphed, verdict = first_replay(torch.zeros(1), step, replay, check)
    assert graphed is not caught, verdict
    assert verdict.startswith("self-check failed (update[1]: ") if caught else verdict.startswith("self-check passed")


def test_an_update_is_measured_from_the_saved_state_only():
    w, other = torch.zeros(3), torch.zeros(3)
    check = StepCheck(state=lambda: [w], compared=lambda _: {}, moved=lambda: {"update": [w, other]})
    with pytest.raises(ValueError, match="StepCheck.moved must be one of StepCheck.state"):
        first_replay(torch.zeros(1), lambda x: None, lambda x: None, check)


# ------------------------------------------------------------------------ GraphedStep's CUDA parts stood in for

class FakeStream:
    """torch.cuda.Stream's ordering calls, written to `events`."""

    def __init__(self, events, name="side"):
        self.events, self.name = events, name

    def wait_stream(self, other):
        self.events.append(f"{self.name} waits for {other.name}")


def test_a_probe_that_fires_leaves_the_main_stream_after_the_side_streams_half_step(monkeypatch):
    """The probed step raises part way (a host sync) on the side stream: the main stream waits for what it queued
    there before the restore copies on the main stream, then the step runs again from the saved state."""
    events = []
    main = FakeStream(events, "main")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: main)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: FakeStream(events))

    @contextlib.contextmanager
    def on(stream):
        events.append(f"on {stream.name}")
        try:
            yield
        finally:
            events.append(f"off {stream.name}")

    monkeypatch.setattr(torch.cuda, "stream", on)
    set_rng_state = cuda_graph._set_rng_state
    monkeypatch.setattr(cuda_graph, "_set_rng_state", lambda *a: events.append("restore") or set_rng_state(*a))
    state = torch.zeros(3)
    probing = []

    def step(x):
        state.add_(x)  # written before the sync: half a step
        events.append("step")
        if probing:
            raise RuntimeError("called a synchronizing CUDA operation")
        return state.clone()

    @contextlib.contextmanager
    def probe():
        probing.append(1)
        try:
            yield
        finally:
            probing.clear()

    graphed = GraphedStep(step, check=StepCheck(state=lambda: [state]))

    def replay(x):
        raise AssertionError("no capture after the probe fired")

    out, captured, verdict = first_replay(torch.ones(3), graphed._on_side_stream, replay, graphed.check, probe=probe)
    assert not captured and verdict == "not capturable (called a synchronizing CUDA operation)"
    assert torch.equal(state, torch.ones(3)) and torch.equal(out, state)  # one step stands, the half step undone
    assert events == ["side waits for main", "on side", "step", "off side", "main waits for side", "restore",
                      "side waits for main", "on side", "step", "off side", "main waits for side"]


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """GraphedStep's CUDA parts stood in for on a CPU: warm-up on the current stream, no probe, and a 'graph' that
    runs the step eagerly at each replay, its outputs through `fault` (set it to put one in). Returns a namespace
    with `captures` (the names of the steps captured) and `fault`; the process's record of compared steps starts
    empty."""
    stand_in = SimpleNamespace(captures=[], fault=lambda outputs: outputs)

    def capture(self, x):
        def replay():
            self.outputs = stand_in.fault(self.step(self.static_input))

        self.static_input, self.graph = x.clone(), SimpleNamespace(replay=replay)
        stand_in.captures.append(self.name)
        replay()
        return self.outputs

    monkeypatch.setattr(cuda_graph.GraphedStep, "_on_side_stream", lambda self, x: self.step(x))
    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture", capture)
    monkeypatch.setattr(cuda_graph, "_no_host_syncs", contextlib.nullcontext)
    monkeypatch.setattr(cuda_graph, "_COMPARED", {})
    return stand_in


class Scores(torch.nn.Module):
    def score(self, x):
        return -x


SCORES = Scores()


def _langevin_chunk(n, steps=4, check=None, model=SCORES):
    """A chunk of n chains, as annealed_langevin runs one: its step made anew (around the model's bound score
    method), then graphed (2 warm-ups)."""
    score_fn = model.score

    def step(x):
        return x + 0.01 * score_fn(x) + 0.1 * torch.randn_like(x)

    graphed = GraphedStep(step, warmup=2, name="Langevin step", check=check)
    x = torch.zeros(n, 3, 8, 8)
    for _ in range(steps):
        x = graphed(x)
    return graphed


def test_a_stateless_step_is_compared_once_per_shape(stand_in_graphs, monkeypatch):
    """Each chunk of Langevin chains captures its own graph; the comparison (its outputs copied to the host) runs for
    the first chunk of each shape only, for each model (another trial in a reused process samples another). A step
    with state of its own (a training step) is compared every time."""
    compared = []
    compare_values = cuda_graph.compare
    monkeypatch.setattr(cuda_graph, "compare", lambda *a: compared.append(a) or compare_values(*a))
    first = _langevin_chunk(8)
    assert first.status == "graphed: self-check passed (largest difference 0.0% of its tolerance)" and compared
    done = len(compared)
    second = _langevin_chunk(8)
    assert second.status.startswith("graphed: self-check passed earlier") and second.captured
    assert len(compared) == done and len(stand_in_graphs.captures) == 2
    last = _langevin_chunk(3)  # an FID run's last, smaller chunk: another shape, compared
    assert last.status.startswith("graphed: self-check passed (") and len(compared) > done
    done = len(compared)
    another = _langevin_chunk(8, model=Scores())  # another model's score, the same shape: compared
    assert another.status.startswith("graphed: self-check passed (") and len(compared) > done
    done = len(compared)
    _langevin_chunk(8, check=StepCheck())  # a check of its own: compared at every capture
    assert len(compared) > done


def test_a_stateless_step_that_failed_its_check_runs_eagerly_for_that_shape(stand_in_graphs):
    stand_in_graphs.fault = lambda outputs: outputs + 1.0
    with pytest.warns(UserWarning, match="Langevin step: self-check failed"):
        first = _langevin_chunk(8)
    assert first.status.startswith("eager: self-check failed (output 0 / RMS[") and not first.captured
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned about once, not per chunk
        second = _langevin_chunk(8)
    assert second.status.startswith("eager: self-check failed (") and "earlier in this process" in second.status
    assert not second.captured and len(stand_in_graphs.captures) == 1  # not captured again


@pytest.mark.parametrize("autocast, passes", [(False, False), (True, True)])
def test_a_step_under_bf16_autocast_is_held_to_bf16s_tolerance(stand_in_graphs, autocast, passes):
    """A pixel near 0 that one bf16 rounding flip moves by 5e-4 of the chains' RMS: within the tolerance under bf16
    autocast (a non-deterministic cuDNN kernel may do that), a failure in fp32."""
    def off_at_the_smallest(outputs):
        rms = outputs.pow(2).mean().sqrt()
        flat = outputs.flatten().clone()
        flat[flat.abs().argmin()] += 5e-4 * rms
        return flat.view_as(outputs)

    stand_in_graphs.fault = off_at_the_smallest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            graphed = _langevin_chunk(8)
    assert graphed.captured is passes, graphed.status
    assert graphed.status.startswith("graphed: self-check passed" if passes else "eager: self-check failed (output 0")
