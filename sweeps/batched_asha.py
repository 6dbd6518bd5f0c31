"""ASHA for `--reproducible` sweeps: the same `--seed` gives the same sweep, whatever the timing.

Two things in an asynchronous sweep depend on which trial happens to finish first: what TPE has seen when it
suggests the next trial, and whom ASHA compares a trial with at a milestone (the trials that reached it before). With
`--reproducible` the sweep runs in batches: Tune's `ConcurrencyLimiter(batch=True)` suggests the next batch of
`--max-concurrent` trials only when every trial of the previous one has ended, and this scheduler cuts a trial at a
milestone against the values recorded there by the trials of earlier batches, never by those of its own batch. Both
then read only what whole earlier batches did, which the seed fixes. With one trial at a time it is ASHA itself.

What it costs: a batch holds its slots until its last trial ends, so the slots its stopped trials leave stay idle
(docs/sweeps.md has the measured figure). Ray Tune offers no deterministic asynchronous scheduler (its HyperBand is
synchronous over whole brackets, which a searcher fills one trial at a time), hence this one.
"""
from __future__ import annotations

import math

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from trainables import checkpoints
from trainables.driver_clock import clocked


def stored_results(trial) -> list[dict]:
    """The trial's own reports in result.json in its folder in storage (none for a trial that has not started):
    what a resumed sweep's scheduler reads again, since Tune does not save the scheduler's rungs."""
    if trial.storage is None:
        return []
    try:
        folder = trial.path  # on trial.storage.storage_filesystem: a local path, or a bucket path for a URI
    except RuntimeError:  # Tune names a new trial's folder when it first starts it
        return []
    return checkpoints.stored_results(trial.storage.storage_filesystem, folder) or []


@clocked
class BatchedASHA(FIFOScheduler):
    """ASHA's rule (stop a trial whose value at a milestone is below the (1 - 1/reduction_factor) quantile of those
    recorded there), with the quantile taken over earlier batches only. Trial k (in the order Tune adds them, which a
    resumed sweep keeps) is in batch k // batch_size. On `--resume`, each trial's stored reports are read through it
    again, decisions ignored, as ResumableASHA does."""

    def __init__(self, time_attr: str, metric: str, mode: str, max_t: int, milestones: tuple[int, ...],
                 reduction_factor: int, batch_size: int):
        super().__init__()
        self._metric, self._mode = metric, mode
        self.time_attr, self.max_t = time_attr, max_t
        self.reduction_factor, self.batch_size = reduction_factor, batch_size
        self.sign = 1.0 if mode == "max" else -1.0  # values are compared as "higher is better", as ASHA does
        # milestone -> {trial_id: (batch, signed value)}, highest milestone first (a report past several records
        # only the highest, as in ASHA; at max_t a trial ends, and its value there is recorded as ASHA records it)
        self.rungs: dict[int, dict[str, tuple[int, float]]] = {m: {} for m in sorted(milestones, reverse=True)}
        self.batch_of: dict[str, int] = {}
        self.num_stopped = 0

    def on_trial_add(self, tune_controller, trial) -> None:
        self.batch_of.setdefault(trial.trial_id, len(self.batch_of) // self.batch_size)
        for result in stored_results(trial):
            self.decide(trial.trial_id, result)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr in result and result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP
        action = self.decide(trial.trial_id, result)
        self.num_stopped += action == TrialScheduler.STOP
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if result:
            self.decide(trial.trial_id, result)

    def decide(self, trial_id: str, result: dict) -> str:
        """Record the trial's value at the highest milestone it has reached and not yet recorded, and say whether
        it is below the cut-off of the earlier batches' values there."""
        if self.time_attr not in result or result.get(self._metric) is None or trial_id not in self.batch_of:
            return TrialScheduler.CONTINUE
        batch, value = self.batch_of[trial_id], self.sign * float(result[self._metric])
        for milestone, recorded in self.rungs.items():
            if result[self.time_attr] < milestone:
                continue
            if trial_id in recorded:
                break
            cutoff = self.cutoff([v for b, v in recorded.values() if b < batch])
            recorded[trial_id] = (batch, value)
            return TrialScheduler.STOP if cutoff is not None and value < cutoff else TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE

    def cutoff(self, values: list[float]) -> float | None:
        values = [v for v in values if not math.isnan(v)]
        return float(np.percentile(values, (1 - 1 / self.reduction_factor) * 100)) if values else None

    def debug_string(self) -> str:
        # the form of ASHA's own ("Iter 2.000: -7.6", signed as compared), which the progress table rewrites
        iters = " | ".join(f"Iter {m:.3f}: {self.cutoff([v for _, v in recorded.values()])}"
                           for m, recorded in self.rungs.items())
        return f"Using BatchedASHA (--reproducible, batches of {self.batch_size}): num_stopped={self.num_stopped}" \
               f"\nBracket: {iters}"
