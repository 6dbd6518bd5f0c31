"""A trial's result.json cut mid-line (a full disk, a copy cut short, a driver killed as it wrote).

The leaderboard, the report and the study say so in one line naming the file, and read the trial's status, epochs
and last metrics from everything its folder holds (the driver's ended marker, Tune's progress.csv, the reports its
checkpoints carry, Tune's last result). A `--resume` repairs a resumed trial's result.json before Tune's driver
appends to it (trainables/checkpoints.py repair_results, from TrialEndRecorder.on_trial_start), and the trial goes on
from its newest checkpoint to its end, every epoch in result.json once. Sweep folders are written here as Tune and
the driver leave them; the last test runs a real sweep, kills its driver, cuts the line and resumes."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, run_cli
from test_leaderboard_report import epoch_result, vae_spec, write_trial, write_tune_state

from genmodels.engine import CHECKPOINT_FILE
from genmodels.io import json_lines, save_atomic
from sweeps import leaderboard, study, sweep_results
from trainables import checkpoints

FINAL = {"fid_256": 42.5, "test_iwae_bpd": 8.55, "checkpointed": 1}  # the last report's own metrics


def write_progress(folder: Path, tid: str, epochs: int) -> None:
    """Tune's progress.csv: a row a report, the first report's columns (config left out), as CSVLoggerCallback
    writes it."""
    rows = [{k: v for k, v in epoch_result(tid, e).items() if k != "config"} for e in range(1, epochs + 1)]
    with open(folder / "progress.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_checkpoint(folder: Path, name: str, epoch: int, carried: list[dict]) -> None:
    """A checkpoint as the trainable saves it: the trainer state, with the reports since the previous checkpoint in
    extra (trainables/trainable.py report)."""
    save_atomic({"epoch": epoch, "step": epoch * 10, "extra": {checkpoints.CARRIED_REPORTS: carried}},
                folder / name / CHECKPOINT_FILE)


def cut_sweep(tmp_path: Path, state: str) -> tuple[Path, Path]:
    """A sweep of 4 epochs (milestones 1, 2, 4) whose trial cut00001 completed (its ended marker says epoch 4), and
    whose result.json was then cut in epoch 4's line; beside it a completed trial and a running one (its next line
    half written: not a cut). Tune's state as `state` says: "stale" (saved before epoch 4), "cut short", or none."""
    spec = vae_spec()
    spec.save(str(tmp_path))
    sweep = tmp_path / spec.name
    folder = write_trial(sweep, "cut00001", 3, ended={"epoch": 4, "diverged": 0}, cut=True)
    write_progress(folder, "cut00001", 4)
    write_checkpoint(folder, "checkpoint_000000", 2, [epoch_result("cut00001", 2, checkpointed=1)])
    write_checkpoint(folder, "checkpoint_000001", 4, [epoch_result("cut00001", 3, checkpointed=0),
                                                      epoch_result("cut00001", 4, **FINAL)])
    write_trial(sweep, "done0001", 4, ended={"epoch": 4, "diverged": 0})
    write_trial(sweep, "run00001", 2, cut=True)
    if state != "none":
        path = write_tune_state(sweep, [("cut00001", "TERMINATED", epoch_result("cut00001", 3)),
                                        ("done0001", "TERMINATED", epoch_result("done0001", 4)),
                                        ("run00001", "RUNNING", epoch_result("run00001", 2))])
        if state == "cut short":
            path.write_bytes(path.read_bytes()[:100])
    return sweep, folder / "result.json"


def one_line_naming(err: str, path: Path) -> str:
    lines = [line for line in err.strip().splitlines() if "result.json" in line]
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "line 4 of 4 does not parse" in lines[0], lines[0]
    assert "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. the leaderboard, the report and the study of a sweep with a completed trial's line cut short


@pytest.mark.parametrize("state", ["stale", "cut short", "none"])
def test_a_completed_trial_with_a_cut_line_stays_completed_with_its_last_metrics(tmp_path, capfd, state):
    sweep, cut = cut_sweep(tmp_path, state)
    rows = {r["trial"]: r for r in leaderboard.local_rows(str(tmp_path), vae_spec())}
    r = rows["vae_cut00001"]
    assert (r["status"], r["epochs"]) == ("completed", 4), r
    assert r["value"] == pytest.approx(8.6)  # epoch 4's test_bpd, from the checkpoint that carries its report
    assert r["extra"]["fid_256"] == 42.5 and r["extra"]["test_iwae_bpd"] == 8.55
    assert (rows["vae_done0001"]["status"], rows["vae_run00001"]["epochs"]) == ("completed", 2)
    err = capfd.readouterr().err
    one_line_naming(err, cut)
    assert len(err.strip().splitlines()) == (2 if state == "cut short" else 1), err  # and Tune's state's line
    leaderboard.local_rows(str(tmp_path), vae_spec())  # read again in this process: said once
    assert "result.json" not in capfd.readouterr().err


def test_progress_csv_alone_gives_the_epoch_and_the_metrics_it_has(tmp_path, capfd):
    sweep, cut = cut_sweep(tmp_path, "stale")
    for checkpoint in cut.parent.glob("checkpoint_*"):
        shutil.rmtree(checkpoint)
    with open(cut.parent / "progress.csv", "a") as f:
        f.write("8.4,8.4,14")  # a row of epoch 5 cut short: passed over
    (cut.parent / checkpoints.ENDED_FILE).unlink()  # and the driver never recorded the end
    write_tune_state(sweep, [("cut00001", "TERMINATED", {"trial_id": "cut00001"})])
    [r] = leaderboard.local_rows(str(tmp_path), vae_spec())
    assert (r["status"], r["epochs"], r["value"]) == ("completed", 4, pytest.approx(8.6)), r
    assert "fid_256" not in r["extra"]  # the columns of the first report only


def test_the_leaderboard_report_and_study_say_it_in_one_line_and_the_study_has_it_complete(tmp_path):
    _, cut = cut_sweep(tmp_path, "stale")
    argv = ["--name", "s", "--storage-path", str(tmp_path)]
    board = run_cli(["sweeps/leaderboard.py", "--source", "local", *argv], timeout=300)
    assert board.returncode == 0, board.stdout + board.stderr
    one_line_naming(board.stderr, cut)
    line = next(line.split() for line in board.stdout.splitlines() if "vae_cut00001" in line)
    assert line[-2:] == ["4", "completed"] and "42.5" in line, board.stdout
    shown = run_cli(["sweeps/report.py", "--no-wandb", *argv], timeout=300)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    one_line_naming(shown.stderr, cut)
    written = run_cli(["sweeps/study.py", *argv], timeout=300)
    assert written.returncode == 0, written.stdout + written.stderr
    one_line_naming(written.stderr, cut)
    s = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s/{study.STUDY_FILE}")
    trial = next(t for t in s.trials if t.user_attrs["trial"] == "vae_cut00001")
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == pytest.approx([8.6])
    assert trial.user_attrs["epochs"] == 4 and trial.intermediate_values == pytest.approx({1: 8.9, 2: 8.8, 4: 8.6})


def test_a_line_being_written_on_a_running_trial_is_no_cut(tmp_path, capfd):
    spec = vae_spec()
    spec.save(str(tmp_path))
    write_trial(tmp_path / spec.name, "run00001", 2, cut=True)
    write_tune_state(tmp_path / spec.name, [("run00001", "RUNNING", epoch_result("run00001", 2))])
    [r] = leaderboard.local_rows(str(tmp_path), spec)
    assert r["epochs"] == 2 and capfd.readouterr().err == ""


def test_a_report_appended_to_a_cut_line_is_read(tmp_path, capfd):
    """What a resume left before result.json was repaired: the cut text of epoch 3, and epoch 3 reported again on
    the same line."""
    spec = vae_spec()
    spec.save(str(tmp_path))
    folder = write_trial(tmp_path / spec.name, "old00001", 4, ended={"epoch": 4, "diverged": 0})
    lines = folder.joinpath("result.json").read_text().splitlines()
    lines[2] = lines[2][:25] + lines[2]
    folder.joinpath("result.json").write_text("\n".join(lines) + "\n")
    [t] = sweep_results.sweep_trials(str(tmp_path), spec)
    assert [r["epoch"] for r in t["history"]] == [1, 2, 3, 4] and t["status"] == "completed"
    assert "line 3 of 4 does not parse" in capfd.readouterr().err


def test_json_lines_says_which_lines_are_cut():
    whole = json.dumps({"train_loss": 1.5, "config": {"model_name": "vae"}, "epoch": 2})
    cut: list[int] = []
    rows = json_lines("\n".join([whole, whole[:30] + whole, "", whole[:whole.index("}") + 1]]), cut)
    assert [r["epoch"] for r in rows] == [2, 2] and cut == [2, 4]  # never the nested config of a cut line
    assert json_lines(whole[:3] + whole) == [json.loads(whole)]  # cut within its first key


# ---------------------------------------------------------------------------------------------------------------
# 2. the repair before a resumed trial's reports are appended


def stored(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vae_t1" / "result.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


ROW = [json.dumps(epoch_result("t1", e)) for e in (1, 2, 3)]


@pytest.mark.parametrize("text, repaired, said", [
    (f"{ROW[0]}\n{ROW[1]}\n{ROW[2][:50]}", f"{ROW[0]}\n{ROW[1]}\n", "line 3 of 3 does not parse"),
    (f"{ROW[0]}\n{ROW[1]}", f"{ROW[0]}\n{ROW[1]}\n", "no newline"),
    (f"{ROW[0]}\n{ROW[1][:20]}{ROW[1]}\n{ROW[2]}\n", None, "line 2 of 3 does not parse"),
    (f"{ROW[0]}\n{ROW[1][:20]}\n\n", f"{ROW[0]}\n", "line 2 of 3 does not parse"),
])
def test_repair_results_leaves_whole_lines_each_ending_in_a_newline(tmp_path, capfd, text, repaired, said):
    path = stored(tmp_path, text)
    fs, root = checkpoints._fs(str(tmp_path))
    assert checkpoints.repair_results(fs, f"{root}/vae_t2") is False  # none there
    assert checkpoints.repair_results(fs, f"{root}/vae_t1") is True
    fixed = path.read_text()
    assert fixed.endswith("\n") and all(json.loads(line) for line in fixed.splitlines())
    assert fixed == repaired or [json.loads(line)["epoch"] for line in fixed.splitlines()] == [1, 2, 3]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gensweep: {path}: ") and said in err[0], err
    assert checkpoints.repair_results(fs, f"{root}/vae_t1") is False  # whole now: left as it is
    assert capfd.readouterr().err == ""


def tune_trial_in(tmp_path: Path, monkeypatch, with_checkpoint: bool = True):
    """Tune's own Trial of sweep `s` under `tmp_path / "runs"`, its driver staging folder under tmp_path (no Ray)."""
    import ray.train._internal.storage as storage_module
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment.trial import Trial

    monkeypatch.setattr(storage_module, "_get_ray_train_session_dir", lambda: str(tmp_path / "session"))
    context = StorageContext(storage_path=str(tmp_path / "runs"), experiment_dir_name="s", trial_dir_name="vae_t1")
    trial = Trial("vae", config={"model_name": "vae"}, trial_id="t1", storage=context, stub=True)
    trial.relative_logdir = "vae_t1"  # named, as a restored trial is
    monkeypatch.setattr(Trial, "checkpoint", property(lambda self: object() if with_checkpoint else None))
    return trial


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_the_driver_repairs_result_json_before_tunes_json_logger_appends_to_it(tmp_path, monkeypatch, capfd,
                                                                               with_checkpoint):
    """Tune's default callbacks (its JsonLoggerCallback among them) come after the sweep's own, so the sweep's
    TrialEndRecorder repairs result.json in storage before the logger copies it to the driver and appends."""
    from ray.tune.callback import CallbackList
    from ray.tune.logger.json import JsonLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    trial = tune_trial_in(tmp_path, monkeypatch, with_checkpoint)
    path = stored(tmp_path / "runs" / "s", f"{ROW[0]}\n{ROW[1]}\n{ROW[2][:50]}")
    callbacks = _create_default_callbacks([checkpoints.TrialEndRecorder(str(tmp_path / "runs" / "s"))])
    assert [type(c) for c in callbacks].index(JsonLoggerCallback) > 0
    callbacks = CallbackList(callbacks)
    trial.init_local_path()  # as TuneController does when it schedules the trial's actor
    callbacks.on_trial_start(iteration=0, trials=[trial], trial=trial)
    callbacks.on_trial_result(iteration=0, trials=[trial], trial=trial, result=epoch_result("t1", 3, replayed=1))
    callbacks.on_trial_complete(iteration=0, trials=[trial], trial=trial)
    appended = Path(trial.local_path, "result.json").read_text()  # what the driver syncs up to storage
    if with_checkpoint:
        assert [json.loads(line)["epoch"] for line in appended.splitlines()] == [1, 2, 3]
        assert "line 3 of 3 does not parse" in capfd.readouterr().err
    else:  # no copy of the stored file: Tune starts it anew, and nothing was read or said
        assert [json.loads(line)["epoch"] for line in appended.splitlines()] == [3]
        assert path.read_text().endswith(ROW[2][:50]) and "result.json" not in capfd.readouterr().err


@pytest.mark.parametrize("resumed", [True, False])
def test_a_resumed_driver_gives_a_trial_without_result_json_an_empty_one(tmp_path, monkeypatch, resumed):
    """A full disk or a kill left a checkpointed trial without result.json in storage. A resumed driver starts the
    trial's record from that file, so the record is empty: an empty file says so, and the trial then reports again
    everything its checkpoints carry (recorded_epochs: an empty set, not None). A driver that did not resume (a
    retry within the sweep, whose record is in the driver) leaves it alone, as does a second start."""
    monkeypatch.setattr(checkpoints, "resumed_driver", resumed)
    trial = tune_trial_in(tmp_path, monkeypatch)
    folder = tmp_path / "runs" / "s" / "vae_t1"
    folder.mkdir(parents=True)
    recorder = checkpoints.TrialEndRecorder(str(tmp_path / "runs" / "s"))
    recorder.on_trial_start(iteration=0, trials=[trial], trial=trial)
    assert checkpoints.recorded_epochs(str(folder)) == (set() if resumed else None)
    (folder / "result.json").unlink(missing_ok=True)
    recorder.on_trial_start(iteration=0, trials=[trial], trial=trial)  # started again in this driver
    assert checkpoints.recorded_epochs(str(folder)) is None


def test_a_resumed_trial_replays_what_any_checkpoint_carries_up_to_the_restored_one(tmp_path):
    """The line dropped may be an older checkpoint's report (a checkpoint every epoch, num_to_keep=2)."""
    folder = tmp_path / "vae_t1"
    write_checkpoint(folder, "checkpoint_000003", 3, [epoch_result("t1", 3)])
    write_checkpoint(folder, "checkpoint_000004", 4, [epoch_result("t1", 4)])
    write_checkpoint(folder, "checkpoint_000000", 2, [epoch_result("t1", 1), epoch_result("t1", 2, x=1)])
    carried: list[dict] = []
    state, path = checkpoints.newest_state(str(folder), None, carried)
    assert state["epoch"] == 4 and path.endswith("checkpoint_000004")
    assert [r["epoch"] for r in carried] == [1, 2, 3, 4] and carried[1]["x"] == 1


# ---------------------------------------------------------------------------------------------------------------
# 3. a real sweep: its driver killed, a trial's last line cut, --resume


def stored_lines(folder: Path) -> list[str]:
    files = list(folder.glob("vae_*/result.json"))
    return files[0].read_text().splitlines() if files else []


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_with_its_ray(driver: subprocess.Popen) -> None:
    """SIGKILL the driver and then each process it started (its local Ray), by PID: a driver killed outright."""
    from ray_cluster import descendants, kill, wait_gone

    processes = descendants(driver.pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    kill(processes)
    wait_gone(processes)


@pytest.mark.slow
def test_a_resumed_trial_whose_line_was_cut_goes_on_to_its_end_every_epoch_once(tmp_path, capsys):
    """The driver runs Ray itself, as `python sweeps/run.py` does on one machine: a resume starts a new Ray session,
    whose driver copies result.json from storage, as it is, and appends to it."""
    storage, name, epochs = tmp_path / "runs", "cut", 6
    folder = storage / name
    # a checkpoint with every report: none is trained again after the newest, so every epoch is reported once
    driver = start(["sweeps/run.py", "--space", "vae", "--preset", "smoke", "--no-wandb", "--storage-path",
                    str(storage), "--name", name, "--num-samples", "1", "--fixed", f"epochs={epochs}", "--fixed",
                    "steps_per_epoch=100", "--checkpoint-every-s", "0"], tmp_path / "driver.log")
    try:
        deadline = time.time() + 300
        while len(stored_lines(folder)) < 3:  # killed as soon as the driver has synced 3 reports to storage
            assert driver.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        kill_with_its_ray(driver)
    lines = json_lines("\n".join(stored_lines(folder)))  # the whole ones (the kill may have cut a copy itself)
    assert 3 <= len(lines) < epochs, lines
    result = next(folder.glob("vae_*/result.json"))
    rows = [json.dumps(r) for r in lines]
    result.write_text("\n".join(rows[:-1] + [rows[-1][:len(rows[-1]) // 2]]))  # and its last line cut
    cut_epoch = lines[-1]["epoch"]
    resumed = start(["sweeps/run.py", "--resume", name, "--storage-path", str(storage)], tmp_path / "resume.log")
    try:
        code = resumed.wait(timeout=400)
    finally:
        if resumed.poll() is None:
            kill_with_its_ray(resumed)
    log = (tmp_path / "resume.log").read_text()
    assert code == 0, log[-5000:]
    said = [line for line in log.splitlines() if str(result) in line]
    assert len(said) == 1 and f"line {len(lines)} of {len(lines)} does not parse" in said[0], log[-5000:]
    reports = [json.loads(line) for line in result.read_text().splitlines()]  # every line parses
    assert [r["epoch"] for r in reports] == list(range(1, epochs + 1)), [r["epoch"] for r in reports]
    assert reports[cut_epoch - 1].get("replayed") == 1  # the report the cut line held, from its checkpoint
    board = log[log.index(f"Leaderboard of {name}"):]
    line = next(line for line in board.splitlines() if line.split()[1:2] == [result.parent.name])
    assert line.split()[-2:] == [str(epochs), "completed"], line
    with capsys.disabled():
        print(f"\nkilled after {len(lines)} stored reports; the cut one (epoch {cut_epoch}) replayed, "
              f"{epochs} epochs reported once each")
