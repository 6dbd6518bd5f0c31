"""A sweep's trials as they are stored: from Tune's saved state, or, where a full disk or a killed driver cut that
short, from the trials' own folders (Tune's params.json and result.json, gensweep's ended marker); and what became
of each trial. Read by the leaderboard and the report, for local paths and URIs alike; and which sweep their command
line names.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable

from genmodels.io import json_lines
from sweeps.spec import SWEEP_FILE, SweepSpec, UsageError
from sweeps.storage import is_uri, join, read_text, resolve

# Tune's names (ray.tune.result, TuneController.CKPT_FILE_TMPL), here so that reading them needs no Ray import
STATE_FILES = "experiment_state-*.json"
PARAMS_FILE = "params.json"  # the trial's config
RESULT_FILE = "result.json"  # one JSON object a line, a result per epoch
ERROR_FILE = "error.txt"  # written when a trial fails

# A trial that has not ended and that Tune's state does not describe (it did not load): its driver may still be
# running it, or was stopped. sweeps/cli.py exit_status counts it as unfinished.
NOT_ENDED = "unfinished"
# A terminated trial that ended before its last epoch, at an epoch that is none of ASHA's milestones: ASHA did not
# stop it (it decides only there), and it did not complete either.
ENDED_EARLY = "ended early"
# The statuses of a trial that has not ended (the driver's exit code, the leaderboard's "what is left").
UNFINISHED = ("running", "pending", "paused", "no result", NOT_ENDED)


def trial_status(last: dict[str, Any], max_epochs: int, ray_status: str, milestones: tuple[int, ...]) -> str:
    """What became of a trial, from its last result and Tune's status. A terminated trial short of max_epochs was
    stopped by ASHA only if it ended at one of ASHA's milestones, the only epochs where ASHA decides."""
    if last.get("diverged"):
        return "diverged"
    if ray_status == "ERROR":
        return "error"
    if ray_status in ("RUNNING", "PENDING", "PAUSED"):
        return ray_status.lower()
    epoch = last.get("epoch")
    if not is_number(epoch):  # Tune's last result of a trial that never reported holds only its id
        return "no result"
    if epoch >= max_epochs:
        return "completed"
    return "stopped (ASHA)" if epoch in milestones else ENDED_EARLY


def sweep_trials(storage: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial of the sweep: its folder name (`trial`), `id`, `config`, `history` (its results, oldest first),
    `last` result, `status` and local folder (`dir`; None in cloud storage). From Tune's saved state, or, where that
    does not load (a full disk cuts it short), from the trials' own folders, and stderr says so. UsageError (one
    line) when there is no state and no trial has reported yet (a driver stopped before any trial started leaves
    gensweep's settings only)."""
    folder = join(storage, spec.name)
    if any(fnmatch.fnmatch(name, STATE_FILES) for name, _ in _listing(folder)):
        try:
            analysis = _analysis(folder)
        except Exception as e:  # noqa: BLE001 - cut short or garbled: JSONDecodeError, EOFError, UnpicklingError...
            message = (str(e).strip().splitlines() or [""])[0]
            print(f"gensweep: Tune's state in {folder} does not load ({type(e).__name__}: {message}); reading the "
                  "trials' own results", file=sys.stderr)
        else:
            return [tune_trial(trial, folder, spec) for trial in analysis.trials]
    trials = folder_trials(folder, spec)
    if not any(t["history"] for t in trials):
        raise UsageError(f"no trial of sweep {spec.name!r} has reported yet (no trial results in {folder})")
    return trials


def _analysis(folder: str):
    """Tune's ExperimentAnalysis of the sweep's folder. It reads every trial's result.json as it loads and warns
    "Failed to fetch metrics" for a trial that has none yet, or whose last line is being written (a running
    sweep): the results are read again here, line by line, so that warning is held back."""
    from ray.tune import ExperimentAnalysis  # Ray: only for the local results (the W&B source needs none)

    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return ExperimentAnalysis(folder)
    finally:
        log.setLevel(level)


def tune_trial(trial, folder: str, spec: SweepSpec) -> dict[str, Any]:
    """A trial as Tune's state lists it, with its results from its folder (they can be newer than the state). Where
    a line of its result.json was cut short, what the line held is looked for in the rest of the folder and in
    Tune's last result, and the driver's ended marker gives the epoch it ended at (read_results)."""
    trial_folder = join(folder, trial.storage.trial_dir_name)
    marker: list[dict[str, Any] | None] = []  # the ended marker, read only for a result.json cut short

    def has_ended() -> bool:
        marker.append(_ended_marker(trial_folder))
        return trial.status in ("TERMINATED", "ERROR") or marker[0] is not None

    history, cut = read_results(trial_folder, has_ended, [trial.last_result or {}])
    last = history[-1] if history else (trial.last_result or {})
    if cut:
        last = _with_end(last, marker[0] if marker else _ended_marker(trial_folder))
    return {"trial": trial.storage.trial_dir_name, "id": trial.trial_id, "config": trial.config,
            "history": history, "last": last, "dir": None if is_uri(folder) else Path(trial_folder),
            "status": trial_status(last, spec.max_epochs, trial.status, spec.milestones)}


def _ended_marker(trial_folder: str) -> dict[str, Any] | None:
    """What the driver recorded as the trial ended (trainables/checkpoints.py TrialEndRecorder); None before."""
    from trainables.checkpoints import ENDED_FILE  # imports Ray

    return _read_object(join(trial_folder, ENDED_FILE))


def folder_trials(folder: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """The trials of the sweep from their own folders (`<model>_<trialid>`, holding Tune's params.json and
    result.json), as sweep_trials gives them, for a sweep whose Tune state does not load."""
    from trainables.checkpoints import ENDED_FILE  # imports Ray, as the results do

    trials = []
    for name, is_folder in sorted(_listing(folder)):
        files = {n for n, _ in _listing(join(folder, name))} if is_folder else set()
        if not name.startswith(f"{spec.model_name}_") or not files & {PARAMS_FILE, RESULT_FILE}:
            continue
        trial_folder = join(folder, name)
        history, _ = read_results(trial_folder, ENDED_FILE in files)
        config = _read_object(join(trial_folder, PARAMS_FILE)) or next(
            (r["config"] for r in history if isinstance(r.get("config"), dict)), {})  # params.json cut short
        ended = _read_object(join(trial_folder, ENDED_FILE)) if ENDED_FILE in files else None
        last = _with_end(history[-1] if history else {}, ended)
        trials.append({"trial": name, "id": name.removeprefix(f"{spec.model_name}_"), "config": config,
                       "history": history, "last": last, "dir": None if is_uri(folder) else Path(trial_folder),
                       "status": folder_status(last, ended is not None, ERROR_FILE in files, spec)})
    return trials


def _with_end(last: dict[str, Any], ended: dict[str, Any] | None) -> dict[str, Any]:
    """The last result, with what the driver recorded when the trial ended (its epoch, whether it diverged) where
    the result that said so was cut short."""
    ended = ended or {}
    epoch = ended.get("epoch")
    if is_number(epoch) and epoch > (last.get("epoch") if is_number(last.get("epoch")) else 0):
        last = {**last, "epoch": epoch}
    return {**last, "diverged": 1} if ended.get("diverged") == 1 else last


def folder_status(last: dict[str, Any], ended: bool, failed: bool, spec: SweepSpec) -> str:
    """A trial's status from its folder: one the driver recorded as ended (ENDED_FILE) by its last epoch, as Tune's
    TERMINATED; one not ended failed (Tune wrote its error file; also while Tune retries it), or has not finished."""
    if ended:
        return trial_status(last, spec.max_epochs, "TERMINATED", spec.milestones)
    if failed:
        return "error"
    return NOT_ENDED if is_number(last.get("epoch")) else "no result"


_said_cut: set[str] = set()  # the result.json files said to be cut short: one line a file, however often read


def read_results(trial_folder: str, ended: bool | Callable[[], bool] = False,
                 known: list[dict[str, Any]] = ()) -> tuple[list[dict[str, Any]], bool]:
    """A trial's results, oldest first, from its result.json, and whether a line of it was cut short. A last line
    without its newline, of a trial that has not ended (`ended`, a callable asked only then), is being written now:
    skipped without a word. Any other line that does not parse was cut short (a full disk, a copy cut short, a
    driver killed as it wrote): said in one line on stderr (once a file in this process), and the results of the
    epochs result.json lost are taken from the rest of the trial's folder (Tune's progress.csv, the reports its
    checkpoints carry; trainables/checkpoints.py folder_reports) and from `known` results (Tune's last one)."""
    path = join(trial_folder, RESULT_FILE)
    text = _read(path)
    cut: list[int] = []
    history = json_lines(text, cut)
    total = len(text.splitlines())
    if not cut or (cut == [total] and not text.endswith(("\n", "\r")) and not (ended() if callable(ended) else ended)):
        return history, False
    from trainables.checkpoints import cut_lines, folder_reports  # Ray and torch: only for a damaged file

    if path not in _said_cut:
        _said_cut.add(path)
        print(f"gensweep: {path}: {cut_lines(cut, total)} (cut short); the trial's results it lost are read from "
              "the rest of its folder (ended marker, progress.csv, checkpoints)", file=sys.stderr, flush=True)
    return with_lost_results(history, [*folder_reports(trial_folder), *known]), True


def with_lost_results(history: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`history` with the results in `found` of the epochs it lacks (those of one epoch merged, the later ones'
    values first), in epoch order."""
    have = {r.get("epoch") for r in history}
    lost: dict[Any, dict[str, Any]] = {}
    for r in found:
        if is_number(r.get("epoch")) and r["epoch"] not in have:
            lost[r["epoch"]] = {**lost.get(r["epoch"], {}), **r}
    if not lost:
        return history
    return sorted([*history, *lost.values()], key=lambda r: r["epoch"] if is_number(r.get("epoch")) else 0)


def _read_object(path: str) -> dict[str, Any] | None:
    """A JSON object file; None when it is missing, cut short or not an object."""
    try:
        info = json.loads(_read(path))
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _read(path: str) -> str:
    """A file's text at a local path or URI; empty when it is missing or unreadable."""
    try:
        return read_text(path) or ""
    except OSError:
        return ""


def _listing(folder: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of each entry of a local folder or URI; none when it does not exist."""
    import pyarrow.fs

    try:
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(resolve(folder))
        infos = fs.get_file_info(pyarrow.fs.FileSelector(fs_path))
    except OSError:
        return []
    return [(i.base_name, i.type == pyarrow.fs.FileType.Directory) for i in infos]


def is_number(v: Any) -> bool:
    """A finite number (numpy's included: results come from pandas frames), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------ which sweep a command names

def resolve_sweep(args: argparse.Namespace) -> tuple[str, SweepSpec]:
    """(storage root, the sweep's spec); raises UsageError with a one-line message."""
    storage = resolve(args.storage_path)
    return storage, SweepSpec.load(storage, args.name or _newest_sweep(storage))


def _newest_sweep(storage: str) -> str:
    if "://" in storage:
        raise UsageError(f"pass --name with a cloud --storage-path ({storage})")
    sweeps = sorted(Path(storage).glob(f"*/{SWEEP_FILE}"), key=lambda p: p.stat().st_mtime)
    if not sweeps:
        raise UsageError(f"no sweeps under {storage}; run `gensweep run` first or pass --storage-path")
    return sweeps[-1].parent.name
