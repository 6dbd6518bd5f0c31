"""`--gpus-per-trial auto` when a probe's CUDA graph capture fails: the probe is run again in a new process with CUDA
graphs off (as Tune's retry of such a trial runs), and the sweep starts on that measurement. GPU and probe processes
stood in for on the CPU."""
from __future__ import annotations

from concurrent.futures import Future

import pytest

GiB = 1 << 30


class InProcess:
    """A stand-in for the spawned probe process: runs what it is given at once, in this process."""

    def __init__(self, opened: list[InProcess]):
        self.number, self.runs, self.shut = len(opened), [], False
        opened.append(self)

    def submit(self, fn, *args):
        assert not self.shut, "a probe submitted to a process that was shut down"
        future: Future = Future()
        self.runs.append(args[1])
        try:
            future.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - handed to the caller as a process pool hands it over
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True):
        self.shut = True


@pytest.fixture
def probes(monkeypatch):
    import torch
    from ray import tune

    import sweeps.packing as packing
    from genmodels.cuda_graph import GraphCaptureFailed

    opened: list[InProcess] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(packing, "_probe_process", lambda: InProcess(opened))
    monkeypatch.setattr(packing, "mps_running", lambda: True)

    def trial_memory(model_name, params, train, test):
        graphs = params["train.cuda_graphs"]
        if graphs and params["model.arch"] == "refinenet":
            raise GraphCaptureFailed("CUDA graph capture of the ncsn training step failed (operation not permitted "
                                     "when stream is capturing), which leaves this process's CUDA state unusable; "
                                     "run it with CUDA graphs off: train.cuda_graphs=false")
        peak = {"unet": 6, "refinenet": 9}[params["model.arch"]] * GiB + (2 * GiB if graphs else 0)
        return {"peak_allocated": peak, "peak_reserved": peak, "total": 80 * GiB}

    monkeypatch.setattr(packing, "trial_memory", trial_memory)
    config = {"model.arch": tune.choice(["unet", "refinenet"]), "model.width": tune.choice([64, 128]),
              "train.cuda_graphs": True}
    return packing, config, opened


def test_a_probe_whose_capture_fails_is_run_again_without_graphs_in_a_new_process(probes, capsys):
    packing, config, opened = probes
    fraction = packing.auto_gpus_per_trial("ncsn", config, {"train": None, "test": None})
    out = capsys.readouterr().out
    assert "a probe's CUDA graph capture failed (CUDA graph capture of the ncsn training step failed" in out
    assert "probing that config again with CUDA graphs off" in out
    first, second = opened  # the process whose CUDA state the failed capture spoilt is not used again
    assert first.shut and second.shut
    assert [(p["model.arch"], p["train.cuda_graphs"]) for p in first.runs] == [("unet", True), ("refinenet", True)]
    assert [(p["model.arch"], p["train.cuda_graphs"]) for p in second.runs] == [("refinenet", False)]
    assert all(p["model.width"] == 128 for p in first.runs + second.runs)
    # the worst probe: RefineNet without graphs, 9 GiB + 1 GiB of context; 0.9 * 80 GiB / 10 GiB = 7 trials
    assert fraction == pytest.approx(0.1428) and "9.00 GiB" in out and "7 trials per 80 GiB GPU" in out


def test_a_probe_that_fails_without_graphs_too_still_stops_the_start(probes, monkeypatch):
    from genmodels.cuda_graph import GraphCaptureFailed

    packing, config, opened = probes

    def fails(model_name, params, train, test):
        if params["train.cuda_graphs"]:
            raise GraphCaptureFailed("capture failed")
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(packing, "trial_memory", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        packing.auto_gpus_per_trial("ncsn", config, {"train": None, "test": None})
    assert len(opened) == 2 and all(p.shut for p in opened)
