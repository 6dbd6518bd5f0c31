"""A trial resumed after its driver stopped between Tune persisting a checkpoint and recording its report (Ctrl-C,
SIGKILL) reports again what the sweep's result.json lacks, once, and nothing it has. No Ray: tune's calls are
faked; the fake persists checkpoints into the trial's folder as Tune does, and records in result.json only the
reports the driver is taken to have seen."""
from __future__ import annotations

import json
import shutil

import pytest
from test_faults import TINY_VAE

from genmodels.data import synthetic_images


@pytest.fixture
def trial(tmp_path, monkeypatch):
    """run(epochs, recorded, stop_after=None, plan=None): train_trial in the trial folder `sweep/vae_t1`, every report
    appended to the returned list; `recorded(n)` says whether the n-th report of this run (1-based) reaches
    result.json; the run stops (a killed driver) after `stop_after` reports."""
    import trainables.trainable as tr

    folder = tmp_path / "sweep"
    trial_folder = folder / "vae_t1"
    trial_folder.mkdir(parents=True)
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tr.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.chdir(tmp_path)
    data = {"train": synthetic_images(16), "test": synthetic_images(8, seed=1)}
    saved = []

    def run(epochs, recorded, stop_after=None, plan=None):
        reports = []

        def report(metrics, checkpoint=None):
            if checkpoint is not None:  # persisted before the driver sees the report, as Tune does
                saved.append(trial_folder / f"checkpoint_{len(saved):06d}")
                shutil.copytree(checkpoint.path, saved[-1])
            reports.append(metrics)
            if recorded(len(reports)):
                with open(trial_folder / "result.json", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if len(reports) == stop_after:
                raise KeyboardInterrupt

        monkeypatch.setattr(tr.tune, "report", report)
        try:
            tr.train_trial({**TINY_VAE, "train.epochs": epochs}, data, plan or tr.TrialPlan("test_bpd"),
                           folder=str(folder))
        except KeyboardInterrupt:
            pass
        return reports

    run.trial_folder = trial_folder
    return run


def test_a_final_report_the_driver_missed_is_replayed_once_on_resume(trial):
    first = trial(2, recorded=lambda n: n == 1)  # the driver stopped before recording epoch 2
    assert [r["epoch"] for r in first] == [1, 2] and all(r["checkpointed"] for r in first)
    with open(trial.trial_folder / "result.json", "a") as f:
        f.write(json.dumps(first[1])[:40])  # or was killed writing it: a cut line records nothing
    again = trial(2, recorded=lambda n: True)
    assert len(again) == 1 and again[0]["replayed"] == 1
    assert {k: v for k, v in again[0].items() if k != "replayed"} == first[1]
    assert "final_test_iwae_bpd" in again[0] and "final_test_iwae_bpd" not in first[0]  # the final evaluation


def test_a_trial_resumed_mid_way_reports_every_epoch_it_trained_once(trial, capsys):
    import trainables.trainable as tr

    # epoch 1 without a checkpoint, 2 (a milestone) with one; the driver records epoch 1 only and is killed in 3
    plan = tr.TrialPlan("test_bpd", milestones=(2,), checkpoint_every_s=1e9)
    first = trial(3, recorded=lambda n: n == 1, stop_after=2, plan=plan)
    assert [(r["epoch"], r["checkpointed"]) for r in first] == [(1, 0), (2, 1)]
    capsys.readouterr()
    again = trial(3, recorded=lambda n: True, plan=plan)
    assert [(r["epoch"], r.get("replayed", 0)) for r in again] == [(2, 1), (3, 0)]
    assert again[1]["resumed_from_epoch"] == 2
    # the trial's own line names the checkpoint it continued from (Tune's may name an older one)
    said = [line for line in capsys.readouterr().out.splitlines() if "continues from" in line]
    assert len(said) == 1 and "checkpoint_000000" in said[0] and said[0].endswith("(epoch 2)"), said


def test_a_milestone_checkpoint_skipped_for_room_says_so_and_the_epoch_is_trained_again(trial, monkeypatch):
    """A full storage at the epoch-2 milestone: the trial keeps its epoch-1 checkpoint and reports epoch 2 with
    `checkpointed` 0 (in the report, in result.json and in what the next checkpoint carries); the driver stops. The
    resumed trial continues from epoch 1, trains epoch 2 again and, with room now, checkpoints it: that second
    report of epoch 2 says 1, truly, and result.json holds the first (0) and the second (1) in order."""
    import trainables.trainable as tr

    plan = tr.TrialPlan("test_bpd", milestones=(1, 2), checkpoint_every_s=1e9)
    room = iter([True, False])  # epoch 1 fits, epoch 2 does not
    monkeypatch.setattr(tr, "has_room", lambda folder, size: next(room, True))
    first = trial(3, recorded=lambda n: True, stop_after=2, plan=plan)
    assert [(r["epoch"], r["checkpointed"]) for r in first] == [(1, 1), (2, 0)]
    assert sorted(p.name for p in trial.trial_folder.glob("checkpoint_*")) == ["checkpoint_000000"]
    again = trial(3, recorded=lambda n: True, plan=plan)
    assert [(r["epoch"], r["checkpointed"], r["resumed_from_epoch"]) for r in again] == [(2, 1, 1), (3, 1, 1)]
    rows = [json.loads(line) for line in (trial.trial_folder / "result.json").read_text().splitlines()]
    assert [(r["epoch"], r["checkpointed"]) for r in rows] == [(1, 1), (2, 0), (2, 1), (3, 1)]


def test_nothing_is_replayed_when_result_json_has_every_report(trial):
    trial(2, recorded=lambda n: True)
    assert trial(2, recorded=lambda n: True) == []


def test_nothing_is_replayed_when_result_json_cannot_be_read(trial):
    trial(2, recorded=lambda n: False)  # e.g. a bucket the driver had not synced it to
    assert not (trial.trial_folder / "result.json").exists()
    assert trial(2, recorded=lambda n: True) == []


def test_carried_metrics_load_as_a_checkpoint_does(tmp_path):
    import numpy as np
    import torch

    from genmodels.io import load_checkpoint, save_atomic
    from trainables.trainable import plain

    metrics = {"fid": np.float64(31.5), "kid": torch.tensor(0.25), "fid_n": np.int64(1000), "ok": np.bool_(True)}
    save_atomic({"extra": {"reports": [plain(metrics)]}}, tmp_path / "state.pt")  # weights_only=True reads it back
    assert load_checkpoint(tmp_path / "state.pt")["extra"]["reports"] == [{"fid": 31.5, "kid": 0.25, "fid_n": 1000,
                                                                           "ok": True}]


def test_a_trial_whose_graph_capture_failed_is_retried_without_graphs(trial, monkeypatch):
    """A failed CUDA graph capture ends the trial's process (its CUDA state is spoilt) and leaves a note in the
    trial's folder; Tune's retry of the trial then trains with train.cuda_graphs off and says so in every report."""
    import genmodels.experiment as experiment
    from genmodels.cuda_graph import GraphCaptureFailed

    configs = []
    run = experiment.Experiment.run

    def capture_fails_once(self, on_epoch, evaluation=None):
        configs.append(self.cfg.train.cuda_graphs)
        if len(configs) == 1:
            raise GraphCaptureFailed("capture failed; run it with CUDA graphs off: train.cuda_graphs=false")
        return run(self, on_epoch, evaluation)

    monkeypatch.setitem(TINY_VAE, "train.cuda_graphs", True)  # graphs are opt-in: this trial asked for them
    monkeypatch.setattr(experiment.Experiment, "run", capture_fails_once)
    with pytest.raises(GraphCaptureFailed):
        trial(1, recorded=lambda n: True)
    reports = trial(1, recorded=lambda n: True)
    assert configs == [True, False]
    assert [r["graphs_off_after_failed_capture"] for r in reports] == [1]
