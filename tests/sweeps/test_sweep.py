"""End to end through Ray Tune: the smoke sweep, the leaderboard, and the CLI's one-line errors."""
import re

import pytest
from conftest import run_cli

from sweeps.spec import SweepSpec


@pytest.mark.slow
def test_smoke_sweep_ends_in_leaderboard_with_asha_stops(smoke_sweep):
    storage, out = smoke_sweep
    assert "dataset=synthetic" in out  # the output says which data the sweep trained on
    board = out[out.index("Leaderboard of smoke"):]
    rows = [line for line in board.splitlines()[3:] if line[:1].isdigit()]
    assert len(rows) == 6
    assert any("stopped (ASHA)" in r for r in rows) and any("completed" in r for r in rows)
    header = board.splitlines()[1].replace(" (min)", "").split()
    values = [float(r.split()[header.index("test_bpd")]) for r in rows]  # ranked ascending by test_bpd
    assert values == sorted(values)


@pytest.mark.slow
def test_a_clean_sweep_prints_nothing_on_stderr(smoke_sweep):
    """No Ray/Tune/W&B/Optuna chatter (checkpoint lines, slow-callback warnings, logging-actor errors, auth and
    start-up lines), and no colour escapes in redirected output: a clean sweep leaves stderr empty."""
    storage, out = smoke_sweep
    err = (storage / "driver.stderr").read_text()
    assert err.strip() == "", err[-3000:]
    assert "\x1b[" not in out
    # the progress table: where the results are, not Ray's staging folder; ASHA's cut-offs as test_bpd reads
    assert "driver_artifacts" not in out and "Results: " in out
    brackets = [line for line in out.splitlines() if line.startswith("Bracket:")]
    assert brackets and not any(": -" in line for line in brackets), brackets[-1:]
    # each table but the last ends with the time left (sweeps/progress.py)
    assert re.search(r"(?m)^gensweep: [\d.]+ s elapsed, \d of 6 trials ended; ", out), out[:3000]
    # No idle worker outside the sweep's job (job ffffffff): Ray prestarted one per CPU and killed them idle a second
    # later, and one of those now and then wrote "[mutex.cc : 452] RAW: Lock blocking" on its way out.
    logs = storage / "ray_logs"
    if logs.exists():
        assert not list(logs.glob("worker-*-ffffffff-*.err")), sorted(p.name for p in logs.glob("worker-*"))


@pytest.mark.slow
def test_trials_write_grids_checkpoints_and_offline_wandb_runs(smoke_sweep):
    storage, _ = smoke_sweep
    trials = [p for p in (storage / "smoke").iterdir() if p.is_dir() and p.name.startswith("vae_")]
    assert len(trials) == 6
    for t in trials:
        assert list(t.glob("images/epoch_0001/samples.png")) and list(t.glob("images/epoch_0001/reconstructions.png"))
        assert list(t.glob("checkpoint_*/state.pt"))
        assert list(t.glob("checkpoint_*/images/samples.png"))
        run = list(t.glob("wandb/offline-run-*"))
        assert run, f"no offline W&B run in {t}"
        assert list(run[0].glob("files/media/images/samples_*.png"))  # grids reached W&B as images
    spec = SweepSpec.load(str(storage), "smoke")
    assert spec.metric == "test_bpd" and set(spec.searched) == {
        "model.beta", "model.latent", "train.lr", "model.likelihood_scale", "model.learn_scale"}


@pytest.mark.slow
def test_leaderboard_prints_again_after_the_sweep(smoke_sweep):
    storage, out = smoke_sweep
    r = run_cli(["sweeps/leaderboard.py", "--name", "smoke", "--storage-path", str(storage), "--source", "local"])
    assert r.returncode == 0, r.stderr
    board = out[out.index("Leaderboard of smoke"):].splitlines()
    assert r.stdout.splitlines()[3:] == board[3:board.index(r.stdout.splitlines()[-1]) + 1]  # rows, then the note
    assert r.stdout.splitlines()[-1].startswith("note: the smoke preset is a pipeline check")


@pytest.mark.parametrize("args, message", [
    (["--space", "nope"], "unknown space 'nope'"),
    (["--num-samples", "-3"], "--num-samples must be at least 1"),
    (["--fixed", "bogus=1"], "--fixed: unknown setting 'bogus' for model vae"),
    (["--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    (["--address", "garbage"], "cannot reach a Ray cluster at garbage"),
    (["--address", "auto"], "--address auto: no Ray cluster was started on this machine"),
    (["--address", "auto", "STALE"], "--address auto found 127.0.0.1:1 (from the last `ray start`"),
    (["--storage-path", "s3://gensweep-no-such-bucket/runs"], "--storage-path s3://gensweep-no-such-bucket/runs "
                                                               "cannot be written"),
    (["--dataset", "cifar10"], "--data-dir"),
    (["--resume", "never-ran"], "no sweep named 'never-ran'"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_bad_input_is_one_line_and_exit_2(args, message, dry_run, tmp_path, monkeypatch, capsys):
    import sweeps.run as run

    monkeypatch.setenv("GENSWEEP_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` leaves the address `--address auto` reads
    if "STALE" in args:  # the address a cluster that has stopped left behind
        args = [a for a in args if a != "STALE"]
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    code = run.main(["--preset", "smoke", "--no-wandb", "--data-dir", str(tmp_path), "--storage-path",
                     str(tmp_path), *args, *dry_run])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_the_real_cli_says_it_in_one_line_on_stderr(tmp_path):
    r = run_cli(["sweeps/run.py", "--preset", "smoke", "--no-wandb", "--storage-path", str(tmp_path), "--fixed",
                 "bta=1"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean model.beta?" in lines[0] and not r.stdout, r.stderr


def test_diverged_trial_reports_and_ends_cleanly(monkeypatch, tmp_path):
    """A NaN loss ends the trial with diverged=1 and no ranking metric (ASHA ignores it, the sweep goes on)."""
    import torch

    import trainables.trainable as tr
    from genmodels.data import synthetic_images

    reports = []
    monkeypatch.setattr(tr.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tr.tune, "get_context", lambda: type("C", (), {"get_trial_dir": lambda self: str(tmp_path)})())
    from genmodels.models.vae import VAE

    monkeypatch.setattr(VAE, "loss", lambda self, x: (torch.tensor(float("inf"), requires_grad=True), {}))
    data = {"train": synthetic_images(32), "test": synthetic_images(16, seed=1)}
    config = {"model_name": "vae", "model.arch": "conv-small", "model.width": 4, "model.latent": 4,
              "train.epochs": 3, "train.batch_size": 8}
    tr.train_trial(config, data, tr.TrialPlan("test_bpd"))
    assert len(reports) == 1 and reports[0]["diverged"] == 1 and "test_bpd" not in reports[0]


def reports_of_trials(monkeypatch, tmp_path, configs, plan) -> list[list[dict]]:
    """Run trials one after another in this process, as a reused Ray actor runs them; each trial's reports."""
    import trainables.trainable as tr
    from genmodels.data import synthetic_images

    trials: list[list[dict]] = []
    monkeypatch.setattr(tr.tune, "report", lambda metrics, checkpoint=None: trials[-1].append(
        {**metrics, "with_checkpoint": checkpoint is not None}))
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.chdir(tmp_path)
    data = {"train": synthetic_images(32), "test": synthetic_images(24, seed=1)}
    for config in configs:
        trials.append([])
        tr.train_trial(config, data, plan)
    return trials


TINY = {"model_name": "vae", "model.arch": "conv-small", "model.width": 4, "model.latent": 4, "train.epochs": 4,
        "train.batch_size": 8, "train.steps_per_epoch": 2, "train.eval_subset": 8, "model.eval_k": 4}


def test_a_reused_actors_trial_is_the_same_as_a_fresh_one(monkeypatch, tmp_path):
    """Tune reuses a finished trial's process for the next trial (reuse_actors): nothing of one trial may leak into
    the next, so a trial run after another computes exactly what it computes first in a fresh process."""
    import trainables.trainable as tr

    other = {**TINY, "model.latent": 8, "train.lr": 3e-3, "train.seed": 5}
    first, _, again = reports_of_trials(monkeypatch, tmp_path, [TINY, other, TINY], tr.TrialPlan("test_bpd"))
    drop = ("node_id", "reported_at")  # where it ran, and when
    assert [{k: v for k, v in r.items() if k not in drop} for r in first] == \
        [{k: v for k, v in r.items() if k not in drop} for r in again]


def test_full_evaluation_grids_and_checkpoints_come_at_milestones(monkeypatch, tmp_path):
    """The ranking metric (the full test split at the space's k) only where ASHA reads it and at the end; a cheap
    `subset_` evaluation in between; grids and checkpoints at milestones and the end (checkpoint_every_s apart
    otherwise)."""
    import trainables.trainable as tr

    plan = tr.TrialPlan("test_iwae_bpd", milestones=(1, 2, 4), checkpoint_every_s=3600)
    (reports,) = reports_of_trials(monkeypatch, tmp_path, [{**TINY, "train.epochs": 5}], plan)
    assert [r["epoch"] for r in reports if "test_iwae_bpd" in r] == [1, 2, 4, 5]
    assert [r["epoch"] for r in reports if "subset_test_bpd" in r] == [3]
    assert reports[2]["subset_images"] == 8 and "test_iwae_bpd" not in reports[2] and "test_bpd" not in reports[2]
    assert [r["epoch"] for r in reports if r["with_checkpoint"]] == [1, 2, 4, 5]
    assert [r["checkpointed"] for r in reports] == [1, 1, 0, 1, 1]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "epoch_0001", "epoch_0002", "epoch_0004", "epoch_0005"]


def test_milestones_skip_the_bound_when_nothing_ranks_on_it(monkeypatch, tmp_path):
    """Ranked by test_bpd (the ELBO), a milestone and the end evaluate the whole test split without the
    importance-weighted bound at eval_k (eval_k more decoder passes per image), as alike as the leaderboard compares
    them; the end adds the end-of-trial bound at final_eval_k. With the bound among several objectives, the
    milestones and the end compute it."""
    import trainables.trainable as tr

    plan = tr.TrialPlan("test_bpd", milestones=(1, 2), checkpoint_every_s=3600)
    (reports,) = reports_of_trials(monkeypatch, tmp_path, [{**TINY, "train.epochs": 4}], plan)
    assert [r["epoch"] for r in reports if "test_bpd" in r] == [1, 2, 4]  # the whole split, under its own name
    assert [r["epoch"] for r in reports if "subset_test_bpd" in r] == [3]
    assert not any("test_iwae_bpd" in r for r in reports)
    assert [r["epoch"] for r in reports if "final_test_iwae_bpd" in r] == [4]
    plan = tr.TrialPlan("test_bpd", milestones=(1, 2), checkpoint_every_s=3600,
                        objectives=("test_bpd", "test_iwae_bpd"))
    (tmp_path / "multi").mkdir()
    (reports,) = reports_of_trials(monkeypatch, tmp_path / "multi", [{**TINY, "train.epochs": 4}], plan)
    assert [r["epoch"] for r in reports if "test_iwae_bpd" in r] == [1, 2, 4]
