"""Sweeps that fail safe: bad input refused in one line before Ray starts (and nothing written), names that never
clobber, resume that redoes nothing, a corrupt checkpoint passed over, Ctrl-C that stops, honest exit codes."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_trainer

from genmodels.data import synthetic_images

TINY_VAE = {"model_name": "vae", "model.arch": "conv-small", "model.width": 4, "model.latent": 4,
            "train.batch_size": 8, "train.steps_per_epoch": 2}


def run_main(argv, capsys):
    import sweeps.run as run

    code = run.main(["--preset", "smoke", "--no-wandb", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args, message", [
    (["--fixed", "beta=notanumber"], "model.beta must be a number, got 'notanumber'"),
    (["--fixed", "batch_size=0"], "train.batch_size must be >= 1, got 0"),
    (["--fixed", "latent=0"], "model.latent must be >= 1, got 0"),
    (["--fixed", "beta=-1"], "model.beta must be >= 0, got -1"),
    (["--fixed", "epochs=0"], "train.epochs must be >= 1, got 0"),
    (["--fixed", "bta=1"], "unknown setting 'bta' for model vae; did you mean model.beta?"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5: more than one GPU per trial must be a whole number"),
    (["--gpus-per-trial", "2"], "--gpus-per-trial 2 needs 2 GPUs per trial and this machine has 0"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be more than 0, got 0"),
    (["--fixed", "eval_subset=-1"], "train.eval_subset must be >= 0, got -1"),
    (["--checkpoint-every-s", "-5"], "--checkpoint-every-s must be a number >= 0, got -5.0"),
    (["--name", ""], "--name '': use letters, digits"),
    (["--name", "my sweep"], "--name 'my sweep': use letters, digits"),
    (["--name", "a/b"], "--name 'a/b': use letters, digits"),
    (["--space", "ncsn-sampling", "--checkpoint", "GARBAGE"], "cannot be read as a gensweep checkpoint"),
    (["--space", "ncsn-sampling", "--checkpoint", "VAE"], "holds a 'vae' model; this space evaluates ncsn"),
    (["--space", "vqvae", "--objectives", "fid,rfid", "--no-rfid"], "--no-rfid leaves nothing to rank by with "
                                                                    "--objectives rfid"),
    (["--space", "ncsn-v2", "--fixed", "num_levels=0"], "space 'ncsn-v2' does not use num_levels (sigma_schedule"),
    (["--space", "ncsn", "--fixed", "num_levels=10", "--fixed", "gamma=0.5"], "does not use gamma (num_levels is"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(args, message, dry_run, tmp_path, capsys):
    storage = tmp_path / "runs"
    if "GARBAGE" in args:
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
        args = [a.replace("GARBAGE", str(tmp_path / "garbage.pt")) for a in args]
    if "VAE" in args:
        trainer = make_trainer("vae", {k: v for k, v in TINY_VAE.items() if k != "model_name"},
                               synthetic_images(16), synthetic_images(8, seed=1))
        trainer.save(tmp_path / "state.pt")
        args = [a.replace("VAE", str(tmp_path / "state.pt")) for a in args]
    code, lines = run_main([*args, *dry_run, "--storage-path", str(storage)], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not storage.exists() or not any(storage.iterdir())  # nothing written


@pytest.mark.parametrize("storage, message", [("FILE", "is a file, not a folder"),
                                              ("/proc/gensweep", "is not writable")])
def test_unusable_storage_is_refused_before_ray(storage, message, tmp_path, capsys):
    if storage == "FILE":
        storage = tmp_path / "a-file"
        storage.write_text("")
    code, lines = run_main(["--storage-path", str(storage)], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_a_name_in_use_is_refused_and_one_driver_holds_a_sweep(tmp_path, capsys):
    from sweeps.spec import SWEEP_FILE
    from sweeps.storage import SweepLock

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / SWEEP_FILE).write_text("{}")
    code, lines = run_main(["--name", "taken", "--storage-path", str(tmp_path)], capsys)
    assert code == 2 and "already exists" in lines[0] and "--resume taken" in lines[0], lines
    lock = SweepLock(str(tmp_path), "busy")
    lock.acquire()
    try:
        with pytest.raises(OSError, match="being run by another driver"):
            SweepLock(str(tmp_path), "busy").acquire()
        # another process too (flock is per open file: the OS releases it when the holder dies)
        r = subprocess.run([sys.executable, "-c", "import sys; from sweeps.storage import SweepLock; "
                            f"SweepLock({str(tmp_path)!r}, 'busy').acquire()"], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode != 0 and "being run by another driver (pid" in r.stderr
    finally:
        lock.release()
    SweepLock(str(tmp_path), "busy").acquire()  # free again


def test_newest_loadable_checkpoint_wins_and_a_truncated_one_is_passed_over(tmp_path, capsys):
    from genmodels.engine import CHECKPOINT_FILE
    from trainables.checkpoints import newest_state

    trainer = make_trainer("vae", {k: v for k, v in TINY_VAE.items() if k != "model_name"}, synthetic_images(16),
                           synthetic_images(8, seed=1))
    for epoch in (1, 2, 3):
        trainer.train_epoch()
        trainer.save(tmp_path / f"checkpoint_{epoch:06d}" / CHECKPOINT_FILE)
    state, path = newest_state(str(tmp_path), None)
    assert state["epoch"] == 3 and path.endswith("checkpoint_000003")
    newest = tmp_path / "checkpoint_000003" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-write of a non-atomic copy
    state, path = newest_state(str(tmp_path), None)
    assert state["epoch"] == 2 and path.endswith("checkpoint_000002")
    assert "checkpoint_000003 does not load" in capsys.readouterr().err
    trainer.save(tmp_path / "checkpoint_000000" / CHECKPOINT_FILE)  # Tune reused a number after a resume
    state, path = newest_state(str(tmp_path), None)
    assert state["epoch"] == 3 and path.endswith("checkpoint_000000")  # by the epoch inside, not the name


def test_a_driver_killed_while_writing_the_sweep_file_leaves_the_old_one_whole(tmp_path):
    """The sweep's settings file is what --resume reads first: a write that dies half-way (here: raises after the
    file was opened) must leave the previous contents, not an empty file (seen: a SIGKILLed driver, then a
    JSONDecodeError traceback on --resume)."""
    from sweeps import cli, storage
    from sweeps.spec import SWEEP_FILE, SweepSpec

    args = cli.parse("run", ["--preset", "smoke", "--name", "s", "--metric", "test_bpd"])
    spec = SweepSpec.from_args(args, str(tmp_path))
    spec.save(str(tmp_path))

    class DiesMidWrite(str):
        def encode(self, *args, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.write_text(storage.join(str(tmp_path), "s", SWEEP_FILE), DiesMidWrite("{}"))
    assert SweepSpec.load(str(tmp_path), "s").metric == "test_bpd"
    spec.replace(objectives=("fid",)).save(str(tmp_path))
    assert SweepSpec.load(str(tmp_path), "s").metric == "fid"


def test_an_ended_trial_is_not_trained_again(tmp_path, monkeypatch):
    import trainables.trainable as tr
    from trainables.checkpoints import record_end

    reports = []
    monkeypatch.setattr(tr.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tr.tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t1"})())
    monkeypatch.chdir(tmp_path)
    data = {"train": synthetic_images(16), "test": synthetic_images(8, seed=1)}
    record_end(str(tmp_path / "sweep" / "vae_t1"), {"epoch": 2})
    tr.train_trial({**TINY_VAE, "train.epochs": 3}, data, tr.TrialPlan("test_bpd"),
                   folder=str(tmp_path / "sweep"))
    assert reports == []


# ------------------------------------------------------------------------------------------- real sweeps, real Ray

def stored_rows(storage: Path, name: str) -> dict[str, list[dict]]:
    rows = {}
    for path in sorted((storage / name).glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            rows[path.parent.name] = lines
    return rows


@pytest.mark.slow
def test_driver_killed_at_random_moments_resumes_from_the_newest_checkpoint(tmp_path, capsys):
    """SIGKILL the driver at random points of one sweep, twice, `--resume` after each; then no checkpointed
    epoch of any trial is trained twice (only those reported since its last checkpoint, and the one in progress,
    which never reported), no trial that ended ran again, and the sweep completes."""
    from ray_cluster import LocalCluster

    storage, name, num_samples, epochs = tmp_path / "runs", "kills", 4, 4
    rng = random.Random(0)
    driver, kills = None, []
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=2)
        command = [sys.executable, "sweeps/run.py", "--address", cluster.address, "--storage-path", str(storage),
                   "--no-wandb"]
        try:
            start = [*command, "--space", "vae", "--preset", "smoke", "--name", name, "--num-samples",
                     str(num_samples), "--fixed", f"epochs={epochs}", "--fixed", "steps_per_epoch=20"]
            for attempt in range(2):  # a kill of a fresh sweep, then of a resumed one (a third added nothing new)
                driver = cluster.popen(start if attempt == 0 else [*command, "--resume", name],
                                       tmp_path / f"driver{attempt}.log")
                seen = sum(map(len, stored_rows(storage, name).values()))
                deadline = time.time() + 120  # until this driver's trials report, then at a random moment
                while time.time() < deadline and sum(map(len, stored_rows(storage, name).values())) <= seen:
                    time.sleep(0.2)
                # a moment of the sweep's training: on this 2-core machine it runs 4-5 s past its first report,
                # and a kill after it ends would test nothing
                time.sleep(rng.uniform(0.3, 2.5))
                if driver.poll() is not None:
                    break
                driver.send_signal(signal.SIGKILL)
                driver.wait(timeout=30)
                kills.append({t: len(rows) for t, rows in stored_rows(storage, name).items()})
            driver = cluster.popen([*command, "--resume", name], tmp_path / "final.log")
            driver.wait(timeout=300)
        finally:
            if driver is not None and driver.poll() is None:
                driver.kill()
                driver.wait()
    log = (tmp_path / "final.log").read_text()
    assert driver.returncode == 0, log[-5000:]
    rows = stored_rows(storage, name)
    report = "\n".join(f"{t}: epochs {[r['epoch'] for r in rs]}, resumed from {[r['resumed_from_epoch'] for r in rs]}"
                       for t, rs in rows.items())
    with capsys.disabled():
        print(f"\nkills: {len(kills)}, reports seen at each kill: {kills}\n{report}")
    assert len(kills) >= 1 and len(rows) == num_samples, report
    retrained = 0
    for t, rs in rows.items():
        epochs_seen = [r["epoch"] for r in rs]
        # An epoch reported twice was trained again after a kill: only one whose first report had no checkpoint
        # (between milestones, within --checkpoint-every-s); no checkpointed epoch is trained twice.
        first = {}
        for r in rs:
            first.setdefault(r["epoch"], r)
        again = [e for e in set(epochs_seen) if epochs_seen.count(e) > 1]
        assert all(first[e]["checkpointed"] == 0 for e in again), report
        retrained += len(epochs_seen) - len(set(epochs_seen))
        assert epochs_seen == sorted(epochs_seen), report
    with capsys.disabled():
        print(f"epochs trained again after the kills (reported before them without a checkpoint): {retrained}")
    ended = [p for p in (storage / name).glob("*/gensweep_trial_ended.json")]
    assert len(ended) == num_samples, report
    board = log[log.index(f"Leaderboard of {name}"):]
    assert sum(("completed" in line or "stopped (ASHA)" in line) for line in board.splitlines()) == num_samples



def test_a_cluster_with_no_node_for_the_gpus_is_named(monkeypatch, capsys):
    import ray

    from sweeps import cluster

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}, {"Alive": False, "Resources": {"GPU": 4.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cluster.warn_if_no_node_has_the_gpus(1.5)
    assert "needs a node with 2 GPU(s) and no node of this cluster has them now (most: 1)" in capsys.readouterr().out
    cluster.warn_if_no_node_has_the_gpus(0.5)
    assert capsys.readouterr().out == ""
