"""The driver's writer of the sweep's Optuna study (sweeps/study.py): a Tune callback that rewrites it as each trial
ends and when the experiment ends."""
from __future__ import annotations

from typing import Any

from ray import tune

from sweeps import storage as sweep_storage
from sweeps.spec import SweepSpec, UsageError
from sweeps.study import save_study
from sweeps.sweep_results import is_number, trial_status, tune_trial


class StudyWriter(tune.Callback):
    """Driver side: rewrite the sweep's study as each trial ends and when the experiment ends. Pickled into Tune's
    tuner.pkl, so it keeps only names (the spec is read back from the sweep's file) and comes back on --resume."""

    def __init__(self, storage: str, name: str):
        self.storage, self.name = storage, name

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.write(trials, trial, "TERMINATED")  # Tune calls this just before it marks the trial TERMINATED

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.write(trials, trial, "ERROR")

    def on_experiment_end(self, trials: list, **info) -> None:
        self.write(trials)

    def write(self, trials: list, ended=None, status: str = "") -> None:
        try:
            spec = SweepSpec.load(self.storage, self.name)
        except UsageError:
            return
        save_study(self.storage, spec, live_trials(trials, self.storage, spec, ended, status))


def live_trials(trials: list, storage: str, spec: SweepSpec, ended=None, status: str = "") -> list[dict[str, Any]]:
    """The driver's own Tune trials as sweep_results.sweep_trials gives stored ones. Not Tune's saved state: it lags
    seconds behind, and is copied into storage by a thread a read could catch half-way; and the trial ending now
    is not marked as ended yet. A trial not started yet (no folder) is left out."""
    folder = sweep_storage.join(storage, spec.name)
    out = []
    for trial in trials:
        if trial.storage is None or not trial.storage.trial_dir_name:
            continue
        t = tune_trial(trial, folder, spec)
        last = trial.last_result or {}
        if _epoch(last) > _epoch(t["last"]):  # result.json in storage can lag the driver's last result too
            t["last"] = last
        t["status"] = trial_status(t["last"], spec.max_epochs, status if trial is ended else trial.status,
                                   spec.milestones)
        out.append(t)
    return out


def _epoch(result: dict[str, Any]) -> float:
    return result["epoch"] if is_number(result.get("epoch")) else 0
