"""What a trial finds in its folder in storage when it starts again: the newest checkpoint that loads, and whether
the trial had already ended.

Tune saves its experiment state every few seconds, so a driver killed between two saves leaves a state that lags
what the trials wrote: a trial's newest checkpoint may be newer than the one the state names (or the state may
name none), and a trial that ASHA stopped or that finished may still be listed as running. `run.py --resume`
restores that state; a trial then looks in its own folder instead of trusting it, so no finished epoch is trained
twice and no ended trial is trained again. Paths may be local folders or cloud URIs (read through pyarrow.fs).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune

from genmodels.engine import CHECKPOINT_FILE
from genmodels.io import json_lines, load_checkpoint, write_atomic
from trainables.driver_clock import clocked

GRAPHS_FAILED_FILE = "gensweep_graph_capture_failed.json"  # written by a trial whose CUDA graph capture failed
ENDED_FILE = "gensweep_trial_ended.json"  # written by the driver (TrialEndRecorder) when a trial ends
IMAGES_DIR = "images"  # inside each checkpoint: <name>.png grids written by the trainable, logged to W&B
RESULT_FILE = "result.json"  # Tune's record of a trial's reports, one JSON object a line
PROGRESS_FILE = "progress.csv"  # Tune's other record of them: a CSV row each, with the first report's columns only
# In a checkpoint's exp.extra: the reports made since the previous checkpoint, this one's own last (the trainable's
# `report` keeps them; a resumed trial reports again those result.json lacks)
CARRIED_REPORTS = "reports"


def trial_dirname(model_name: str, trial_id: str) -> str:
    """The trial's folder name under the sweep's folder (what Tune's trial_dirname_creator gives it)."""
    return f"{model_name}_{trial_id}"


def _fs(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return pyarrow.fs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))


def graph_capture_failed(trial_folder: str) -> str | None:
    """Why this trial's CUDA graph capture failed in an earlier process (Tune's retry then runs it eagerly)."""
    fs, root = _fs(trial_folder)
    try:
        with fs.open_input_stream(f"{root}/{GRAPHS_FAILED_FILE}") as f:
            return json.loads(f.read().decode()).get("error") or "failed"
    except (OSError, ValueError, AttributeError):
        return None


def record_graph_capture_failed(trial_folder: str, error: str) -> None:
    fs, root = _fs(trial_folder)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{GRAPHS_FAILED_FILE}") as f:
        f.write(json.dumps({"error": error}).encode())


def has_ended(trial_folder: str) -> bool:
    fs, root = _fs(trial_folder)
    return fs.get_file_info(f"{root}/{ENDED_FILE}").type == pyarrow.fs.FileType.File


def record_end(trial_folder: str, info: dict[str, Any]) -> None:
    fs, root = _fs(trial_folder)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{ENDED_FILE}") as f:
        f.write(json.dumps(info).encode())


def newest_state(trial_folder: str | None, given: tune.Checkpoint | None,
                 carried: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], str] | None:
    """(state, path) of the trial's newest checkpoint that loads, by the epoch saved in it: those in its folder and
    the one Tune handed back. (Not by folder name: Tune numbers the checkpoints of a restored trial from its own
    count, so after a resume a lower number can hold a later epoch.) An unreadable one (e.g. truncated by a crash)
    is passed over, and that is said on stderr. With `carried`, the reports every checkpoint that loads carries
    (CARRIED_REPORTS) are added to it, by epoch, the newer checkpoint's where two carry one epoch."""
    candidates: list[tune.Checkpoint] = []
    if trial_folder:
        fs, root = _fs(trial_folder)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(root))
        except (FileNotFoundError, OSError):
            infos = []
        candidates = [tune.Checkpoint(f"{root}/{i.base_name}", filesystem=fs) for i in infos
                      if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    if given is not None and all(c.path != given.path for c in candidates):
        candidates.append(given)
    newest: tuple[dict[str, Any], str] | None = None
    by_epoch: dict[int, tuple[tuple[int, int], dict[str, Any]]] = {}  # epoch: (the checkpoint's age, its report)
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as d:
                state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        except Exception as e:  # noqa: BLE001 - truncated, missing or foreign: the others may load
            print(f"gensweep: checkpoint {checkpoint.path} does not load ({type(e).__name__}: {e}); restoring from "
                  f"the newest one that does", file=sys.stderr)
            continue
        if newest is None or (state["epoch"], state["step"]) > (newest[0]["epoch"], newest[0]["step"]):
            newest = state, checkpoint.path
        age = (state["epoch"], state["step"])
        for report in (state.get("extra") or {}).get(CARRIED_REPORTS) or []:
            epoch = report.get("epoch")
            if isinstance(epoch, int) and (epoch not in by_epoch or by_epoch[epoch][0] < age):
                by_epoch[epoch] = age, report
    if carried is not None:
        carried.extend(by_epoch[epoch][1] for epoch in sorted(by_epoch))
    return newest


def free_bytes(folder: str) -> int | None:
    """Free space where the local `folder` lives (its nearest existing parent), or None for a URI (a bucket does not
    fill up, and cannot be asked)."""
    if "://" in folder:
        return None
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


SPARE_BYTES = 16 * 2**20  # besides checkpoints: Tune's experiment state, result lines, W&B's offline files


def has_room(trial_folder: str | None, size: int) -> bool:
    """Whether a checkpoint of `size` bytes fits in the trial's folder in storage with SPARE_BYTES to spare."""
    free = free_bytes(trial_folder) if trial_folder else None
    return free is None or free >= size + SPARE_BYTES


def recorded_epochs(trial_folder: str) -> set[int] | None:
    """The epochs in the trial's result.json in its folder in storage, or None where it cannot be read. A line that
    does not parse (the last one, cut short by a crash) is passed over.

    The driver writes result.json in its staging folder as each report arrives and syncs it here with each snapshot
    of the sweep's state (every 10 s or more, after every 2 checkpoints of a trial, and at the end, Ctrl-C
    included). A resumed driver starts the trial's result.json from this copy, so an epoch missing here is missing
    from the sweep's record too."""
    results = stored_results(*_fs(trial_folder))
    return None if results is None else {r["epoch"] for r in results if "epoch" in r}


def stored_results(fs: pyarrow.fs.FileSystem, trial_path: str) -> list[dict[str, Any]] | None:
    """The reports in result.json under `trial_path` on `fs`, oldest first (a line that does not parse passed
    over); None where the file cannot be read (a trial that never reported, or one not synced yet)."""
    try:
        with fs.open_input_stream(f"{trial_path}/{RESULT_FILE}") as f:
            return json_lines(f.read().decode(errors="replace"))
    except OSError:  # FileNotFoundError included
        return None


def repair_results(fs: pyarrow.fs.FileSystem, trial_path: str) -> bool:
    """Make result.json under `trial_path` on `fs` end on a whole line before anything is appended to it: a line that
    does not parse (cut short by a full disk, a copy cut short, a driver killed as it wrote) is dropped, or, where a
    writer went on after the cut without a newline, replaced by the whole report that follows the cut text; a last
    line without its newline gets one. Tune's driver appends a resumed trial's reports to this file as it is (its
    JsonLoggerCallback copies it from storage when the trial starts): a cut line left in it would swallow the next
    report. Says so in one line on stderr; returns whether the file was changed."""
    path = f"{trial_path}/{RESULT_FILE}"
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode(errors="replace")
    except OSError:  # none yet (FileNotFoundError included), or unreadable: nothing to append to it
        return False
    kept: list[str] = []
    cut: list[int] = []
    for number, line in enumerate(text.split("\n"), 1):
        try:
            whole = isinstance(json.loads(line), dict)
        except ValueError:
            whole = False
        if whole:
            kept.append(line)
        elif line.strip():
            cut.append(number)
            kept.extend(json.dumps(r) for r in json_lines(line))  # the report appended to a cut one, if any
    if not cut and (not text or text.endswith("\n")):
        return False
    repaired = "".join(f"{line}\n" for line in kept).encode()
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        write_atomic(path, lambda f: f.write(repaired))
    else:
        with fs.open_output_stream(path) as f:  # an object store's put is atomic: readers see the old or the new
            f.write(repaired)
    where = path if isinstance(fs, pyarrow.fs.LocalFileSystem) else f"{fs.type_name}://{path}"
    said = (f"{cut_lines(cut, len(text.splitlines()))} (cut short): the cut text dropped" if cut
            else "its last line had no newline; ended it")
    print(f"gensweep: {where}: {said}, so that the resumed trial's reports start on a line of their own",
          file=sys.stderr, flush=True)
    return True


def cut_lines(numbers: list[int], total: int) -> str:
    """Which lines of a file of `total` lines do not parse, in words: `line 7 of 7 does not parse`."""
    shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    return f"line {shown} of {total} does not parse" if len(numbers) == 1 else f"lines {shown} of {total} do not parse"


def folder_reports(trial_folder: str) -> list[dict[str, Any]]:
    """What the trial's folder holds of its reports besides result.json, for a result.json cut short: Tune's
    progress.csv (a row a report, numbers as numbers; only the first report's columns, and a row cut short is
    passed over), then the reports its checkpoints carry (whole, as they were reported; the last epoch of a trial
    always has a checkpoint). Either may be missing: then what the other holds."""
    fs, root = _fs(trial_folder)
    rows: list[dict[str, Any]] = []
    try:
        with fs.open_input_stream(f"{root}/{PROGRESS_FILE}") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines.pop()  # cut short
    for row in csv.DictReader(io.StringIO("".join(lines))):
        if None not in row and None not in row.values():  # a row with more or fewer cells than the header
            rows.append({k: _cell(v) for k, v in row.items() if v != ""})
    carried: list[dict[str, Any]] = []
    newest_state(trial_folder, None, carried)
    return rows + carried


def _cell(text: str) -> Any:
    """A progress.csv cell as the report had it: Tune writes str() of each value."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


# Set by a driver that resumes a sweep (sweeps/driver.py): its trials' records start from their files in storage.
resumed_driver = False


@clocked
class TrialEndRecorder(tune.Callback):
    """Driver side: records in each trial's folder that it ended (completed, stopped by ASHA, diverged), at once,
    so a resumed sweep never trains it again even if Tune's saved state still lists it as running."""

    def __init__(self, sweep_folder: str):
        self.sweep_folder = sweep_folder

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        record_end(f"{self.sweep_folder}/{trial_dirname(trial.config['model_name'], trial.trial_id)}",
                   {"epoch": last.get("epoch"), "diverged": last.get("diverged", 0)})

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        """A trial that starts again from a checkpoint (after --resume, or a retry) has its result.json in storage
        repaired (repair_results) before Tune's JsonLoggerCallback, one of Tune's default callbacks and so called
        after the sweep's own, copies it to the driver and appends to it. A trial without a checkpoint gets no copy:
        Tune starts its file anew."""
        if trial.storage is None or trial.checkpoint is None:
            return
        fs, path = trial.storage.storage_filesystem, trial.storage.trial_fs_path
        started = self.__dict__.setdefault("started", set())  # (absent from a recorder pickled by an older gensweep)
        try:
            if resumed_driver and trial.trial_id not in started and \
                    fs.get_file_info(f"{path}/{RESULT_FILE}").type == pyarrow.fs.FileType.NotFound:
                # A resumed driver starts the trial's record from this file, and a full disk or a kill left none:
                # the record is empty, so an empty file says so, and the trial reports again what its checkpoints
                # carry (trainable.replay) instead of leaving those epochs out for good.
                with fs.open_output_stream(f"{path}/{RESULT_FILE}"):
                    pass
            started.add(trial.trial_id)
            repair_results(fs, path)
        except Exception as e:  # noqa: BLE001 - a bucket that refuses it: Tune appends as before, the sweep goes on
            print(f"gensweep: result.json of trial {trial.trial_id} cannot be repaired ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
