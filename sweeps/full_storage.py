"""A sweep's storage filling up: stop the sweep as Ctrl-C does (state saved, trials resumable) while there is still
room for Tune's state and a checkpoint, instead of letting every trial fail on `No space left on device` and Tune
cut its own state files short.

Local storage only: a bucket does not fill up, and its free space cannot be asked.
"""
from __future__ import annotations

import errno
import signal
from pathlib import Path

from ray import tune

from trainables.checkpoints import SPARE_BYTES, folder_bytes, free_bytes, trial_dirname
from trainables.driver_clock import clocked

MiB = 2**20

full_message: str | None = None  # set in the driver when the storage stopped the sweep; read by sweeps/cli.py


def is_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the disk is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe(folder: str, needed: int) -> str:
    free = free_bytes(folder)
    return (f"the storage of {folder} is full ({(free or 0) / MiB:.0f} MiB free, a trial's checkpoint and Tune's "
            f"state need {needed / MiB:.0f} MiB)")


@clocked
class StorageWatch(tune.Callback):
    """Driver side: after each result (and each trial failure), stop the sweep when the free space left is less than
    twice the largest checkpoint seen plus a margin: the trials still running each write one more checkpoint before
    they stop. Stopping goes through Tune's own Ctrl-C handling (SIGINT to the driver), so the trials stay
    unfinished and `--resume` continues them once space is freed."""

    def __init__(self, sweep_folder: str):
        self.sweep_folder = sweep_folder
        self.largest_checkpoint = 0

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("checkpointed"):
            folder = Path(self.sweep_folder, trial_dirname(trial.config.get("model_name", ""), trial.trial_id))
            newest = max(folder.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime, default=None)
            if newest is not None:
                self.largest_checkpoint = max(self.largest_checkpoint, folder_bytes(newest))
        self.check()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.check()

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.check()  # before Tune spends a retry of the trial on a full disk

    def check(self) -> None:
        global full_message
        needed = 2 * self.largest_checkpoint + SPARE_BYTES
        free = free_bytes(self.sweep_folder)
        if full_message is None and free is not None and free < needed:
            full_message = describe(self.sweep_folder, needed)
            print(f"gensweep: {full_message}: stopping the sweep as Ctrl-C does", flush=True)
            signal.raise_signal(signal.SIGINT)
