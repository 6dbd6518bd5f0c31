"""One W&B run per trial, opened and fed by a Ray Tune callback in the driver process, on one worker thread.

Why the driver: ASHA stops a trial by killing its actor right after a report, so a run opened inside the trial would
never be finished. The driver sees every trial start, result, checkpoint and end, and ends each run itself.
W&B (>= 0.19) holds several live runs in one process (`wandb.init(reinit="create_new")`), so no logging actors are
needed.

Why a worker thread: each W&B call (init, log with images, artifact upload, finish) takes from milliseconds to many
seconds, and Tune calls its callbacks in its driver loop: a callback that does the work itself stalls the whole sweep
(Tune warns that `callbacks.on_trial_result` was slow). Here the hooks only submit the work to a one-thread executor
and return; it runs the work in the order submitted, so each run receives its data in the order Tune reported it.

Why a bounded close: at the end of a sweep, and on Ctrl-C, `close()` (called by Tune's `on_experiment_end` and by the
CLI) finishes every open run, waiting at most `timeout_s` seconds in all. Runs that did not finish by then are
abandoned (the work still queued is cancelled): their data is already in W&B's files on disk (`wandb sync` uploads
offline runs), and W&B's own exit hook finishes them when the process ends.

Only public APIs: Ray's `ray.tune.Callback` hooks, the `ray.tune.Checkpoint` and Trial objects they receive, and W&B's
`wandb.setup/init/Image/Artifact` and Run methods (no private Ray classes, no Ray actors).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import logging
import numbers
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from genmodels.config import ConfigError
from genmodels.registry import trial_config
from trainables.checkpoints import IMAGES_DIR
from trainables.driver_clock import clocked

logger = logging.getLogger(__name__)

# Tune's bookkeeping in every result: not metrics of the model. (training_iteration and time_total_s stay: they chart.)
TUNE_KEYS = frozenset({
    "done", "should_checkpoint", "trial_id", "experiment_tag", "config", "date", "timestamp", "pid", "hostname",
    "node_ip", "time_this_iter_s", "time_since_restore", "iterations_since_restore", "timesteps_since_restore",
    "timesteps_total", "episodes_total", "checkpoint_dir_name", "warmup_time",
})


def artifact_name(trial_name: str) -> str:
    # W&B artifact names allow letters, digits, '-', '_' and '.'; trial names carry '=' and ','.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", trial_name)[:100] + "-model"


def run_id(group: str, trial_id: str) -> str:
    """The W&B run id of a trial: the same for the same sweep and trial, so a resumed sweep continues its runs."""
    rid = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{group}-{trial_id}")
    if len(rid) > 64:  # long sweep names: keep it readable, and unique through a hash of the whole
        rid = rid[:55] + "-" + hashlib.sha1(f"{group}/{trial_id}".encode()).hexdigest()[:8]
    return rid


def resolved_config(config: dict[str, Any]) -> dict[str, Any]:
    """Every field the trial runs with, defaults included (W&B's table then compares trials on all of them). A
    trial that evaluates a checkpoint runs with that checkpoint's settings: its own keys are what it changes."""
    if config.get("checkpoint"):
        return dict(config)
    try:
        return {**config, **trial_config(config).flat()}
    except (ConfigError, KeyError):  # not a gensweep trial config: log it as it is
        return dict(config)


def loggable_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a Tune result (bools as ints), without Tune's bookkeeping, strings or nested dicts."""
    import numpy as np

    metrics = {}
    for key, value in result.items():
        if key in TUNE_KEYS:
            continue
        if isinstance(value, (bool, np.bool_)):  # numpy bools are not numbers.Number
            metrics[key] = int(value)
        elif isinstance(value, numbers.Real):
            metrics[key] = value
    return metrics


def result_step(result: dict[str, Any]) -> int | None:
    step = result.get("epoch", result.get("training_iteration"))
    return int(step) if isinstance(step, numbers.Real) and not isinstance(step, bool) else None


@clocked
class WandbLogger(Callback):
    """Logs every trial of a Tune sweep as one W&B run: results, checkpoint images, a final `model` artifact.

    Args:
        project, entity: the W&B project and entity (None: the user's default entity).
        group: the sweep's name; the runs' group, and part of their ids.
        tags: tags of every run (duplicates dropped, order kept).
        max_epochs: a trial whose last result reaches this epoch (and did not diverge or fail) is complete, and its
            final checkpoint is logged as a model artifact.
        log_artifacts: log that artifact.
        metric: the sweep's ranking metric; it and its `best_` twin are charted against the epoch.
    """

    _live: "weakref.WeakSet[WandbLogger]" = weakref.WeakSet()

    def __init__(self, *, project: str, entity: str | None, group: str, tags: list[str], max_epochs: int,
                 log_artifacts: bool = True, metric: str | None = None):
        self.project, self.entity, self.group = project, entity, group
        self.tags = list(dict.fromkeys(str(t)[:64] for t in tags if t))
        self.max_epochs, self.log_artifacts, self.metric = max_epochs, log_artifacts, metric
        self._reset_runtime()

    # Tune pickles its callbacks with the tuner's state (Tuner.restore brings them back): no executor or lock.
    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("project", "entity", "group", "tags", "max_epochs", "log_artifacts", "metric")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first hook
        self._last: concurrent.futures.Future | None = None  # the work submitted last: done when all of it is
        self._lock = threading.Lock()
        self._open: dict[str, Any] = {}  # trial_id -> Trial, for runs started and not yet ended (driver side)
        self._last_step: dict[str, int | None] = {}  # trial_id -> step of its last submitted result
        self._unfinished: set[str] = set()  # trial_ids whose run the worker has not finished yet
        self._deadline: float | None = None  # set by the first close()
        self._gave_up = False  # close() stopped waiting and cancelled the work still queued
        # Worker-thread state only.
        self._runs: dict[str, Any] = {}  # trial_id -> wandb Run
        self._steps: dict[str, int] = {}  # trial_id -> last step logged
        self._warned: set[str] = set()

    # ---- Tune's hooks: each only submits -------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        key = trial.trial_id
        if key in self._open or self._deadline is not None:
            return  # a trial restarted after a failure continues its run
        self._open[key] = trial
        with self._lock:
            self._unfinished.add(key)
        init_kwargs = dict(
            project=self.project, entity=self.entity, group=self.group, job_type="trial", name=str(trial),
            id=run_id(self.group, key), resume="allow", tags=list(self.tags), config=resolved_config(trial.config),
        )
        local_dir = self._local_trial_dir(trial)
        if local_dir:
            init_kwargs["dir"] = local_dir
        self._submit(self._start_run, key, init_kwargs)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        key = trial.trial_id
        if key not in self._open:
            return
        step = result_step(result)
        self._last_step[key] = step
        self._submit(self._log_result, key, loggable_metrics(result), step)
        if isinstance(result.get("graph_status"), str):  # how the step ran on CUDA: a string, so summary only
            self._submit(self._summarize, key, {"graph_status": result["graph_status"]})

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        # The files are read on the worker: only the checkpoint's path and filesystem are captured here.
        key = trial.trial_id
        if key in self._open and checkpoint is not None:
            self._submit(self._log_images, key, checkpoint, self._last_step.get(key))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end_trial(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end_trial(trial, failed=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.close()

    # ---- closing --------------------------------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> int:
        """Finish every open run and stop the worker, waiting at most `timeout_s` seconds, in total over all calls
        (a later call waits only what is left of the first's time; after a Ctrl-C interrupted a wait, none).

        Returns how many runs were abandoned unfinished (0 when all finished). Safe to call any number of times.
        """
        with self._lock:
            first = self._deadline is None
            if first:
                self._deadline = time.monotonic() + timeout_s
            deadline = min(self._deadline, time.monotonic() + timeout_s)
        if first:
            for trial in list(self._open.values()):  # interrupted sweeps: trials still running or paused
                self._end_trial(trial, failed=getattr(trial, "status", None) == "ERROR", closing=True)
        if self._executor is not None and not self._gave_up:
            try:
                done, _ = concurrent.futures.wait([self._last], timeout=max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting now, here and in any later close()
                self._give_up()
                raise
            if not done:
                self._give_up()
            self._executor.shutdown(wait=False)  # no more work: its thread ends once idle
        with self._lock:
            return len(self._unfinished)

    def _give_up(self) -> None:
        self._gave_up = True
        self._executor.shutdown(wait=False, cancel_futures=True)  # the call running now, if any, ends on its own
        with self._lock:
            abandoned = len(self._unfinished)
        if abandoned:
            logger.warning("W&B: gave up waiting for %d run(s) to finish; what they logged is in their files on "
                           "disk (`wandb sync` uploads offline runs)", abandoned)

    @classmethod
    def close_all(cls, timeout_s: float = 10.0) -> int:
        """close() every WandbLogger of this process (Tuner.restore runs a copy of the callback that it unpickled)."""
        deadline = time.monotonic() + timeout_s
        return sum(cb.close(max(0.0, deadline - time.monotonic())) for cb in list(cls._live))

    # ---- driver-side helpers --------------------------------------------------------------------------------------

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-logger")
            WandbLogger._live.add(self)
        self._last = self._executor.submit(self._call, fn, *args)

    def _end_trial(self, trial, failed: bool, closing: bool = False) -> None:
        key = trial.trial_id
        if key not in self._open or (self._deadline is not None and not closing):
            return
        del self._open[key]
        last = dict(trial.last_result or {})
        diverged = bool(last.get("diverged"))
        epoch = last.get("epoch", 0)
        complete = not failed and not diverged and isinstance(epoch, numbers.Real) and epoch >= self.max_epochs
        checkpoint = trial.checkpoint if complete and self.log_artifacts else None
        download_dir = os.path.join(trial.local_path, "final_model") if checkpoint is not None else None
        self._submit(self._end_run, key, str(trial), failed, diverged, last.get("error"), checkpoint, download_dir)

    @staticmethod
    def _local_trial_dir(trial) -> str | None:
        """The trial's folder when storage is local: W&B files straight in there (they reach no staging copy)."""
        import pyarrow.fs

        try:
            if isinstance(trial.storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
                return trial.path
        except AttributeError:
            pass
        return None

    # ---- the worker thread: all W&B calls ---------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # one failed call must not stop the logging of the others
            self._warn_once(fn.__name__, f"W&B logging failed in {fn.__name__}: {type(e).__name__}: {e}")

    def _warn_once(self, kind: str, message: str) -> None:
        logger.log(logging.DEBUG if kind in self._warned else logging.WARNING, message)
        self._warned.add(kind)

    def _start_run(self, key: str, init_kwargs: dict[str, Any]) -> None:
        import wandb

        wandb.setup(wandb.Settings(silent=True))  # also quiets messages such as "Adding directory to artifact"
        if init_kwargs.get("dir"):
            os.makedirs(init_kwargs["dir"], exist_ok=True)
        try:
            run = wandb.init(**init_kwargs, reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        except Exception:
            with self._lock:
                self._unfinished.discard(key)
            raise
        if self.metric:
            for name in (self.metric, f"best_{self.metric}"):
                run.define_metric(name, step_metric="epoch")
        self._runs[key] = run

    def _log_result(self, key: str, metrics: dict[str, Any], step: int | None) -> None:
        run = self._runs.get(key)
        if run is not None and metrics and self._step_ok(key, step):
            self._log_to_run(run, metrics, step)

    def _summarize(self, key: str, values: dict[str, Any]) -> None:
        run = self._runs.get(key)
        if run is not None:
            run.summary.update(values)

    def _log_images(self, key: str, checkpoint, step: int | None) -> None:
        run = self._runs.get(key)
        if run is None or not self._step_ok(key, step):
            return
        images = read_checkpoint_images(checkpoint)
        if images:
            self._log_to_run(run, images, step)

    def _step_ok(self, key: str, step: int | None) -> bool:
        """W&B drops (with a warning) data for a step below the run's last; a trial restarted from an older
        checkpoint re-reports epochs its run already has. The same step again merges into that step's row (an
        epoch's result, then that epoch's images)."""
        if step is None:
            return True
        if step < self._steps.get(key, step):
            return False
        self._steps[key] = step
        return True

    def _log_to_run(self, run, data: dict[str, Any], step: int | None) -> None:
        run.log(data, step=step)

    def _end_run(self, key: str, trial_name: str, failed: bool, diverged: bool, diverged_reason: str | None,
                 checkpoint, download_dir: str | None) -> None:
        import wandb

        run = self._runs.pop(key, None)
        try:
            if run is None:
                return
            if diverged:
                run.summary["diverged_reason"] = diverged_reason
            if checkpoint is not None:
                try:
                    artifact = wandb.Artifact(artifact_name(trial_name), type="model")
                    artifact.add_dir(_local_dir(checkpoint, download_dir))
                    run.log_artifact(artifact, aliases=["final"])
                except Exception as e:
                    self._warn_once("artifact", f"W&B: no model artifact for {trial_name}: {type(e).__name__}: {e}")
            run.finish(exit_code=1 if failed else 0)
        finally:
            with self._lock:
                self._unfinished.discard(key)


def read_checkpoint_images(checkpoint) -> dict[str, Any]:
    """The PNG grids stored in a Tune checkpoint (local or cloud storage) as wandb.Image objects."""
    import pyarrow.fs
    import wandb
    from PIL import Image

    if checkpoint is None:
        return {}
    fs, root = checkpoint.filesystem, f"{checkpoint.path}/{IMAGES_DIR}"
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root))
    except (FileNotFoundError, OSError):  # no images, or the checkpoint was already deleted (num_to_keep)
        return {}
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    images = {}
    for info in sorted(infos, key=lambda i: i.path):
        if info.is_file and info.path.endswith(".png"):
            if local:  # W&B copies the PNG as it is: decoding it to re-encode it cost ~70 ms a grid on this thread
                images[Path(info.path).stem] = wandb.Image(info.path)
                continue
            with fs.open_input_file(info.path) as f:
                images[Path(info.path).stem] = wandb.Image(Image.open(io.BytesIO(f.read())).convert("RGB"))
    return images


def _local_dir(checkpoint, download_dir: str | None) -> str:
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(download_dir)
