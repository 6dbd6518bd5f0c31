"""WandbLogger: real W&B runs (offline) from a real Tune sweep, and a driver loop that W&B cannot stall.

W&B 0.31 writes an offline run as `wandb/offline-run-<time>-<id>/run-<id>.wandb` (plus `files/media/...` for
images); config, summary, history and artifacts exist only inside the .wandb file. That file is a LevelDB-style log
of W&B `Record` protobufs (the format `wandb sync` uploads); `wandb_records` reads it with the protobuf classes W&B
ships, since W&B has no public reader for it.
"""
from __future__ import annotations

import json
import pickle
import struct
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainables.wandb_logging import WandbLogger, artifact_name, loggable_metrics, run_id

MAX_EPOCHS = 3


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def wandb_records(path: Path) -> list:
    """The Record protobufs of a .wandb file: a 7-byte file header (':W&B', magic, version), then LevelDB log
    records (crc32 uint32, length uint16, type uint8, data) in 32 KiB blocks; FIRST/MIDDLE/LAST chunks join."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's trailer: zeros
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def read_run(run_dir: Path) -> dict:
    """config, summary, history (step -> row), artifacts and exit code of an offline run folder."""
    run = {"config": {}, "summary": {}, "history": {}, "artifacts": [], "exit_code": None, "run": None}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run"] = record.run
            run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            for u in record.summary.update:
                key = u.key or ".".join(u.nested_key)
                run["summary"][key] = json.loads(u.value_json)
        elif kind == "history":
            row = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            run["history"][row["_step"]] = row
        elif kind == "artifact":
            run["artifacts"].append(record.artifact)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def make_train():
    """The trainable, built here so Ray's workers get it by value (they cannot import this test module)."""

    def train(config):
        """3 epochs, each reported with a checkpoint that holds images/samples.png; beta < 0 diverges in epoch 2."""
        from PIL import Image
        from ray import tune

        for epoch in range(1, MAX_EPOCHS + 1):
            if config["model.beta"] < 0 and epoch == 2:
                tune.report({"diverged": 1, "epoch": epoch - 1, "error": "loss is nan at step 5", "done": True})
                return
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "images").mkdir()
                Image.new("RGB", (8, 8), (40 * epoch, 0, 0)).save(Path(d) / "images" / "samples.png")
                (Path(d) / "model.pt").write_bytes(b"weights")
                tune.report({"epoch": epoch, "loss": config["train.lr"] / epoch, "diverged": 0, "note": "text",
                             "graph_status": "graphed: self-check passed"},
                            checkpoint=tune.Checkpoint.from_directory(d))

    return train


@pytest.mark.slow
def test_sweep_logs_one_offline_run_per_trial(wandb_env):
    import ray
    from ray import tune

    storage = wandb_env / "results"
    logger = WandbLogger(project="gensweep-test", entity=None, group="wb-sweep", tags=["vae", "smoke", "vae", "mnist"],
                         max_epochs=MAX_EPOCHS, metric="loss")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        tuner = tune.Tuner(
            make_train(),
            param_space={"model.beta": tune.grid_search([1.0, 2.0, -1.0]), "train.lr": 0.1,
                         "data.dataset": "mnist", "model_name": "vae"},
            run_config=tune.RunConfig(name="wb-sweep", storage_path=str(storage), callbacks=[logger], verbose=0))
        grid = tuner.fit()
    finally:
        assert logger.close(timeout_s=10) == 0  # on_experiment_end has closed it already: returns at once
        ray.shutdown()
    assert not grid.errors

    trials = {r.config["model.beta"]: (Path(r.path), r.metrics["trial_id"]) for r in grid}
    assert len(trials) == 3
    for beta, (trial_dir, trial_id) in trials.items():
        run_dirs = list((trial_dir / "wandb").glob("offline-run-*"))
        assert len(run_dirs) == 1, f"one W&B run per trial, in the trial's folder ({trial_dir})"
        run = read_run(run_dirs[0])
        assert run["run"].run_id == run_id("wb-sweep", trial_id)
        assert run["run"].run_group == "wb-sweep" and run["run"].job_type == "trial"
        assert list(run["run"].tags) == ["vae", "smoke", "mnist"]
        assert run["config"]["model.beta"] == beta and run["config"]["data.dataset"] == "mnist"
        assert run["config"]["model_name"] == "vae" and run["config"]["train.lr"] == 0.1
        history = run["history"]
        images = sorted((run_dirs[0] / "files" / "media" / "images").glob("samples_*.png"))
        if beta < 0:  # diverged after epoch 1
            assert run["summary"]["diverged_reason"] == "loss is nan at step 5"
            assert sorted(history) == [1] and history[1]["diverged"] == 1 and history[1]["loss"] == pytest.approx(0.1)
            assert len(images) == 1 and not run["artifacts"]
        else:
            assert sorted(history) == [1, 2, 3], "step = epoch"
            assert [history[e]["loss"] for e in (1, 2, 3)] == pytest.approx([0.1, 0.05, 0.1 / 3])
            assert all(history[e]["epoch"] == e and history[e]["diverged"] == 0 for e in (1, 2, 3))
            assert all(history[e]["samples.path"].startswith("media/images/samples_") for e in (1, 2, 3)), \
                "each epoch's image grid is in that epoch's row"
            assert len(images) == 3
            assert "diverged_reason" not in run["summary"]
            assert run["summary"]["graph_status"] == "graphed: self-check passed"  # a string: summary, not history
            assert all("graph_status" not in row for row in history.values())
            [artifact] = run["artifacts"]
            assert artifact.type == "model" and "final" in artifact.aliases
            assert artifact.name == artifact_name(run["run"].display_name)
            assert {e.path for e in artifact.manifest.contents} == {"model.pt", "images/samples.png"}
        for key in ("time_this_iter_s", "timestamp", "pid", "hostname", "node_ip", "date", "trial_id", "note"):
            assert all(key not in row for row in history.values())
        assert run["exit_code"] == 0


class FakeTrial:
    """What WandbLogger reads from a Tune Trial."""

    def __init__(self, root: Path, trial_id: str):
        import pyarrow.fs

        self.trial_id, self.config = trial_id, {"model.beta": 1.0}
        self.path = self.local_path = str(root / trial_id)
        self.storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())
        self.last_result, self.checkpoint, self.status = {}, None, "RUNNING"

    def __str__(self) -> str:
        return f"fake_{self.trial_id}"


def test_hooks_never_wait_for_wandb_and_close_is_bounded(wandb_env, monkeypatch):
    logger = WandbLogger(project="gensweep-test", entity=None, group="slow", tags=[], max_epochs=3)
    assert pickle.loads(pickle.dumps(logger)).group == "slow"  # Tune pickles callbacks with the tuner's state
    monkeypatch.setattr(logger, "_log_to_run", lambda run, data, step: time.sleep(0.5))  # a W&B that is slow
    trials = [FakeTrial(wandb_env, f"t{i}") for i in range(2)]
    for trial in trials:
        logger.on_trial_start(iteration=0, trials=trials, trial=trial)
    durations = []
    for epoch in range(1, 11):
        for trial in trials:
            start = time.perf_counter()
            logger.on_trial_result(iteration=epoch, trials=trials, trial=trial,
                                   result={"epoch": epoch, "loss": 1.0 / epoch, "done": False, "pid": 1})
            durations.append(time.perf_counter() - start)
    assert sum(durations) / len(durations) < 0.05
    start = time.monotonic()
    abandoned = logger.close(timeout_s=1)  # 10 s of logging still queued
    assert time.monotonic() - start < 2.0
    assert abandoned == 2
    start = time.monotonic()
    assert logger.close(timeout_s=1) == 2 and time.monotonic() - start < 0.1  # idempotent: the time is spent


def test_close_all_reaches_a_restored_copy(wandb_env):
    """Tuner.restore runs the callback it unpickled, not the CLI's object: close_all() still finishes its runs."""
    original = WandbLogger(project="gensweep-test", entity=None, group="restored", tags=["a"], max_epochs=1)
    copy = pickle.loads(pickle.dumps(original))
    trial = FakeTrial(wandb_env, "r0")
    copy.on_trial_start(iteration=0, trials=[trial], trial=trial)
    copy.on_trial_result(iteration=1, trials=[trial], trial=trial, result={"epoch": 1, "loss": 0.5})
    WandbLogger.close_all(timeout_s=10)
    assert copy.close() == 0 and original.close() == 0
    [run_dir] = (Path(trial.path) / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + 20
    while (run := read_run(run_dir))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.5)  # wandb's service may write the exit record just after finish() returns (seen under load)
    assert run["exit_code"] == 0 and run["history"][1]["loss"] == 0.5 and run["config"]["model.beta"] == 1.0


def test_result_filtering():
    import numpy as np

    metrics = loggable_metrics({"loss": 0.5, "epoch": 2, "diverged": False, "flag": np.bool_(True),
                                "fid": np.float32(3.0), "error": "x", "config": {"a": 1}, "time_this_iter_s": 1.0,
                                "timestamp": 1, "pid": 3, "done": True, "training_iteration": 2})
    assert metrics == {"loss": 0.5, "epoch": 2, "diverged": 0, "flag": 1, "fid": 3.0, "training_iteration": 2}
    assert run_id("s" * 100, "abc_00001") == run_id("s" * 100, "abc_00001")
    assert len(run_id("s" * 100, "abc_00001")) <= 64 and run_id("s" * 100, "a") != run_id("s" * 100, "b")
    assert run_id("vae-smoke-1", "abc_00001") == "vae-smoke-1-abc_00001"
