"""Trials run one after another in one process (Tune's reuse_actors): a trial that ends leaves nothing of itself
behind for the next. No Ray: tune's calls are faked as in tests/faults/test_trial_resume.py, and the trainable builds
its Experiment as a sweep's trial does; the Experiment class is wrapped only to hold a weak reference to each one."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from genmodels.data import synthetic_images

TINY = {"model.arch": "conv-small", "model.width": 4, "model.latent": 4, "train.batch_size": 8,
        "train.steps_per_epoch": 2, "train.epochs": 2}
NCSN_TINY = {"model.arch": "unet", "model.width": 8, "model.unet_blocks": 1, "model.sigma_1": 20.0,
             "model.num_levels": 2, "model.langevin_steps": 1, "train.ema_decay": 0.9, "train.batch_size": 8,
             "train.steps_per_epoch": 2, "train.epochs": 2}
CONFIGS = {"vae": ({"model_name": "vae", **TINY}, "test_bpd"),
           "ncsn": ({"model_name": "ncsn", **NCSN_TINY}, "test_dsm_loss")}


@pytest.fixture
def trials(tmp_path, monkeypatch):
    """run(config, metric, trial_id): train_trial as a sweep's trial, in this process; returns its reports. `made`:
    a weak reference to each Experiment the trainable built, in order."""
    import trainables.trainable as tr

    made: list[weakref.ref] = []

    class Recorded(tr.Experiment):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(tr, "Experiment", Recorded)
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.chdir(tmp_path)
    data = {"train": synthetic_images(32), "test": synthetic_images(16, seed=1)}

    def run(config, metric, trial_id):
        reports = []
        monkeypatch.setattr(tr.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: trial_id})())
        monkeypatch.setattr(tr.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
        tr.train_trial(config, data, tr.TrialPlan(metric), folder=str(tmp_path / "sweep"))
        return reports

    run.made = made
    return run


@pytest.mark.parametrize("model", list(CONFIGS))
def test_a_trial_that_ended_is_freed_before_the_next_one_starts(trials, model):
    """Once a trial has ended, nothing holds its Experiment (model, optimizer state, data on the device, CUDA graph
    pool): a collection frees the first trial's, and from then on each trial's goes by its reference count alone
    (the garbage collector off), as soon as train_trial returns. (The first trial in a process may sit in reference
    cycles made by torch's first imports, such as torch._dynamo's inside Adam's first __init__, until a collection.)"""
    config, metric = CONFIGS[model]
    assert [r["epoch"] for r in trials(config, metric, "t1")] == [1, 2]
    gc.collect()
    assert trials.made[0]() is None
    gc.disable()
    try:
        for n, trial_id in enumerate(["t2", "t3"], 1):
            assert [r["epoch"] for r in trials(config, metric, trial_id)] == [1, 2]
            assert len(trials.made) == n + 1 and trials.made[n]() is None, gc.get_referrers(trials.made[n]())
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_trial_that_ended_leaves_no_cuda_memory_allocated(trials, graphs):
    """On the GPU: what a trial allocated (the data on the device, the model, Adam, the EMA, a CUDA graph's pool) is
    released when it ends, so the second trial in the process ends where the first did."""
    config, metric = CONFIGS["ncsn"]
    config = {**config, "train.cuda_graphs": graphs, "train.steps_per_epoch": 6}
    trials(config, metric, "t0")  # the process's first trial: its lazy imports, cuBLAS's and cuDNN's workspaces
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    reports = trials(config, metric, "t1")
    torch.cuda.synchronize()
    after_one = torch.cuda.memory_allocated()
    trials(config, metric, "t2")
    torch.cuda.synchronize()
    after_two = torch.cuda.memory_allocated()
    assert trials.made[1]() is None and trials.made[2]() is None
    if graphs:
        assert all(r.get("graph_captured") for r in reports), reports
    assert after_one - before <= 1 << 20 and after_two - after_one <= 1 << 20, (before, after_one, after_two)


def test_a_process_pays_its_one_time_costs_at_its_first_trial(trials, monkeypatch):
    """The first trial in a process loads what every later one there reuses (torch's lazy imports, the FID network
    and torchmetrics) before its first epoch, and reports the seconds that took in each of its reports; the next
    trial reports 0. The progress line's pace leaves those seconds out (tests/sweeps/test_dry_run.py)."""
    import trainables.evaluation as ev
    import trainables.trainable as tr

    monkeypatch.setattr(tr, "_process_prepared", False)
    monkeypatch.setattr(ev, "_scorers", {})
    assert tr.prepare_process("cpu", "standin", None) > 0 and ("standin", None, "cpu") in ev._scorers
    assert tr.prepare_process("cpu", "standin", None) == 0.0
    monkeypatch.setattr(tr, "_process_prepared", False)
    config, metric = CONFIGS["vae"]
    first, second = trials(config, metric, "t1"), trials(config, metric, "t2")
    assert len({r["process_setup_s"] for r in first}) == 1 and first[0]["process_setup_s"] > 0
    assert {r["process_setup_s"] for r in second} == {0.0}


def test_what_a_prepared_process_holds_is_frozen_out_of_each_trials_collection(monkeypatch):
    """Every trial starts with a full collection (train_trial). prepare_process freezes what the process holds then
    (torch, Ray, torchmetrics: hundreds of thousands of objects, for as long as it lives), so that collection walks
    only what came after: before, it walked them all, 0.28 s a trial on a 2-core CPU (docs/PERFORMANCE.md)."""
    import trainables.trainable as tr

    monkeypatch.setattr(tr, "_process_prepared", False)
    gc.unfreeze()
    try:
        walked_before = len(gc.get_objects())
        tr.prepare_process("cpu", "standin", None)
        assert gc.get_freeze_count() >= walked_before // 2 and len(gc.get_objects()) < walked_before // 10
    finally:
        gc.unfreeze()  # this test process runs other tests: leave it as it was


def test_a_processs_first_trial_collects_only_after_the_process_is_frozen(trials, monkeypatch):
    """The collection at a trial's start comes after prepare_process. Before it, in a new process, it walked all the
    imports had made: 0.2 s of the first trial's first epoch on a 2-core CPU, outside `process_setup_s`, which the
    progress line then took for an epoch's cost."""
    import trainables.trainable as tr

    monkeypatch.setattr(tr, "_process_prepared", False)
    frozen_then: list[int] = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: (frozen_then.append(gc.get_freeze_count()), collect(*args))[1])
    gc.unfreeze()
    try:
        trials(*CONFIGS["vae"], "t1")
        assert frozen_then and frozen_then[0] > 0
    finally:
        gc.unfreeze()  # this test process runs other tests: leave it as it was


def test_a_sigterm_lost_in_a_weakref_callback_still_ends_the_trial_process_quietly():
    """Ray's SIGTERM handler raises SystemExit; raised inside a __del__ or weakref callback, Python would print it
    and go on. In a prepared trial process the worker exits with that code instead, and prints nothing; any other
    exception there is printed as Python does."""
    import subprocess
    import sys

    script = """
import sys
from trainables.trainable import prepare_process
prepare_process("cpu")
class Other:
    def __del__(self):
        raise ValueError("not a signal")
class Stopped:
    def __del__(self):
        raise SystemExit(3)
Other()
print("after other", flush=True)
Stopped()
print("after stopped", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines()[-1] == "after other"
    assert "ValueError: not a signal" in done.stderr and "SystemExit" not in done.stderr, done.stderr
