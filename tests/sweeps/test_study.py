"""The Optuna study on disk (sweeps/study.py) and which hyperparameters mattered (sweeps/importance.py): a sweep
folder's study opens with optuna.load_study and matches the leaderboard trial for trial; the driver adds each
trial that ends once (sweeps/study_writer.py), and a rebuild whole gives the same study; a write that dies half-way
(an exception, a SIGKILL inside SQLite's transaction) leaves a study that opens; a study that
cannot be written is one warning line; the importances name the parameter that decides the value, at one milestone;
too few trials are one line. Sweep folders are written here as Tune and the driver leave them (no Ray, no sweep)."""
import errno
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import saved_spec_of

from sweeps import distributions, importance, leaderboard, report, study, study_writer
from sweeps.spec import SweepSpec
from trainables.checkpoints import ENDED_FILE

ROOT = Path(__file__).parents[2]
State = optuna.trial.TrialState


def vae_spec(objectives=("test_bpd",), searched=("model.beta", "train.lr")) -> SweepSpec:
    """A vae sweep of 4 epochs: ASHA's milestones are epochs 1, 2 and 4. Saved, so loaded without its domains."""
    return saved_spec_of("s", space="vae", objectives=objectives, searched=searched, max_epochs=4)


def write_trial(sweep: Path, tid: str, config: dict, values: list[float], ended: bool = True,
                error: str | None = None, diverged: str | None = None, **every) -> None:
    """A trial's folder: params.json, a result.json line per epoch (test_bpd = values[epoch - 1]), the driver's
    ended marker, and Tune's error.txt for a trial that failed."""
    folder = sweep / f"vae_{tid}"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"model_name": "vae", **config}))
    lines = [{"epoch": e, "test_bpd": v, "test_psnr": 10.0 + v, "diverged": 0, "trial_id": tid,
              "training_iteration": e, **every} for e, v in enumerate(values, 1)]
    if diverged:
        lines.append({"epoch": len(values) + 1, "diverged": 1, "error": diverged, "trial_id": tid})
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if ended and not error:
        (folder / ENDED_FILE).write_text(json.dumps({"epoch": lines[-1]["epoch"], "diverged": int(bool(diverged))}))
    if error:
        (folder / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")


def sweep_of_every_kind(tmp_path: Path, spec: SweepSpec | None = None) -> tuple[str, SweepSpec]:
    spec = spec or vae_spec()
    spec.save(str(tmp_path))
    sweep = tmp_path / spec.name
    write_trial(sweep, "done0001", {"model.beta": 1.0, "train.lr": 1e-3}, [9.0, 8.5, 8.2, 8.0])
    write_trial(sweep, "done0002", {"model.beta": 2.0, "train.lr": 5e-4}, [9.5, 8.9, 8.6, 8.4])
    write_trial(sweep, "asha0001", {"model.beta": 8.0, "train.lr": 2e-3}, [12.0])
    write_trial(sweep, "asha0002", {"model.beta": 0.1, "train.lr": 1e-4}, [11.0, 10.5])
    write_trial(sweep, "div00001", {"model.beta": 0.05, "train.lr": 3e-3}, [30.0], diverged="loss nan at epoch 2")
    write_trial(sweep, "err00001", {"model.beta": 4.0, "train.lr": 3e-4}, [10.0],
                error="RuntimeError: CUDA out of memory")
    write_trial(sweep, "early001", {"model.beta": 0.5, "train.lr": 2e-4}, [9.9, 9.7, 9.6])
    write_trial(sweep, "run00001", {"model.beta": 1.5, "train.lr": 8e-4}, [9.2, 8.8], ended=False)
    return str(tmp_path), spec


def load(storage: str, spec: SweepSpec) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=f"sqlite:///{storage}/{spec.name}/{study.STUDY_FILE}")


EXPECTED = {"vae_done0001": State.COMPLETE, "vae_done0002": State.COMPLETE, "vae_asha0001": State.PRUNED,
            "vae_asha0002": State.PRUNED, "vae_div00001": State.FAIL, "vae_err00001": State.FAIL,
            "vae_early001": State.FAIL, "vae_run00001": State.RUNNING}


# ---------------------------------------------------------------------------------------------------------------
# 1. the study on disk matches the leaderboard


@pytest.mark.parametrize("objectives", [("test_bpd",), ("test_bpd", "test_psnr")])
def test_the_study_opens_and_matches_the_leaderboard_trial_for_trial(tmp_path, objectives):
    storage, spec = sweep_of_every_kind(tmp_path, vae_spec(objectives=objectives))
    study.write_study(storage, spec)
    s = load(storage, spec)
    rows = {r["trial"]: r for r in leaderboard.local_rows(storage, spec)}
    assert s.directions == [optuna.study.StudyDirection.MINIMIZE] * len(objectives)
    assert s.metric_names == list(objectives)
    trials = {t.user_attrs["trial"]: t for t in s.trials}
    assert {k: t.state for k, t in trials.items()} == EXPECTED
    for name, t in trials.items():
        row = rows[name]
        assert t.params == row["params"] and t.user_attrs["status"] == row["status"], name
        assert t.user_attrs["tune_trial_id"] == name.removeprefix("vae_")
        assert set(t.distributions) == {"model.beta", "train.lr"}
        assert t.distributions["model.beta"] == optuna.distributions.FloatDistribution(0.05, 16.0, log=True)
        milestones = {e: v for e, v in enumerate(json_values(tmp_path, spec, name), 1) if e in spec.milestones}
        assert t.intermediate_values == pytest.approx(milestones), name
        if t.state == State.COMPLETE:
            assert t.values == pytest.approx([row["objectives"][m]["value"] for m in objectives])
        elif t.state == State.PRUNED and len(objectives) == 1:  # valued at its last rung, as Optuna does
            assert t.value == pytest.approx(row["value"])
        else:
            assert t.values is None
    assert trials["vae_err00001"].user_attrs["error"] == "RuntimeError: CUDA out of memory"
    assert trials["vae_div00001"].user_attrs["error"] == "diverged: loss nan at epoch 2"
    assert "none of ASHA's milestones" in trials["vae_early001"].user_attrs["error"]


def json_values(tmp_path: Path, spec: SweepSpec, trial: str) -> list[float]:
    lines = (tmp_path / spec.name / trial / "result.json").read_text().splitlines()
    return [r["test_bpd"] for r in map(json.loads, lines) if "test_bpd" in r]


def test_distributions_are_the_ones_tunes_optuna_search_samples_from():
    """Rebuilt from the space for a loaded spec (Tune keeps the domains, the sweep file does not), and the same as
    Tune's own conversion, for every space and preset."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from sweeps import param_space as ps
    from sweeps.spaces import SPACES

    for space in SPACES.values():
        for preset in space.presets:
            domains = ps.build_param_space(space, preset, {}, {}, 0)
            searched = tuple(ps.searched_keys(domains))
            spec = saved_spec_of("s", space=space.name, searched=searched).replace(preset=preset)
            tunes = OptunaSearch.convert_search_space({k: domains[k] for k in searched})
            assert distributions.search_distributions(spec) == tunes, (space.name, preset)
    more = {"a": tune.uniform(0, 1), "b": tune.quniform(0, 1, 0.25), "c": tune.randint(1, 10),
            "d": tune.lograndint(1, 100), "e": tune.qrandint(0, 10, 2)}
    assert {k: distributions.to_distribution(d) for k, d in more.items()} == OptunaSearch.convert_search_space(more)


def test_a_study_file_that_is_no_database_is_replaced(tmp_path):
    storage, spec = sweep_of_every_kind(tmp_path)
    target = tmp_path / spec.name / study.STUDY_FILE
    target.write_bytes(b"\x00garbage" * 1000)
    assert study.save_study(storage, spec)
    assert len(load(storage, spec).trials) == len(EXPECTED)


def test_a_reader_that_has_the_study_open_sees_it_rewritten(tmp_path):
    """optuna-dashboard keeps its connection: the new trials must reach it in the same file, not a renamed one."""
    storage, spec = sweep_of_every_kind(tmp_path)
    study.write_study(storage, spec)
    reader = load(storage, spec)
    assert len(reader.get_trials()) == len(EXPECTED)
    write_trial(tmp_path / spec.name, "late0001", {"model.beta": 3.0, "train.lr": 1e-3}, [9.1, 8.7, 8.3, 8.1])
    study.write_study(storage, spec)
    assert len(reader.get_trials()) == len(EXPECTED) + 1


# ---------------------------------------------------------------------------------------------------------------
# 2. faults: a write that dies half-way, a study that cannot be written


def test_a_write_that_dies_half_way_leaves_the_old_study(tmp_path, monkeypatch):
    storage, spec = sweep_of_every_kind(tmp_path)
    study.write_study(storage, spec)
    write_trial(tmp_path / spec.name, "late0001", {"model.beta": 3.0, "train.lr": 1e-3}, [9.1, 8.7, 8.3, 8.1])
    added = optuna.Study.add_trial

    def dies_after_the_first(self, trial):
        added(self, trial)
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna.Study, "add_trial", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        study.write_study(storage, spec)
    monkeypatch.undo()
    assert len(load(storage, spec).trials) == len(EXPECTED)
    assert sorted(p.name for p in (tmp_path / spec.name).iterdir() if "optuna" in p.name) == [study.STUDY_FILE]


KILLED_MID_COPY = """
import os, signal, sys
from pathlib import Path
from sweeps import study
new, target = Path(sys.argv[1]), Path(sys.argv[2])
# one page a step, and SIGKILL after the first: the copy's transaction is cut with most pages still to write
study.copy_database(new, target, pages=1, progress=lambda *a: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_a_driver_killed_while_copying_the_study_in_leaves_the_old_one(tmp_path):
    """SIGKILL inside SQLite's write transaction (the copy into optuna.db): the next reader rolls it back."""
    storage, spec = sweep_of_every_kind(tmp_path)
    study.write_study(storage, spec)
    target = tmp_path / spec.name / study.STUDY_FILE
    new = tmp_path / "new.db"
    many = [optuna.trial.create_trial(value=float(i), user_attrs={"pad": "x" * 2000}) for i in range(40)]
    study.build_study(new, spec, many)
    r = subprocess.run([sys.executable, "-c", KILLED_MID_COPY, str(new), str(target)], cwd=ROOT, timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert Path(f"{target}-journal").exists()  # the cut transaction, for the next reader to roll back
    assert len(load(storage, spec).trials) == len(EXPECTED)
    study.write_study(storage, spec)  # and the next write puts the new study in
    assert len(load(storage, spec).trials) == len(EXPECTED)


def test_a_reader_holding_a_lock_on_the_study_holds_up_the_write_only_so_long(tmp_path, monkeypatch):
    import sqlite3

    storage, spec = sweep_of_every_kind(tmp_path)
    study.write_study(storage, spec)
    monkeypatch.setattr(study, "LOCK_WAIT_S", 0.5)
    holder = sqlite3.connect(tmp_path / spec.name / study.STUDY_FILE, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # a reader or writer that never lets go
    try:
        write_trial(tmp_path / spec.name, "late0001", {"model.beta": 3.0, "train.lr": 1e-3}, [9.1, 8.7, 8.3, 8.1])
        study.write_study(storage, spec)  # replaced by the rename instead
    finally:
        holder.close()
    assert len(load(storage, spec).trials) == len(EXPECTED) + 1


class LiveTrial:
    """What a Tune callback is handed: a trial's id, status, config, folder name and last result."""

    def __init__(self, tid: str, status: str, last: dict):
        self.trial_id, self.status, self.last_result = tid, status, last
        self.config = {"model_name": "vae", "model.beta": 1.0, "train.lr": 1e-3}
        self.storage = type("Storage", (), {"trial_dir_name": f"vae_{tid}"})()


@pytest.mark.parametrize("fault", ["a directory in its place", "a full disk"])
def test_a_study_that_cannot_be_written_is_one_warning_and_the_sweep_goes_on(tmp_path, capfd, monkeypatch, fault):
    storage, spec = sweep_of_every_kind(tmp_path)
    study._warned.clear()
    if fault == "a directory in its place":
        (tmp_path / spec.name / study.STUDY_FILE).mkdir()
    else:
        def full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(study, "build_study", full)
    writer = study_writer.StudyWriter(storage, spec.name)
    trials = [LiveTrial("done0001", "RUNNING", {"epoch": 4}), LiveTrial("asha0001", "TERMINATED", {"epoch": 1})]
    writer.on_trial_complete(0, trials, trials[0])  # returns: the sweep goes on
    writer.on_trial_error(0, trials, trials[1])
    writer.on_experiment_end(trials)
    assert not study.save_study(storage, spec)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gensweep: warning: the Optuna study ") and out == "", err
    assert "the sweep goes on" in lines[0] and f"python sweeps/study.py --name {spec.name}" in lines[0]
    assert ("the storage is full" in lines[0]) == (fault == "a full disk")
    assert "No space left on device" not in err and "Traceback" not in err
    assert list((tmp_path / spec.name).glob(".optuna.db.*")) == []


def test_the_driver_writes_the_trial_that_is_ending_as_ended(tmp_path):
    """Tune calls on_trial_complete before it marks the trial TERMINATED, and the trial's result.json in storage may
    lag its last result: the study has it completed, from the driver's own last result."""
    storage, spec = sweep_of_every_kind(tmp_path)
    ending = LiveTrial("run00001", "RUNNING", {"epoch": 4, "test_bpd": 8.3, "test_psnr": 18.3, "diverged": 0})
    writer = study_writer.StudyWriter(storage, spec.name)
    writer.on_trial_complete(0, [ending], ending)
    writer.on_experiment_end([ending])
    [t] = [t for t in load(storage, spec).trials if t.user_attrs["trial"] == "vae_run00001"]
    assert t.state == State.COMPLETE and t.value == pytest.approx(8.3) and t.user_attrs["status"] == "completed"


ENDINGS = {"done0001": "TERMINATED", "done0002": "TERMINATED", "asha0001": "TERMINATED", "asha0002": "TERMINATED",
           "div00001": "TERMINATED", "err00001": "ERROR", "early001": "TERMINATED"}


def summary(s: optuna.Study) -> dict:
    return {t.user_attrs["trial"]: (t.state, t.params, t.values, t.intermediate_values, t.user_attrs["status"])
            for t in s.trials}


def end_every_trial(storage: str, spec: SweepSpec) -> None:
    """The driver's writer, handed every trial of sweep_of_every_kind as Tune ends it."""
    writer = study_writer.StudyWriter(storage, spec.name)
    for tid, status in ENDINGS.items():
        ending = LiveTrial(tid, "RUNNING", {})
        ending.config = json.loads((Path(storage) / spec.name / f"vae_{tid}" / "params.json").read_text())
        writer.on_trial_error(0, [], ending) if status == "ERROR" else writer.on_trial_complete(0, [], ending)
    writer.on_experiment_end([])


def test_the_study_written_trial_by_trial_equals_the_rebuilt_one(tmp_path):
    storage, spec = sweep_of_every_kind(tmp_path)
    end_every_trial(storage, spec)
    incremental = summary(load(storage, spec))
    assert set(incremental) == {f"vae_{tid}" for tid in ENDINGS}  # the running trial is not in: it has not ended
    assert study.save_study(storage, spec, ended_only=True)
    assert summary(load(storage, spec)) == incremental
    assert {k: v[0] for k, v in incremental.items()} == {k: v for k, v in EXPECTED.items() if k in incremental}


def test_the_writer_makes_the_study_as_the_sweep_starts_before_any_trial_ends(tmp_path):
    """Tune's setup starts the writer's thread, which makes the study at once: its one-time cost lands at the
    sweep's start, not when the first trials end and the next ones start. Made from the stored trials that ended."""
    storage, spec = sweep_of_every_kind(tmp_path)
    path = tmp_path / spec.name / study.STUDY_FILE
    assert not path.exists()
    writer = study_writer.StudyWriter(storage, spec.name)
    writer.setup(num_samples=8)
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:  # put in place whole (atomically)
        time.sleep(0.05)
    assert path.exists()
    writer.on_experiment_end([])
    made = summary(load(storage, spec))
    assert made and study.save_study(storage, spec, ended_only=True) and summary(load(storage, spec)) == made


def test_a_trial_end_reads_only_that_trials_files(tmp_path, monkeypatch):
    from sweeps import sweep_results

    storage, spec = sweep_of_every_kind(tmp_path)
    appender = study_writer.StudyAppender(storage, spec)  # made once: the stored trials read here, once
    read = []
    original = sweep_results._read
    monkeypatch.setattr(sweep_results, "_read", lambda path: read.append(path) or original(path))
    monkeypatch.setattr(study.sweep_storage, "read_text", lambda path: read.append(path) or None)
    for tid in ("done0001", "err00001"):
        read.clear()
        appender.add(f"vae_{tid}", tid, {"model.beta": 1.0, "train.lr": 1e-3}, {}, "TERMINATED")
        assert read and all(Path(p).parent == tmp_path / spec.name / f"vae_{tid}" for p in read), read
    appender.close()
    assert len(load(storage, spec).trials) == len(EXPECTED) - 1 + 2  # the rebuild's ended trials, then the two


KILLED_MID_ADD = """
import os, signal, sys
import sqlalchemy
from sweeps import study_writer
from sweeps.spec import SweepSpec
storage, name = sys.argv[1], sys.argv[2]
appender = study_writer.StudyAppender(storage, SweepSpec.load(storage, name))
appender.add("vae_done0002", "done0002", {}, {}, "TERMINATED")
def kill_after_first_insert(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("INSERT"):
        os.kill(os.getpid(), signal.SIGKILL)  # inside the trial's transaction: the study must not see half a trial
sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", kill_after_first_insert)
appender.add("vae_asha0001", "asha0001", {}, {}, "TERMINATED")
"""


def test_a_driver_killed_while_adding_a_trial_leaves_a_study_that_opens_and_resume_makes_it_right(tmp_path):
    storage, spec = sweep_of_every_kind(tmp_path)
    for tid in ENDINGS:
        if tid not in ("done0001", "done0002"):
            (tmp_path / spec.name / f"vae_{tid}" / ENDED_FILE).unlink(missing_ok=True)  # not ended yet
            (tmp_path / spec.name / f"vae_{tid}" / "error.txt").unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", KILLED_MID_ADD, storage, spec.name], cwd=ROOT, timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert sorted(summary(load(storage, spec))) == ["vae_done0001", "vae_done0002"]  # the cut trial is not in
    sweep_of_every_kind(tmp_path / "again")  # the same trials, all ended, as --resume finds them later
    for tid in ENDINGS:
        for name in (ENDED_FILE, "error.txt"):
            if (tmp_path / "again" / spec.name / f"vae_{tid}" / name).exists():
                (tmp_path / spec.name / f"vae_{tid}" / name).write_bytes(
                    (tmp_path / "again" / spec.name / f"vae_{tid}" / name).read_bytes())
    assert study.save_study(storage, spec, ended_only=True)  # what --resume does first
    end_every_trial(str(tmp_path / "again"), spec)
    assert summary(load(storage, spec)) == summary(load(str(tmp_path / "again"), spec))


# ---------------------------------------------------------------------------------------------------------------
# 3. which hyperparameters mattered


def beta_decides(tmp_path: Path, n: int = 8, metric: str = "test_bpd") -> tuple[str, SweepSpec]:
    """n trials where test_bpd at epoch 1 is |log10 beta| (beta near 1 is best) and lr, spread the same way,
    plays no part; ASHA stopped all but three at epoch 1."""
    spec = vae_spec()
    spec.save(str(tmp_path))
    for i in range(n):
        beta = 0.05 * (16 / 0.05) ** (i / (n - 1))
        lr = 1e-4 * 30 ** (((i * 3) % n) / (n - 1))  # the same values, in another order
        bpd = 8 + abs(math.log10(beta))
        epochs = 4 if i in (3, 4, 5) else 1
        write_trial(tmp_path / spec.name, f"t{i:07d}", {"model.beta": beta, "train.lr": lr},
                    [bpd - 0.1 * e for e in range(epochs)])
    return str(tmp_path), spec


def test_leaderboard_importance_names_the_parameter_that_decides(tmp_path, capsys):
    storage, spec = beta_decides(tmp_path)
    assert leaderboard.main(["--source", "local", "--name", "s", "--storage-path", storage, "--importance"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(out) if line.startswith("parameter importances for test_bpd"))
    # ASHA-stopped trials count at the rung they reached: all 8 at epoch 1 (3 reached epoch 4)
    assert "the best 4 of the 8 trials compared at epoch 1" in out[i], out[i]
    top, second = out[i + 1].split(), out[i + 2].split()
    assert top[0] == "beta" and second[0] == "lr", out[i:]
    assert int(top[1].rstrip("%")) > 50 > int(second[1].rstrip("%")), out[i:]


def test_fids_are_compared_at_one_sample_count(tmp_path):
    spec = vae_spec(objectives=("fid",))
    trials = []
    for i in range(6):
        history = [{"epoch": 1, "fid": 50.0 + i, "fid_n": 128}]
        if i < 5:  # one trial's FID at epoch 2 was computed with fewer samples: not compared with the others
            history.append({"epoch": 2, "fid": 40.0 + i, "fid_n": 256 if i < 4 else 128})
        trials.append({"config": {"model.beta": 0.1 * (i + 1), "train.lr": 1e-4 * (i + 1)}, "history": history,
                       "last": history[-1]})
    c = importance.compare(trials, spec)
    assert (c.epoch, c.n, len(c.study.trials)) == (2, 256, 4)
    assert sorted(t.value for t in c.study.trials) == [40.0, 41.0, 42.0, 43.0]


def test_fids_of_the_ladders_sample_counts_are_not_drawn_as_one_curve(tmp_path):
    """FID at 128 samples after epoch 1 and at 256 after epoch 2: no intermediate values (the change of n would
    look like training on the dashboard's curve), each milestone's value beside its n, the pruned value its last."""
    spec = vae_spec(objectives=("fid",))
    spec.save(str(tmp_path))
    fids = [{"fid": 60.0, "fid_n": 128}, {"fid": 45.0, "fid_n": 256}]
    write_trial(tmp_path / spec.name, "asha0001", {"model.beta": 1.0, "train.lr": 1e-3}, [9.0, 8.5])
    lines = (tmp_path / spec.name / "vae_asha0001" / "result.json").read_text().splitlines()
    (tmp_path / spec.name / "vae_asha0001" / "result.json").write_text(
        "".join(json.dumps({**json.loads(line), **fid}) + "\n" for line, fid in zip(lines, fids)))
    study.write_study(str(tmp_path), spec)
    [t] = load(str(tmp_path), spec).trials
    assert t.state == State.PRUNED and t.intermediate_values == {} and t.value == 45.0
    assert t.user_attrs["milestones"] == [{"epoch": 1, "fid": 60.0, "n": 128}, {"epoch": 2, "fid": 45.0, "n": 256}]


def test_too_few_trials_say_so_in_one_line(tmp_path, capsys):
    storage, spec = beta_decides(tmp_path, n=3)
    assert leaderboard.main(["--source", "local", "--name", "s", "--storage-path", storage, "--importance"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("parameter importances")]
    assert lines == ["parameter importances for test_bpd: too few trials to tell: at most 3 reported test_bpd at "
                     "one milestone (epoch 1), and PED-ANOVA needs 4"], out
    assert out[-1] == lines[0]
    nothing = importance.compare([], spec.replace(searched=()))
    assert importance.describe(nothing) == ["parameter importances for test_bpd: nothing was searched (every value "
                                            "is fixed)"]


def test_report_adds_the_importance_and_parallel_coordinate_plots(tmp_path, capsys):
    storage, spec = beta_decides(tmp_path)
    assert report.main(["--no-wandb", "--name", "s", "--storage-path", storage]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("parameter importances for test_bpd") and out[1].split()[0] == "beta", out
    folder = tmp_path / "s" / "report"
    for name in ("param_importances.png", "parallel_coordinate.png"):
        assert (folder / name).stat().st_size > 5000 and str(folder / name) in out
    import matplotlib

    assert matplotlib.rcParams["axes.facecolor"] == "white"  # Optuna's ggplot style stayed inside its plots


def test_report_logs_the_importances_to_wandb_as_a_table(tmp_path, capsys, monkeypatch):
    """The report's W&B run gets the importances report.py printed, as a table (wandb.init recorded: no service)."""
    import wandb

    logged = {}

    class Run:
        offline, settings = True, type("Settings", (), {"sync_dir": str(tmp_path / "offline-run")})

        def log(self, values):
            logged.update(values)

        def finish(self):
            logged["finished"] = True

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: logged.update(init=kwargs) or Run())
    storage, spec = beta_decides(tmp_path)
    assert report.main(["--name", "s", "--storage-path", storage]) == 0
    table = logged["param_importances_table"]
    shares = dict(table.data)
    assert table.columns == ["parameter", "share"] and max(shares, key=shares.get) == "model.beta", table.data
    assert logged["init"]["group"] == "s" and logged["init"]["job_type"] == "report" and logged["finished"]
    assert "param_importances" in logged and "wandb sync" in capsys.readouterr().out


def test_report_with_too_few_trials_has_no_importance_plots(tmp_path, capsys):
    storage, spec = beta_decides(tmp_path, n=3)
    assert report.main(["--no-wandb", "--name", "s", "--storage-path", storage]) == 0
    out = capsys.readouterr().out
    assert "too few trials to tell" in out and not (tmp_path / "s" / "report" / "param_importances.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. a real smoke sweep


@pytest.mark.slow
def test_a_smoke_sweeps_study_matches_its_leaderboard_and_names_what_mattered(smoke_sweep, capsys):
    storage, _ = smoke_sweep
    spec = SweepSpec.load(str(storage), "smoke")
    s = load(str(storage), spec)
    rows = {r["trial"]: r for r in leaderboard.local_rows(str(storage), spec)}
    trials = {t.user_attrs["trial"]: t for t in s.trials}
    assert set(trials) == set(rows) and len(rows) == 6
    for name, t in trials.items():
        row = rows[name]
        assert t.state == study.STATES[row["status"]] and t.params == row["params"], name
        assert t.value == pytest.approx(row["value"]), name
        assert set(t.distributions) == set(spec.searched)
    assert "No space left" not in (storage / "driver.stderr").read_text()
    assert "Optuna study" not in (storage / "driver.stderr").read_text()  # no warning
    assert leaderboard.main(["--source", "local", "--name", "smoke", "--storage-path", str(storage),
                             "--importance"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(out) if line.startswith("parameter importances for test_bpd"))
    top = out[i + 1].split()
    assert top[0] in {k.split(".")[-1] for k in spec.searched} and top[1].endswith("%"), out[i:]
    with capsys.disabled():
        print(f"\nsmoke sweep importances: {' | '.join(line.strip() for line in out[i:])}")
