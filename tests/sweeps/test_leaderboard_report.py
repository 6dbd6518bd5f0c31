"""Leaderboard ranking by FID sample count, its W&B errors, the report's plots (legends, FID series per count,
empty sweeps, labelled reconstruction grids, the `wandb sync` hint), and sweep folders on disk: statuses by ASHA's
milestones, a Tune state cut short by a full disk, a sweep without Tune state, a running sweep."""
import io
import json
import os
import re
from pathlib import Path

import pytest
from conftest import run_cli, saved_spec_of

from sweeps import leaderboard, report
from sweeps.spec import SweepSpec


def fid_row(trial: str, value: float | None, n: int | None, best: float | None = None) -> dict:
    return {"trial": trial, "params": {"model.beta": 1.0}, "value": value, "n": n, "best": best, "epochs": 2,
            "status": "completed", "extra": {}}


def table(rows: list[dict], metric: str = "fid", mode: str = "min") -> list[list[str]]:
    import io

    out = io.StringIO()
    leaderboard.print_table(rows, metric, mode, file=out)
    return [line.split() for line in out.getvalue().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# 1. ranking by the deepest FID sample count, then by value


def test_fid_at_fewer_samples_ranks_below_fid_at_more_samples():
    rows = [fid_row("vae_early", 5.0, 128, 5.0), fid_row("vae_deep", 9.0, 256, 8.5), fid_row("vae_none", None, None),
            fid_row("vae_deep2", 7.0, 256, 7.0)]
    order = ["vae_deep2", "vae_deep", "vae_early", "vae_none"]
    header, _, *body = table(rows)
    assert [r[1] for r in body] == order
    assert header[3:7] == ["fid", "(min)", "n", "best_fid@n"]
    assert [r["trial"] for r in leaderboard.rank_rows(rows, "min")] == order
    assert body[1][3:6] == ["9", "256", "8.5"]  # value, its count, the best at that count
    assert body[2][3:6] == ["5", "128", "5"]


def test_max_mode_also_ranks_the_deeper_count_first():
    rows = [fid_row("a", 50.0, 128), fid_row("b", 10.0, 1000)]
    assert [r["trial"] for r in leaderboard.rank_rows(rows, "max")] == ["b", "a"]


def test_non_fid_metrics_keep_their_columns_and_order():
    rows = [fid_row("a", 7.9, None, 7.7), fid_row("b", 7.8, None, 7.8)]
    header, _, *body = table(rows, "test_bpd")
    assert header == ["rank", "trial", "beta", "test_bpd", "(min)", "best_test_bpd", "epochs", "status"]
    assert [r[1] for r in body] == ["b", "a"]
    assert body[1][3:5] == ["7.9", "7.7"]  # ranked by its last value; its best beside it


def test_a_best_column_that_repeats_the_ranking_column_is_left_out():
    rows = [fid_row("a", 7.9, None, 7.9), fid_row("b", 7.8, None, 7.8)]
    header, _, *body = table(rows, "test_bpd")
    assert header == ["rank", "trial", "beta", "test_bpd", "(min)", "epochs", "status"]


def test_ranking_fields_take_the_last_result_with_the_metric_and_the_best_at_its_count():
    history = [
        {"epoch": 1, "fid": 9.0, "fid_n": 128, "best_fid_128": 9.0, "fid_128": 9.0},
        {"epoch": 2, "fid": 8.0, "fid_n": 256, "best_fid_256": 8.0, "fid_256": 8.0},
        {"epoch": 3, "fid": float("nan"), "fid_n": float("nan")},  # between rungs: no FID (NaN in Ray's frame)
    ]
    assert leaderboard.ranking_fields(history, "fid") == {"value": 8.0, "n": 256, "best": 8.0}
    assert leaderboard.ranking_fields([{"rfid": 3.0, "rfid_n": 1000, "best_rfid_1k": 2.5}], "rfid") == {
        "value": 3.0, "n": 1000, "best": 2.5}
    assert leaderboard.ranking_fields([*history, {"diverged": 1}], "fid")["value"] is None
    assert leaderboard.ranking_fields([{"test_bpd": 7.0, "best_test_bpd": 6.5}], "test_bpd") == {
        "value": 7.0, "n": None, "best": 6.5}


def test_wandb_rows_rank_by_count_from_run_summaries(monkeypatch):
    import wandb

    class Run:
        def __init__(self, rid, summary):
            self.id, self.summary, self.state, self.config = rid, summary, "finished", {"model_name": "ncsn"}

    runs = [Run("early", {"epoch": 1, "fid": 5.0, "fid_n": 128, "best_fid_128": 5.0, "fid_128": 5.0}),
            Run("deep", {"epoch": 2, "fid": 9.0, "fid_n": 256, "best_fid_256": 9.0, "best_fid_128": 4.0})]
    api = type("Api", (), {"default_entity": "me", "runs": lambda self, path, filters: runs})
    monkeypatch.setattr(wandb, "Api", lambda: api())
    rows = leaderboard.wandb_rows(saved_spec_of("sweep", searched=("model.sigma",)), "proj", None)
    assert [(r["trial"], r["n"], r["best"]) for r in leaderboard.rank_rows(rows, "min")] == [
        ("ncsn_deep", 256, 9.0), ("ncsn_early", 128, 5.0)]
    assert all("fid_n" not in r["extra"] for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# 2. --source wandb without a login, or with a failing W&B API: one line, exit 2


@pytest.fixture
def fid_sweep(tmp_path):
    """A sweep folder with only its settings file: enough for the leaderboard to get to W&B."""
    saved_spec_of("s").save(str(tmp_path))
    return tmp_path


def no_login_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    return {**env, "HOME": str(home), "NETRC": str(home / ".netrc")}


@pytest.mark.slow
def test_source_wandb_without_login_is_one_line_and_exit_2(fid_sweep, tmp_path):
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run([sys.executable, "sweeps/leaderboard.py", "--source", "wandb", "--name", "s",
                        "--storage-path", str(fid_sweep)], cwd=Path(__file__).parents[2], env=no_login_env(home),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "not logged in" in lines[0] and "wandb login" in lines[0] and "--source local" in lines[0]


def test_wandb_api_error_is_one_line_and_exit_2(fid_sweep, monkeypatch, capsys):
    import wandb

    def unreachable():
        raise ConnectionError("api.wandb.ai unreachable\n(retries exhausted)")

    monkeypatch.setattr(leaderboard, "is_logged_in", lambda: True)
    monkeypatch.setattr(wandb, "Api", unreachable)
    assert leaderboard.main(["--source", "wandb", "--name", "s", "--storage-path", str(fid_sweep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "W&B API failed" in err[0] and "unreachable" in err[0], err


@pytest.mark.slow
def test_unreachable_wandb_server_is_one_line_and_exit_2(fid_sweep, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**no_login_env(home), "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    r = run_cli(["sweeps/leaderboard.py", "--source", "wandb", "--name", "s", "--storage-path", str(fid_sweep)],
                env=env, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "W&B API failed" in lines[0] and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------------------
# 3. report plots, on synthetic histories


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the report saves, by file name (still inspectable after they are closed)."""
    figures = {}
    save = report._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return figures


def synthetic_trial(tid: str, history: list[dict], status: str = "completed") -> dict:
    config = {"model.sigma_max": 50.0, "train.lr": 1e-3}
    return {"name": f"ncsn_{tid}", "id": tid, "label": report.trial_label(tid, config, ["model.sigma_max", "train.lr"]),
            "dir": None, "config": config, "history": history, "last": history[-1] if history else {},
            "status": status}


def test_fid_curves_have_one_series_per_sample_count_and_a_legend(tmp_path, saved_figures):
    nan = float("nan")
    trials = [
        synthetic_trial("t1", [{"epoch": 1, "fid": 90.0, "fid_n": 128}, {"epoch": 2, "fid": nan, "fid_n": nan},
                               {"epoch": 3, "fid": 40.0, "fid_n": 256}, {"epoch": 4, "fid": 30.0, "fid_n": 256}]),
        synthetic_trial("t2", [{"epoch": 1, "fid": 80.0, "fid_n": 128}], status="stopped (ASHA)"),
    ]
    report.plot_curves(saved_spec_of(), trials, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 5000
    ax = saved_figures["curves.png"].axes[0]
    for line in ax.get_lines():  # no line joins a 128-sample FID to a 256-sample one
        ys = set(line.get_ydata())
        assert not (ys & {90.0, 80.0} and ys & {40.0, 30.0}), ys
    legend_texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "t1 sigma_max=50 lr=0.001" in legend_texts and any(t.startswith("t2 ") for t in legend_texts)
    assert {"fid_128", "fid_256"} <= set(legend_texts)


def test_curves_without_any_metric_say_so(tmp_path, saved_figures):
    trials = [synthetic_trial("t1", [{"epoch": 1, "loss": 3.0}]), synthetic_trial("t2", [])]
    path = report.plot_curves(saved_spec_of(), trials, tmp_path / "curves.png")
    assert path.exists()
    texts = [t.get_text() for t in saved_figures["curves.png"].axes[0].texts]
    assert texts == ["no trial reported fid yet"]


# ---------------------------------------------------------------------------------------------------------------
# 3. report plots and the leaderboard on a real smoke sweep


@pytest.fixture(scope="module")
def smoke_report(smoke_sweep):
    """write_report on the smoke sweep, with the figures it saved."""
    storage, _ = smoke_sweep
    figures = {}
    save = report._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_save", keep)
        paths = report.write_report(str(storage), SweepSpec.load(str(storage), "smoke"))
    return paths, figures


@pytest.mark.slow
def test_report_curves_name_every_trial(smoke_sweep, smoke_report):
    paths, figures = smoke_report
    assert {p.name for p in paths} == {"metric_per_epoch.png", "tradeoffs.png", "best_samples.png",
                                       "param_importances.png", "parallel_coordinate.png"}  # 6 trials at epoch 1
    assert all(p.is_file() for p in paths)
    trial_ids = [p.name.split("_", 1)[1] for p in (smoke_sweep[0] / "smoke").iterdir() if p.name.startswith("vae_")]
    assert len(trial_ids) == 6
    texts = [t.get_text() for t in figures["metric_per_epoch.png"].axes[0].get_legend().get_texts()]
    assert sorted(t.split()[0] for t in texts) == sorted(trial_ids)
    assert all(re.search(r"beta=\S+ latent=\d+ lr=\S+ likelihood_scale=\S+", t) for t in texts), texts


@pytest.mark.slow
def test_best_samples_label_inputs_and_reconstructions(smoke_report):
    _, figures = smoke_report
    fig = figures["best_samples.png"]
    recon = [ax for ax in fig.axes if ax.get_title() == "reconstructions"
             or ax.get_title().endswith(": reconstructions")]
    assert recon, [ax.get_title() for ax in fig.axes]
    for ax in recon:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["in", "rec"] * 8  # write_grids: 16 columns a row, each input beside its reconstruction
        assert "input" in ax.get_xlabel() and "reconstruction" in ax.get_xlabel()
    samples = [ax for ax in fig.axes if ax.get_title().endswith(": samples")]
    assert samples and "test_bpd=" in samples[0].get_title()


@pytest.mark.slow
def test_offline_report_prints_the_wandb_sync_command(smoke_sweep, tmp_path):
    env = {**no_login_env(tmp_path), "WANDB_MODE": "offline"}
    r = run_cli(["sweeps/report.py", "--name", "smoke", "--storage-path", str(smoke_sweep[0])], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    sync = re.search(r"`wandb sync (\S+)`", r.stdout)
    assert sync, r.stdout
    assert Path(sync.group(1)).is_dir() and Path(sync.group(1)).name.startswith("offline-run-")


@pytest.mark.slow
def test_local_leaderboard_of_a_non_fid_sweep_is_unchanged(smoke_sweep):
    rows = leaderboard.local_rows(str(smoke_sweep[0]), SweepSpec.load(str(smoke_sweep[0]), "smoke"))
    assert len(rows) == 6 and all(r["n"] is None for r in rows)  # ranked by test_bpd: no sample count
    ranked = [r["value"] for r in leaderboard.rank_rows(rows, "min")]
    assert ranked == sorted(ranked)


# ---------------------------------------------------------------------------------------------------------------
# 4. sweep folders on disk, as Tune and the driver write them: statuses, damaged Tune state, no state yet


def vae_spec(name: str = "s") -> SweepSpec:
    """A vae sweep of 4 epochs ranked by test_bpd: ASHA's milestones are epochs 1, 2 and 4."""
    spec = saved_spec_of(name, space="vae", objectives=("test_bpd",), searched=("model.beta",), max_epochs=4)
    assert spec.milestones == (1, 2, 4)
    return spec


def epoch_result(tid: str, epoch: int, **metrics) -> dict:
    bpd = 9.0 - epoch / 10
    return {"epoch": epoch, "test_bpd": bpd, "best_test_bpd": bpd, "test_psnr": 14.0, "diverged": 0,
            "trial_id": tid, "training_iteration": epoch, "config": {"model_name": "vae", "model.beta": 0.5},
            **metrics}


def write_trial(sweep: Path, tid: str, epochs: int, ended: dict | None = None, cut: bool = False,
                **last_metrics) -> Path:
    """A trial's folder as Tune and the driver leave it: params.json, result.json (a line per epoch, and with
    `cut` the next line cut short by a full disk) and, for a trial that ended, the driver's ENDED_FILE."""
    from trainables.checkpoints import ENDED_FILE

    folder = sweep / f"vae_{tid}"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"model_name": "vae", "model.beta": 0.5}))
    lines = [json.dumps(epoch_result(tid, e, **(last_metrics if e == epochs else {}))) for e in range(1, epochs + 1)]
    if cut:
        lines.append(json.dumps(epoch_result(tid, epochs + 1))[:40])
    (folder / "result.json").write_text("\n".join(lines) + ("" if cut or not lines else "\n"))
    if ended is not None:
        (folder / ENDED_FILE).write_text(json.dumps(ended))
    return folder


def write_tune_state(sweep: Path, trials: list[tuple[str, str, dict]]) -> Path:
    """Tune's experiment_state-*.json listing the trials (id, Tune status, last result), serialised by Tune's own
    Trial, as a driver saves it (no Ray started)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.placement_groups import PlacementGroupFactory
    from ray.tune.experiment.trial import Trial
    from ray.tune.utils.serialization import TuneFunctionEncoder

    states = []
    for tid, status, last in trials:
        storage = StorageContext(storage_path=str(sweep.parent), experiment_dir_name=sweep.name,
                                 trial_dir_name=f"vae_{tid}")
        trial = Trial("vae", config={"model_name": "vae", "model.beta": 0.5}, trial_id=tid, storage=storage, stub=True)
        trial.placement_group_factory = PlacementGroupFactory([{"CPU": 1}])
        trial.status = status
        trial.run_metadata.last_result = last
        states.append(trial.get_json_state())
    path = sweep / "experiment_state-2026-01-01_00-00-00.json"
    path.write_text(json.dumps({"trial_data": states, "runner_data": {}, "stats": {}}, cls=TuneFunctionEncoder))
    return path


def damaged_sweep(tmp_path: Path) -> tuple[Path, SweepSpec]:
    """A sweep that a full disk hit: a trial of each kind in its folder (Tune's state is left to the test)."""
    spec = vae_spec()
    spec.save(str(tmp_path))
    sweep = tmp_path / spec.name
    write_trial(sweep, "done0001", 4, ended={"epoch": 4, "diverged": 0})
    write_trial(sweep, "asha0001", 1, ended={"epoch": 1, "diverged": 0})
    write_trial(sweep, "early001", 3, ended={"epoch": 3, "diverged": 0})
    write_trial(sweep, "div00001", 2, ended={"epoch": 2, "diverged": 1}, diverged=1)
    write_trial(sweep, "run00001", 2, cut=True)  # not ended: running, or its driver stopped
    write_trial(sweep, "cut00001", 3, ended={"epoch": 4, "diverged": 0}, cut=True)  # epoch 4's line cut short
    (write_trial(sweep, "blank001", 0) / "result.json").unlink()  # started, never reported
    (sweep / "report").mkdir()  # report.py's output: not a trial
    return sweep, spec


EXPECTED_STATUSES = {"vae_done0001": ("completed", 4), "vae_asha0001": ("stopped (ASHA)", 1),
                     "vae_early001": ("ended early", 3), "vae_div00001": ("diverged", 2),
                     "vae_run00001": ("unfinished", 2), "vae_cut00001": ("completed", 4),
                     "vae_blank001": ("no result", 0)}


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def truncated_pickle_in_state(state: Path) -> None:
    """The state file parses, but a pickled value inside it (the trial's resources) is cut short."""
    info = json.loads(state.read_text())
    trial = json.loads(info["trial_data"][0][0])
    trial["placement_group_factory"] = trial["placement_group_factory"][:60]
    info["trial_data"][0][0] = json.dumps(trial)
    state.write_text(json.dumps(info))


@pytest.mark.parametrize("damage", ["cut short", "empty", "garbage", "truncated pickle"])
def test_a_damaged_tune_state_is_read_from_the_trials_own_folders(tmp_path, capfd, damage):
    sweep, spec = damaged_sweep(tmp_path)
    state = write_tune_state(sweep, [("done0001", "TERMINATED", epoch_result("done0001", 4))])
    {"cut short": cut_short, "empty": lambda p: p.write_bytes(b""),
     "garbage": lambda p: p.write_bytes(b"\x00\xff{\"trial_data\": [[\"\xe9"),
     "truncated pickle": truncated_pickle_in_state}[damage](state)
    for pickled in ("tuner.pkl", "searcher-state-2026-01-01_00-00-00.pkl"):  # Tune's pickles, cut by the same disk
        (sweep / pickled).write_bytes(b"\x80\x05\x95\x10")
    rows = leaderboard.local_rows(str(tmp_path), spec)
    assert {r["trial"]: (r["status"], r["epochs"]) for r in rows} == EXPECTED_STATUSES
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial["vae_done0001"]["value"] == pytest.approx(8.6) and by_trial["vae_done0001"]["params"] == {
        "model.beta": 0.5}
    assert by_trial["vae_run00001"]["value"] == pytest.approx(8.8)  # the line cut short is skipped, not fatal
    assert by_trial["vae_cut00001"]["value"] == pytest.approx(8.7)  # the last result that was written whole
    assert by_trial["vae_div00001"]["value"] is None and by_trial["vae_blank001"]["value"] is None
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "vae_cut00001/result.json: line 4 of 4 does not parse" in err[1], err  # a completed
    assert err[0].startswith(f"gensweep: Tune's state in {sweep} does not load (") and err[0].endswith(
        "reading the trials' own results"), err


def test_leaderboard_and_report_cli_read_a_damaged_sweep(tmp_path, capfd):
    sweep, spec = damaged_sweep(tmp_path)
    cut_short(write_tune_state(sweep, [("done0001", "TERMINATED", epoch_result("done0001", 4))]))
    assert leaderboard.main(["--source", "local", "--name", "s", "--storage-path", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "does not load" in err and "Traceback" not in err
    body = [line for line in out.splitlines()[3:] if not line.startswith("note:")]
    assert body[0].split()[1] == "vae_done0001" and len(body) == len(EXPECTED_STATUSES)
    assert not re.search(r"\bNone\b|\bnan\b", out), out
    assert report.main(["--no-wandb", "--name", "s", "--storage-path", str(tmp_path)]) == 0
    assert (sweep / "report" / "metric_per_epoch.png").stat().st_size > 5000


def test_truncated_tune_pickles_leave_the_state_readable(tmp_path, capfd):
    """ExperimentAnalysis reads the JSON state only: a cut tuner.pkl or searcher state (ResultGrid's EOFError)
    does not send the leaderboard to the trials' folders."""
    sweep, spec = damaged_sweep(tmp_path)
    write_tune_state(sweep, [("done0001", "TERMINATED", epoch_result("done0001", 4)),
                             ("early001", "TERMINATED", epoch_result("early001", 3))])
    for pickled in ("tuner.pkl", "searcher-state-2026-01-01_00-00-00.pkl"):
        (sweep / pickled).write_bytes(b"\x80\x05\x95\x10")
    rows = leaderboard.local_rows(str(tmp_path), spec)
    assert {r["trial"]: r["status"] for r in rows} == {"vae_done0001": "completed", "vae_early001": "ended early"}
    assert capfd.readouterr().err == ""


@pytest.fixture
def fetch_warnings():
    """What Tune's ExperimentAnalysis logs ("Failed to fetch metrics ...": its handler writes to stderr)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def test_a_running_sweep_has_no_fetch_warnings_and_a_dash_in_every_missing_cell(tmp_path, capfd, fetch_warnings):
    spec = vae_spec()
    spec.save(str(tmp_path))
    sweep = tmp_path / spec.name
    write_trial(sweep, "run00001", 2, cut=True)  # its next line half written
    write_trial(sweep, "asha0001", 1, ended={"epoch": 1, "diverged": 0})
    write_tune_state(sweep, [("run00001", "RUNNING", epoch_result("run00001", 1)),
                             ("asha0001", "TERMINATED", epoch_result("asha0001", 1)),
                             ("pend0001", "PENDING", {}),  # no folder yet
                             ("new00001", "RUNNING", {})])  # folder not written yet
    assert leaderboard.main(["--source", "local", "--name", "s", "--storage-path", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert not [r.getMessage() for r in fetch_warnings if r.levelname != "DEBUG"]
    assert "Failed to fetch metrics" not in err, err
    header, _, *body = [line.split() for line in out.splitlines()[1:] if not line.startswith("note:")]
    rows = {line[1]: line for line in body}
    assert rows["vae_run00001"][-2:] == ["2", "pending"]  # Tune lists a running trial as pending once saved
    assert rows["vae_run00001"][3] == "8.8"  # its results so far, read past the line being written
    assert rows["vae_asha0001"][-3:] == ["1", "stopped", "(ASHA)"]
    assert rows["vae_pend0001"][2:] == ["0.5", "-", "-", "0", "pending"], rows["vae_pend0001"]
    assert not re.search(r"\bNone\b|\bnan\b", out), out


def test_missing_cells_print_a_dash():
    rows = [fid_row("a", 5.0, 128, 4.0), {**fid_row("b", None, None), "params": {"model.beta": None},
                                          "extra": {"fid_128": float("nan")}}]
    rows[0]["extra"] = {"fid_128": 5.0}
    _, _, _, second = table(rows)
    assert second == ["2", "b", "-", "-", "-", "-", "-", "2", "completed"]
    assert leaderboard.short(float("nan")) == "-" and leaderboard.short(None) == "-"
    assert leaderboard.short(float("inf")) == "inf" and leaderboard.short(0) == "0"


@pytest.mark.parametrize("tool", [leaderboard, report])
def test_a_sweep_without_tune_state_says_no_trial_has_reported_yet(tmp_path, capfd, tool):
    vae_spec().save(str(tmp_path))
    argv = ["--name", "s", "--storage-path", str(tmp_path)]
    assert tool.main([*(["--source", "local"] if tool is leaderboard else ["--no-wandb"]), *argv]) == 2
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no trial of sweep 's' has reported yet" in lines[0], err
    assert out == "" and not (tmp_path / "s" / "report").exists()


def test_asha_stops_only_at_its_milestones():
    milestones = (1, 2, 4)

    def status(last, ray_status="TERMINATED"):
        return leaderboard.trial_status(last, 4, ray_status, milestones)

    assert [status({"epoch": e}) for e in (1, 2, 3, 4)] == ["stopped (ASHA)", "stopped (ASHA)", "ended early",
                                                            "completed"]
    assert status({}) == "no result" and status({"trial_id": "x"}) == "no result"
    assert status({"epoch": 3, "diverged": 1}) == "diverged"
    assert status({"epoch": 3}, "ERROR") == "error" and status({"epoch": 3}, "RUNNING") == "running"


def test_wandb_rows_say_ended_early_off_the_milestones(monkeypatch):
    import wandb

    class Run:
        def __init__(self, rid, epoch):
            self.id, self.state, self.config = rid, "finished", {"model_name": "vae"}
            self.summary = {"epoch": epoch, "test_bpd": 8.0}

    runs = [Run("a", 1), Run("b", 3), Run("c", 4)]
    api = type("Api", (), {"default_entity": "me", "runs": lambda self, path, filters: runs})
    monkeypatch.setattr(wandb, "Api", lambda: api())
    rows = leaderboard.wandb_rows(vae_spec(), "proj", None)
    assert {r["trial"]: r["status"] for r in rows} == {"vae_a": "stopped (ASHA)", "vae_b": "ended early",
                                                        "vae_c": "completed"}


def test_the_board_says_how_each_trial_ran_its_step_on_cuda():
    rows = [{"trial": "vae_a", "params": {}, "value": 1.0, "best": 1.0, "n": None, "epochs": 2, "status": "completed",
             "extra": leaderboard.extra_columns({"graph_status": "eager: self-check failed (train_loss: 2 vs 1)"})},
            {"trial": "vae_b", "params": {}, "value": 2.0, "best": 2.0, "n": None, "epochs": 2, "status": "completed",
             "extra": leaderboard.extra_columns({"graph_status": "graphed: self-check passed (0.3%)"})}]
    out = io.StringIO()
    leaderboard.print_table(rows, "test_bpd", "min", file=out)
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if line.startswith("rank"))
    assert "graphs" in header.split()
    assert " eager " in next(line for line in lines if "vae_a" in line)
    assert " graphed " in next(line for line in lines if "vae_b" in line)
