"""Whole-step CUDA graphs (genmodels.cuda_graph): the same training with graphs on and off, for every model.

The CUDA tests skip on a machine without a GPU; the CPU tests check what the graph path changed for every device
(optimizer state that moves between devices, the EMA's step on the device)."""
import warnings

import pytest
import torch
from conftest import make_trainer

from genmodels.bench.common import BENCH_MODELS, bench_config, bench_images
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
    """Every model: the graphed step is captured, and two epochs' losses match the eager step's from the same seed
    (same batches, same random draws; bf16 and cuDNN's algorithm choice leave small differences)."""
    eager = _trainer(name, False, "cuda")  # each trainer seeds torch's generators as it is built: one after the other
    expected = [eager.train_epoch() for _ in range(2)]
    graphed = _trainer(name, True, "cuda")
    for a in expected:
        b = graphed.train_epoch()
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-3), (name, key)
    assert graphed.graph_captured and not eager.graph_captured
    assert graphed.step == eager.step == 2 * STEPS


@cuda
def test_vqvae_captures_each_stage():
    trainer = _trainer("vqvae", True, "cuda", stage1_epochs=1, epochs=2)
    trainer.train_epoch()
    first = trainer._graphed
    assert trainer.graph_captured
    trainer.train_epoch()  # stage 2: the autoencoder is frozen, the prior trains
    assert trainer.graph_captured and trainer._graphed is not first
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
def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning():
    from genmodels.cuda_graph import GraphedStep

    def step(x):
        return torch.tensor(float(x.sum().item()), device=x.device)  # a host read: not capturable

    graphed = GraphedStep(step, warmup=1)
    x = torch.ones(4, device="cuda")
    graphed(x)
    with pytest.warns(UserWarning, match="CUDA graph capture"):
        value = graphed(x)
    assert graphed.capture_error and not graphed.captured
    assert float(value) == 4.0 and float(graphed(x * 2)) == 8.0


@cuda
def test_compile_modes_with_inductor_graphs_replace_the_engines():
    trainer = _trainer("vae", True, "cuda", compile=True, compile_mode="reduce-overhead")
    assert not trainer.cuda_graphs  # Inductor's graphs cannot be captured inside the engine's
    assert trainer.train_epoch()["train_loss"] == trainer.train_epoch()["train_loss"]  # finite, it trains
    assert not trainer.graph_captured
