"""Whole-step CUDA graphs (genmodels.cuda_graph): the same training with graphs on and off, for every model.

The CUDA tests skip on a machine without a GPU; the CPU tests check what the graph path changed for every device
(optimizer state that moves between devices, the EMA's step on the device)."""
import math
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT, make_trainer

from bench.common import BENCH_MODELS, bench_config, bench_images
from genmodels.engine import Diverged
from genmodels.io import save_atomic

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STEPS = 6  # per epoch: 3 eager warm-up steps, the capture, then replays


def _trainer(name, graphs, device, **overrides):
    model_name, params = bench_config(name, "small")
    params.update(steps_per_epoch=STEPS, seed=3, cuda_graphs=graphs, **overrides)
    bs = int(params["batch_size"])
    images = bench_images(bs * (STEPS + 1), seed=1)
    return make_trainer(model_name, params, images, images[:bs], device=device)


def test_a_checkpoint_written_with_fused_capturable_adam_resumes_on_cpu(tmp_path):
    """A CUDA run's optimizer state says fused and capturable, with its step counts on the GPU: Adam's
    load_state_dict would keep those flags; on a CPU the run's own settings win and training goes on."""
    trainer = _trainer("vae", True, "cpu")
    trainer.train_epoch()
    state = trainer.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = group["capturable"] = True
    save_atomic(state, tmp_path / "state.pt")  # through a file, as a resume reads it: no tensors shared
    expected = trainer.train_epoch()["train_loss"]  # before the resume: both draw from torch's global generator
    resumed = _trainer("vae", True, "cpu")
    resumed.load(tmp_path / "state.pt")
    assert not resumed.cuda_graphs
    assert all(not g["capturable"] and not g["fused"] for g in resumed.optimizer.param_groups)
    assert resumed.train_epoch()["train_loss"] == pytest.approx(expected, rel=1e-6)
    assert float(resumed._step_on_device) == resumed.step == 2 * STEPS


@cuda
@pytest.mark.parametrize("name", list(BENCH_MODELS))
def test_graphs_train_as_the_eager_step_does(name):
    """Every model: the graphed step is captured and passes its self-check, two epochs' losses match the eager
    step's from the same seed (same batches, same random draws; bf16 and cuDNN's algorithm choice leave small
    differences), and each epoch's metrics say how the step ran."""
    eager = _trainer(name, False, "cuda")  # each trainer seeds torch's generators as it is built: one after the other
    expected = [eager.train_epoch() for _ in range(2)]
    graphed = _trainer(name, True, "cuda")
    for a in expected:
        b = graphed.train_epoch()
        assert a.keys() == b.keys()
        for key in (k for k in a if k.startswith("train_")):
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-3), (name, key)
        assert (a["graph_status"], a["graph_captured"]) == ("off: train.cuda_graphs=false", 0)
        assert b["graph_status"].startswith("graphed: self-check passed") and b["graph_captured"] == 1, b
    assert graphed.graph_captured and not eager.graph_captured
    assert graphed.step == eager.step == 2 * STEPS


@cuda
def test_vqvae_captures_each_stage():
    trainer = _trainer("vqvae", True, "cuda", stage1_epochs=1, epochs=2)
    trainer.train_epoch()
    first = trainer._graphed
    assert trainer.graph_captured
    metrics = trainer.train_epoch()  # stage 2: the autoencoder is frozen, the prior trains
    assert trainer.graph_captured and trainer._graphed is not first
    assert metrics["graph_status"].startswith("graphed: self-check passed")
    assert all(not p.requires_grad for p in trainer.model.encoder.parameters())


@cuda
def test_graphed_resume_continues_as_the_run_that_did_not_stop(tmp_path):
    trainer = _trainer("ncsn", True, "cuda")
    trainer.train_epoch()
    trainer.save(tmp_path / "state.pt")
    a = trainer.train_epoch()  # before the resume: both draw from torch's global generators
    resumed = _trainer("ncsn", True, "cuda")
    resumed.load(tmp_path / "state.pt")
    b = resumed.train_epoch()
    assert resumed.graph_captured
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-2)


@cuda
def test_divergence_is_caught_inside_a_graph():
    trainer = _trainer("vae", True, "cuda", steps_per_epoch=60)
    trainer.train_epoch()
    assert trainer.graph_captured
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))  # in place: the graph reads the same memory
    with pytest.raises(Diverged):
        trainer.train_epoch()


@cuda
def test_a_graphed_epoch_syncs_with_the_host_once():
    trainer = _trainer("vae", True, "cuda")
    trainer.train_epoch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in caught) <= 1


@cuda
def test_a_step_that_syncs_with_the_host_runs_eagerly_and_no_capture_begins():
    """The probe finds the host read before any capture: CUDA stays usable (on torch 2.11 a failed capture leaves
    the default generator unable to draw, which the last line would show)."""
    from genmodels.cuda_graph import GraphedStep

    def step(x):
        return torch.tensor(float(x.sum().item()), device=x.device)  # a host read: not capturable

    graphed = GraphedStep(step, warmup=1)
    x = torch.ones(4, device="cuda")
    graphed(x)
    with pytest.warns(UserWarning, match="not capturable"):
        value = graphed(x)
    assert graphed.status.startswith("eager: not capturable") and not graphed.captured
    assert float(value) == 4.0 and float(graphed(x * 2)) == 8.0
    assert torch.cuda.get_sync_debug_mode() == 0  # the probe's mode undone
    assert torch.rand(1, device="cuda").isfinite().all()


@cuda
def test_a_random_step_passes_the_self_check_and_draws_as_the_eager_one():
    """The replay's noise is the eager step's, and the RNG state it leaves is the same (the self-check's exact
    comparison relies on it)."""
    from genmodels.cuda_graph import GraphedStep

    def step(x):
        return x + torch.randn_like(x)

    x = torch.zeros(4096, device="cuda")
    torch.manual_seed(0)
    expected = [step(x) for _ in range(5)]
    torch.manual_seed(0)
    graphed = GraphedStep(step, warmup=2)
    got = [graphed(x).clone() for _ in range(5)]
    assert graphed.status.startswith("graphed: self-check passed"), graphed.status
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a)


CAPTURE_FAILS = """
import torch
from genmodels.cuda_graph import GraphCaptureFailed, GraphedStep

def step(x):
    torch.cuda.current_stream().query()  # not a host sync, so the probe lets it by; not allowed while capturing
    return x * 2

graphed = GraphedStep(step, warmup=1, off_switch="train.cuda_graphs=false")
x = torch.ones(4, device="cuda")
graphed(x)
try:
    graphed(x)
    print("not stopped:", graphed.status, flush=True)
except GraphCaptureFailed as e:
    print("stopped:", e, flush=True)
"""


@cuda
def test_a_capture_that_fails_stops_and_names_the_switch():
    # In a process of its own: the failed capture leaves CUDA unusable there on torch 2.11.
    result = subprocess.run([sys.executable, "-c", CAPTURE_FAILS], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("stopped:")]
    assert lines, result.stdout + result.stderr
    assert "CUDA graph capture of the step failed" in lines[0] and lines[0].endswith("train.cuda_graphs=false")


@cuda
def test_compile_modes_with_inductor_graphs_replace_the_engines():
    trainer = _trainer("vae", True, "cuda", compile=True, compile_mode="reduce-overhead")
    assert not trainer.cuda_graphs  # Inductor's graphs cannot be captured inside the engine's
    metrics = trainer.train_epoch()
    assert math.isfinite(metrics["train_loss"]) and not trainer.graph_captured
    assert metrics["graph_status"] == "off: compile_mode=reduce-overhead makes its own CUDA graphs"


def test_train_cuda_graphs_false_reaches_the_sampler(monkeypatch):
    """The retry of a trial whose capture failed runs with train.cuda_graphs=false: NCSN's Langevin steps (the
    other graph a trial captures) must sample eagerly then too, in the EMA copy that evaluation samples from."""
    import genmodels.models.ncsn as ncsn

    asked = []
    langevin = ncsn.annealed_langevin
    monkeypatch.setattr(ncsn, "annealed_langevin", lambda *a, **k: asked.append(k["graphed"]) or langevin(*a, **k))
    for graphs in (True, False):
        trainer = _trainer("ncsn", graphs, "cpu", ema_decay=0.9)
        assert trainer.ema is not None and trainer.eval_model.cuda_graphs is graphs is trainer.model.cuda_graphs
        trainer.eval_model.sample(2, budget=0.01)
    assert asked == [False, False]  # a CPU never replays graphs, whatever the setting


@cuda
def test_langevin_samples_eagerly_when_train_cuda_graphs_is_off(monkeypatch):
    import genmodels.samplers.langevin as langevin

    built = []
    graphed_step = langevin.GraphedStep
    monkeypatch.setattr(langevin, "GraphedStep", lambda *a, **k: built.append(k["off_switch"]) or graphed_step(*a, **k))
    for graphs in (False, True):
        _trainer("ncsn", graphs, "cuda").eval_model.sample(4, budget=0.01)
    assert built == ["train.cuda_graphs=false"]  # only the run with graphs on captured the Langevin step


@cuda
def test_a_graph_whose_update_is_wrong_fails_its_self_check_on_cuda(monkeypatch):
    """The captured step leaves Adam's update out while its step counts still advance (the fault the update
    comparison is for): the self-check says so, the step trains eagerly, and the epoch's losses stay finite."""
    from genmodels.cuda_graph import GraphedStep

    trainer = _trainer("vae", True, "cuda")
    capture = GraphedStep._capture

    def capture_without_update(self, x):
        def counts_only():
            for state in trainer.optimizer.state.values():
                state["step"].add_(1)

        with monkeypatch.context() as m:
            m.setattr(trainer.optimizer, "step", counts_only)
            return capture(self, x)

    monkeypatch.setattr(GraphedStep, "_capture", capture_without_update)
    with pytest.warns(UserWarning, match=r"self-check failed \(model update"):
        metrics = trainer.train_epoch()
    assert metrics["graph_status"].startswith("eager: self-check failed (model update") and not trainer.graph_captured
    assert math.isfinite(metrics["train_loss"])


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_langevin_chunks_of_one_shape_are_compared_once_and_pass_on_cuda(monkeypatch, precision):
    """An FID run samples in chunks of one size, each its own graph: the first is compared (under bf16 autocast with
    bf16's tolerance), the others of that size not; every chunk replays."""
    import genmodels.cuda_graph as cuda_graph

    monkeypatch.setattr(cuda_graph, "_COMPARED", {})
    compared = []
    compare = cuda_graph.compare
    monkeypatch.setattr(cuda_graph, "compare", lambda *a: compared.append(a) or compare(*a))
    model = _trainer("ncsn", True, "cuda", sampling_precision=precision).eval_model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.sample(3 * 64, batch_size=64, T=3)
    assert not [w for w in caught if "CUDA graph" in str(w.message)]  # no chunk fell back to eager
    comparisons = len(compared)
    assert comparisons and cuda_graph._COMPARED and all(v.startswith("self-check passed (")
                                                        for v in cuda_graph._COMPARED.values())
    model.sample(2 * 64, batch_size=64, T=3)
    assert len(compared) == comparisons  # the same shape again: not compared again
