"""A sweep's Optuna study on disk: `<sweep>/optuna.db` (SQLite), for optuna-dashboard and optuna.load_study.

    optuna-dashboard sqlite:///PATH/optuna.db
    optuna.load_study(study_name=NAME, storage="sqlite:///PATH/optuna.db")
    gensweep study --name NAME                 # (re)write it from the trials' results, e.g. after a full disk

Tune's own Optuna study lives pickled inside its searcher; this one is for people and tools. It is never edited
trial by trial: `write_study` builds it whole from the sweep's stored trials (the rows the leaderboard prints) in a
temporary file beside optuna.db, then copies that into optuna.db with SQLite's backup API in one transaction. So a
driver killed mid-write leaves the previous study (SQLite rolls the cut transaction back when the file is next
opened), a reader that has the file open (optuna-dashboard on a running sweep) sees the new trials, and a resumed
sweep's study is right whatever the previous driver managed to write. The driver calls it as each trial ends
(sweeps/study_writer.py, a Tune callback) and once after the sweep; a study that cannot be written costs one
warning line, never the sweep.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps import storage as sweep_storage
from sweeps.cli import script
from sweeps.distributions import direction, quiet_optuna, search_distributions, within
from sweeps.errors import CommandFailed
from sweeps.full_storage import is_full
from sweeps.rows import trial_row
from sweeps.spec import SweepSpec, UsageError
from sweeps.sweep_results import (
    ENDED_EARLY,
    ERROR_FILE,
    is_number,
    resolve_sweep,
    sweep_trials,
)

STUDY_FILE = "optuna.db"
STATES = {"completed": TrialState.COMPLETE, "stopped (ASHA)": TrialState.PRUNED, "diverged": TrialState.FAIL,
          "error": TrialState.FAIL, ENDED_EARLY: TrialState.FAIL}  # any other status (not ended yet): RUNNING


def ended(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored trials that have ended (the ones the driver's writer adds, each once, as they end)."""
    return [t for t in trials if t["status"] in STATES]


def write_study(storage: str, spec: SweepSpec, trials: list[dict[str, Any]] | None = None,
                local: Path | None = None) -> str:
    """Build the sweep's study from its stored trials (sweep_results.sweep_trials, read here unless given) and put
    it in place of `<sweep>/optuna.db` (atomically; on a URI, built locally and uploaded in one put). Returns where
    it went; raises whatever the storage raises, and UsageError when no trial has reported yet. On a URI, `local`
    keeps the built file (the driver's writer appends to it)."""
    trials = sweep_trials(storage, spec) if trials is None else trials
    frozen = study_trials(storage, spec, trials)
    target = sweep_storage.join(storage, spec.name, STUDY_FILE)
    if sweep_storage.is_uri(storage):
        with tempfile.TemporaryDirectory() as tmp:
            built = Path(tmp, STUDY_FILE)
            build_study(built, spec, frozen)
            upload(built, target)
            if local is not None:
                os.replace(built, local)
        return target
    remove_stale_temporaries(Path(target).parent)
    fd, tmp = tempfile.mkstemp(dir=Path(target).parent, prefix=f".{STUDY_FILE}.", suffix=".tmp")
    os.close(fd)  # SQLite opens it by name (an empty file is an empty database)
    try:
        build_study(Path(tmp), spec, frozen)
        put_in_place(Path(tmp), Path(target))
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def remove_stale_temporaries(folder: Path) -> None:
    """The temporary studies (and their journals) of a write that a killed driver cut short. One driver writes a
    sweep's study at a time (sweeps/storage.py SweepLock), so every one found before a write is stale."""
    for path in folder.glob(f".{STUDY_FILE}.*.tmp*"):
        path.unlink(missing_ok=True)


def put_in_place(new: Path, target: Path) -> None:
    """The study at `new` as `target`'s contents, atomically. Into an existing database, SQLite's backup, all pages
    in one step: one write transaction, so readers (and a driver killed half-way) see the old study or the new one,
    and a reader keeps its open file. A first study, or a file that is no database (cut short, garbage), is
    replaced whole by a rename instead (a reader of that file sees it only once it opens it again)."""
    if target.exists():
        try:
            copy_database(new, target)
            return
        except sqlite3.DatabaseError:  # not a database; or locked, or full: the rename needs no room or lock
            Path(f"{target}-journal").unlink(missing_ok=True)  # a journal of the old file must not touch the new
    os.replace(new, target)


LOCK_WAIT_S = 20.0  # how long a reader's lock on optuna.db may hold up the copy before the rename replaces it
BUSY, LOCKED = 5, 6  # SQLite's result codes for a step that waited on another connection's lock


def copy_database(source: Path, target: Path, pages: int = -1, progress=None) -> None:
    """sqlite3's backup of `source` into `target` (pages=-1: every page in one step, one transaction). Python
    retries a step that a lock holds up for ever: past LOCK_WAIT_S it gives up (sqlite3.OperationalError)."""
    deadline = time.monotonic() + LOCK_WAIT_S

    def step(status: int, remaining: int, total: int) -> None:
        if status in (BUSY, LOCKED) and time.monotonic() > deadline:
            raise sqlite3.OperationalError(f"{target} stayed locked for {LOCK_WAIT_S:g} s")
        if progress is not None:
            progress(status, remaining, total)

    with contextlib.closing(sqlite3.connect(source)) as src, \
            contextlib.closing(sqlite3.connect(target, timeout=LOCK_WAIT_S / 4)) as dst:
        src.backup(dst, pages=pages, progress=step)


def build_study(path: Path, spec: SweepSpec, frozen: list[FrozenTrial]) -> optuna.Study:
    """A new SQLite study at `path`: the sweep's name, a direction per objective, the trials in Tune's order."""
    import sqlalchemy.pool

    # NullPool: no connection stays open on the file after it is renamed or uploaded
    rdb = optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    with quiet_optuna():
        study = optuna.create_study(storage=rdb, study_name=spec.name,
                                    directions=[direction(spec)] * len(spec.objectives))
        study.set_metric_names(list(spec.objectives))  # what optuna-dashboard labels the values with
    for key, value in {"space": spec.space, "preset": spec.preset, "milestones": list(spec.milestones),
                       "max_epochs": spec.max_epochs, "source": "gensweep (Ray Tune + Optuna TPE + ASHA)"}.items():
        study.set_user_attr(key, value)
    study.add_trials(frozen)
    return study


def study_trials(storage: str, spec: SweepSpec, trials: list[dict[str, Any]]) -> list[FrozenTrial]:
    """The sweep's stored trials (sweep_results.sweep_trials) as Optuna trials: searched values and distributions,
    objective values as the leaderboard ranks them, the ranking metric at each milestone as intermediate values
    (FIDs of several sample counts as the user attr `milestones` instead), and the state: completed COMPLETE,
    stopped by ASHA PRUNED (its value is its last rung's, as Optuna gives a pruned trial), errored, diverged or
    ended early FAIL with the reason as user attr `error`, not ended RUNNING."""
    distributions = search_distributions(spec)
    frozen = []
    for t in trials:
        row = trial_row(t, spec)
        params = {k: v for k, v in row["params"].items() if k in distributions and within(distributions[k], v)}
        at_milestones = milestone_values([*t["history"], t["last"]], spec.metric, spec.milestones)
        attrs = {"tune_trial_id": t["id"], "trial": t["trial"], "status": row["status"], "epochs": row["epochs"],
                 **{f"{m}_n": o["n"] for m, o in row["objectives"].items() if o["n"]}}
        intermediate = {e: v for e, (v, _) in at_milestones.items()}
        if len({n for _, n in at_milestones.values()}) > 1:
            # FIDs of the ladder's different sample counts: one curve would draw the change of n as training (a
            # jump at every rung); each milestone's value goes beside its n instead
            attrs["milestones"] = [{"epoch": e, spec.metric: v, "n": n} for e, (v, n) in at_milestones.items()]
            intermediate = {}
        state = STATES.get(row["status"], TrialState.RUNNING)
        values = [row["objectives"][m]["value"] for m in spec.objectives]
        if state == TrialState.COMPLETE and not all(is_number(v) for v in values):
            state, attrs["error"] = TrialState.FAIL, f"completed without {', '.join(spec.objectives)}"
        if state == TrialState.FAIL:
            attrs.setdefault("error", failure_reason(storage, spec, t, row))
        value = None
        if state == TrialState.PRUNED and len(spec.objectives) == 1 and at_milestones:
            value = at_milestones[max(at_milestones)][0]
        frozen.append(optuna.trial.create_trial(
            state=state, params=params, distributions={k: distributions[k] for k in params},
            values=[float(v) for v in values] if state == TrialState.COMPLETE else None, value=value,
            intermediate_values=intermediate, user_attrs=attrs))
    return frozen


def milestone_values(results: list[dict[str, Any]], metric: str, epochs) -> dict[int, tuple[float, int | None]]:
    """(value, FID sample count or None) of `metric` at each of `epochs` a trial reported it: the last such result
    (a resumed trial reports an epoch again)."""
    out = {}
    for r in results:
        if r.get("epoch") in epochs and is_number(r.get(metric)):
            n = r.get(f"{metric}_n")
            out[int(r["epoch"])] = (float(r[metric]), int(n) if is_number(n) else None)
    return out


def failure_reason(storage: str, spec: SweepSpec, t: dict[str, Any], row: dict[str, Any]) -> str:
    if row["status"] == "diverged":
        return f"diverged: {row['error'] or 'a non-finite loss'}"
    if row["status"] == ENDED_EARLY:
        return (f"ended at epoch {row['epochs']} of {spec.max_epochs}, which is none of ASHA's milestones "
                f"{list(spec.milestones)}")
    # Tune's error.txt ends with the exception's own line
    text = sweep_storage.read_text(sweep_storage.join(storage, spec.name, t["trial"], ERROR_FILE)) or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return row["error"] or (lines[-1] if lines else "Tune reported an error")


def upload(local: Path, target: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(target)
    with fs.open_output_stream(path) as f:  # an object store's put is atomic: readers see the old or the new
        f.write(local.read_bytes())


# ------------------------------------------------------------------------------------------- in the driver

_warned: set[str] = set()  # sweeps already warned about: one line per sweep, however many trials end


def save_study(storage: str, spec: SweepSpec, trials: list[dict[str, Any]] | None = None,
               ended_only: bool = False) -> bool:
    """write_study (of the trials that ended only, with `ended_only`), or one warning line (once per sweep) when
    the study cannot be written: a full disk, a read-only folder, a bucket that refuses it. The sweep goes on
    either way."""
    try:
        trials = sweep_trials(storage, spec) if trials is None else trials
        write_study(storage, spec, ended(trials) if ended_only else trials)
        return True
    except UsageError:  # no trial has reported yet: nothing to write
        return False
    except Exception as e:  # noqa: BLE001 - OSError, sqlite3/SQLAlchemy errors, pyarrow's...: one line, whatever
        warn_unwritable(storage, spec.name, e)
        return False


def warn_unwritable(storage: str, name: str, e: Exception) -> None:
    """One warning line, once per sweep, for a study that cannot be written."""
    key = sweep_storage.join(storage, name)
    if key in _warned:
        return
    _warned.add(key)
    text = (str(e).strip().splitlines() or [""])[0]
    # a full disk in words (SQLite's "database or disk is full" too): full_storage stops the sweep and names the
    # storage; the driver's output never shows "No space left on device"
    reason = "the storage is full" if is_full(e) or "disk is full" in text else f"{type(e).__name__}: {text}"
    print(f"gensweep: warning: the Optuna study {sweep_storage.join(key, STUDY_FILE)} cannot be written "
          f"({reason}); the sweep goes on, and `python sweeps/study.py --name {name} --storage-path {storage}` "
          f"writes it later from the trials' results", file=sys.stderr, flush=True)


def command(args) -> int:
    storage, spec = resolve_sweep(args)
    try:
        path = write_study(storage, spec)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a read-only folder, a full disk, a bucket: one line
        raise CommandFailed(f"{sweep_storage.join(storage, spec.name, STUDY_FILE)} cannot be written "
                            f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})") from None
    print(path)
    if not sweep_storage.is_uri(path):
        print(f"open it with: optuna-dashboard sqlite:///{path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script("study", argv, prog="study.py")


def __getattr__(name: str):
    # Sweeps started before the writer had a module of its own pickled it as sweeps.study.StudyWriter in their
    # tuner.pkl: --resume unpickles it from here
    if name == "StudyWriter":
        from sweeps.study_writer import StudyWriter

        return StudyWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
