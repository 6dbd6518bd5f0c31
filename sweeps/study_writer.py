"""The driver's writer of the sweep's Optuna study (sweeps/study.py): each trial that ends goes into optuna.db once,
as one Optuna trial added in one SQLite transaction, on a thread of its own.

Tune's event loop, which starts trials and processes their results, only hands the ending trial's names and last
result to a queue; the thread reads that trial's own result.json (never another trial's) and adds it. So a trial end
costs the driver the same at 8 trials as at 10,000. What the study promises stays:
- a driver killed mid-write leaves a study that opens: SQLite rolls the cut transaction back when the file is next
  opened, and `--resume` rebuilds the study whole from every stored trial before this writer goes on;
- a study that cannot be written costs one warning line (sweeps/study.py save_study), never the sweep;
- optuna-dashboard reads optuna.db as trials are added;
- a missing or damaged optuna.db is rebuilt whole once, from the stored trials, then written trial by trial again.
On a URI (s3://, gs://) the study is kept in a local file, written trial by trial, and uploaded whole at most every
UPLOAD_EVERY_S and when the sweep ends (an object store has no transactions to append in).
"""
from __future__ import annotations

import queue
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ray import tune

from sweeps import storage as sweep_storage
from sweeps import study
from sweeps.spec import SweepSpec, UsageError
from sweeps.sweep_results import is_number, sweep_trials, trial_status, tune_trial
from trainables.driver_clock import clocked

UPLOAD_EVERY_S = 60.0
DRAIN_TIMEOUT_S = 120.0  # how long the end of a sweep waits for trials still queued


@clocked
class StudyWriter(tune.Callback):
    """A Tune callback that feeds ended trials to a writer thread. Pickled into Tune's tuner.pkl, so it keeps only
    names (the spec is read back from the sweep's file) and comes back on --resume; the thread starts with the
    sweep (or with the first trial that ends, where Tune did not call `setup`)."""

    running: weakref.WeakSet = weakref.WeakSet()  # writers whose thread runs: the driver drains them after fit

    def __init__(self, storage: str, name: str):
        self.storage, self.name = storage, name
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def close_all(cls, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Every writer of this process, drained: the one a resumed sweep's Tune unpickled included."""
        for writer in list(cls.running):
            writer.close(timeout_s)

    def __getstate__(self) -> dict[str, Any]:
        return {"storage": self.storage, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["storage"], state["name"])

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        """The thread starts as the sweep does and opens the study (makes it, on a new sweep) before any trial
        ends: SQLAlchemy's and alembic's imports and the study's tables take about 1.4 s of the driver's CPU, which
        at the first trial end slowed the trials starting then, and Tune's event loop (2-core CPU machine)."""
        self._start()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.put(trial, "TERMINATED")  # Tune calls this just before it marks the trial TERMINATED

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.put(trial, "ERROR")

    def on_experiment_end(self, trials: list, **info) -> None:
        self.close()

    def put(self, trial, status: str) -> None:
        """The ending trial, as names and a copy of its last result: the thread touches no Tune object."""
        if trial.storage is None or not trial.storage.trial_dir_name:
            return  # never started: nothing to write
        self._start()
        self._queue.put((trial.storage.trial_dir_name, trial.trial_id, dict(trial.config),
                         dict(trial.last_result or {}), status))

    def _start(self) -> None:
        if self._thread is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._write_all, name="gensweep-study-writer", daemon=True)
            self._thread.start()
            StudyWriter.running.add(self)

    def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Write what is queued, then stop the thread (the end of the sweep; a new trial end starts it again)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._thread = self._queue = None
        StudyWriter.running.discard(self)

    def _write_all(self) -> None:
        appender, failed, item = None, False, ()  # () first: the study opened before any trial has ended
        while item is not None:
            if not failed:  # once failed, said once; `gensweep study` writes it from the trials' results
                try:
                    appender = appender or StudyAppender(self.storage, SweepSpec.load(self.storage, self.name))
                    if item:
                        appender.add(*item)
                except UsageError:  # the sweep's file is gone: nothing to write against
                    pass
                except Exception as e:  # noqa: BLE001 - a full disk, a read-only folder, a bucket: one warning
                    study.warn_unwritable(self.storage, self.name, e)
                    appender, failed = None, True
            item = self._queue.get()
        if appender is not None:
            appender.close()


class StudyAppender:
    """The sweep's study open for appending: made (or rebuilt whole from the stored trials) when it is missing,
    damaged or not this sweep's, then one `add_trial` per ended trial."""

    def __init__(self, storage: str, spec: SweepSpec):
        import optuna

        self.storage, self.spec = storage, spec
        self.folder = sweep_storage.join(storage, spec.name)
        self.uri = sweep_storage.is_uri(storage)
        if self.uri:
            self._tmp = tempfile.TemporaryDirectory(prefix="gensweep-study-")
            self.path = Path(self._tmp.name, study.STUDY_FILE)
            self.uploaded_at = 0.0
        else:
            self.path = Path(self.folder, study.STUDY_FILE)
        self.study = self._open(optuna) or self._rebuild(optuna)

    def _open(self, optuna):
        """The study in the file, or None when there is none to append to (the file read from the bucket first)."""
        if self.uri:
            text = sweep_storage.read_bytes(sweep_storage.join(self.folder, study.STUDY_FILE))
            if text is None:
                return None
            self.path.write_bytes(text)
        if not self.path.exists():
            return None
        try:
            with study.quiet_optuna():
                return optuna.load_study(study_name=self.spec.name, storage=self._rdb(optuna))
        except Exception:  # noqa: BLE001 - not a database, or another study: rebuilt
            return None

    def _rebuild(self, optuna):
        """The whole study from the stored trials that have ended, put in place atomically; then opened."""
        try:
            ended = study.ended(sweep_trials(self.storage, self.spec))
        except UsageError:  # no trial has reported yet
            ended = []
        study.write_study(self.storage, self.spec, ended, local=self.path if self.uri else None)
        with study.quiet_optuna():
            return optuna.load_study(study_name=self.spec.name, storage=self._rdb(optuna))

    def _rdb(self, optuna):
        import sqlalchemy.pool

        # NullPool: no connection stays open on the file between trials (a rebuild may replace it)
        return optuna.storages.RDBStorage(f"sqlite:///{self.path}",
                                          engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})

    def add(self, dirname: str, trial_id: str, config: dict[str, Any], last: dict[str, Any], status: str) -> None:
        t = tune_trial(_Ended(dirname, trial_id, config, last, status), self.folder, self.spec)
        if _epoch(last) > _epoch(t["last"]):  # result.json in storage can lag the driver's last result
            t["last"] = last
        t["status"] = trial_status(t["last"], self.spec.max_epochs, status, self.spec.milestones)
        [frozen] = study.study_trials(self.storage, self.spec, [t])
        self.study.add_trial(frozen)
        if self.uri and time.monotonic() - self.uploaded_at > UPLOAD_EVERY_S:
            self.upload()

    def upload(self) -> None:
        study.upload(self.path, sweep_storage.join(self.folder, study.STUDY_FILE))
        self.uploaded_at = time.monotonic()

    def close(self) -> None:
        if self.uri:
            self.upload()
            self._tmp.cleanup()


class _Ended:
    """What tune_trial reads of a Tune trial, from the names the callback queued."""

    def __init__(self, dirname: str, trial_id: str, config: dict, last: dict, status: str):
        self.trial_id, self.config, self.last_result, self.status = trial_id, config, last, status
        self.storage = type("Storage", (), {"trial_dir_name": dirname})()


def _epoch(result: dict[str, Any]) -> float:
    return result["epoch"] if is_number(result.get("epoch")) else 0
