"""The time left, in the progress output: what the trials have reported so far (epochs, seconds), turned into the
expected time to the sweep's end by the plan's model of ASHA (sweeps/plan.py), re-estimated at every table.

The callback keeps its counts in this module, not in itself: Tune pickles a sweep's callbacks into its saved state,
and the progress table (which reads them) is made anew by each driver."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from ray import tune

from genmodels.io import json_lines
from sweeps.plan import (
    SWEEP_END_S,
    TUNE_GAP_S,
    Rungs,
    TrialCost,
    duration,
    epochs_left,
    left_in_batch,
    outcomes_left,
    time_left,
)
from trainables import checkpoints
from trainables.driver_clock import clocked

# The progress table comes every 30 s (sweeps/tuner.py): a sweep shorter than that would show no time left while it
# runs. Between tables the line alone follows a trial's end, at most this often: Tune's own default cadence for its
# progress output (CLIReporter's max_report_frequency).
LINE_EVERY_S = 5.0


class Tally:
    """Each trial's epoch times as reported, and which trials ended. A trial process's first trial also pays the
    process's one-time costs (imports, the device's context, the FID network): the trial reports them
    (`process_setup_s`, trainables.trainable.prepare_process) and Tally.cost leaves them out. Tune runs the next
    trials in the same processes, where a trial's first epoch also holds Tune's start of it, and Tune's work between
    trials shows as the gap between one trial's last report and the next one's start: both are read from those
    later trials once any have reported (until then, the gap is plan.TUNE_GAP_S)."""

    def __init__(self) -> None:
        self.rungs: Rungs | None = None
        self.trials = self.slots = 0
        self.started = time.monotonic()
        self.seconds: dict[str, list[tuple[int, float]]] = {}  # trial -> (epoch, its seconds) as reported
        self.epochs: dict[str, int] = {}  # trial -> its latest epoch
        self.ended: set[str] = set()
        self.cold: set[str] = set()  # the first trial of each process
        self.latest: dict[int, float | None] = {}  # process -> when its latest report was made
        self.gaps: list[float] = []  # seconds between a trial's last report and the next one's start in a process
        self.heard: dict[str, float] = {}  # trial -> when this driver got its latest report (time.time())
        self.began: dict[str, float] = {}  # trial -> when it first reported: the order of --reproducible's batches
        self.metric, self.sign = "", 1.0  # what ASHA ranks by, and +1 where larger is better (-1 where smaller)
        self.at_cuts: dict[str, dict[int, float]] = {}  # trial -> its value (signed) at each cut it reached
        self.said = self.started  # when the line was last printed (time.monotonic())

    def begin(self, spec, slots: int, folder: str | None = None) -> None:
        """A driver's start: the sweep's plan, and (on --resume) what its trials stored before."""
        self.__init__()
        self.rungs, self.trials, self.slots = Rungs.of(spec, max(1, slots)), spec.num_samples, max(1, slots)
        self.metric, self.sign = spec.metric, 1.0 if spec.mode == "max" else -1.0
        for path in sorted(Path(folder).glob(f"*/{checkpoints.RESULT_FILE}")) if folder else []:
            for result in json_lines(path.read_text(errors="replace")):
                self.record(path.parent.name, result)
            if checkpoints.has_ended(str(path.parent)):
                self.ended.add(path.parent.name)
        self.heard.clear()  # a stored trial restarts with this driver: nothing of its next epoch is spent yet

    def record(self, trial: str, result: dict, now: float | None = None) -> None:
        """A trial's report, got at `now` (default: this moment)."""
        if "epoch" not in result or "time_this_iter_s" not in result:
            return
        self.heard[trial] = time.time() if now is None else now
        pid, at, seconds = result.get("pid"), result.get("reported_at"), result["time_this_iter_s"]
        run_start = result.get("iterations_since_restore") == 1  # a run's first report: its process's setup in it
        if trial not in self.seconds:
            self.began[trial] = self.heard[trial] if at is None else at
            if pid not in self.latest:
                self.cold.add(trial)
            elif run_start and at is not None and self.latest[pid] is not None:
                self.gaps.append(max(0.0, at - seconds - self.latest[pid]))
        self.latest[pid] = at
        self.seconds.setdefault(trial, []).append(
            (result["epoch"], seconds - (result.get("process_setup_s", 0.0) if run_start else 0.0)))
        self.epochs[trial] = result["epoch"]
        value = result.get(self.metric)
        if self.rungs and result["epoch"] in self.rungs.cuts and isinstance(value, (int, float)) and value == value:
            self.at_cuts.setdefault(trial, {})[result["epoch"]] = self.sign * value

    def cost(self) -> TrialCost | None:
        """A trial's cost as the sweep's reports show it: its start (the gap after the trial before it in its
        process, and its first epoch, of the later trials in their processes where any have reported, less an
        epoch), an epoch (the mean later one at no cut), the extra of the epoch at each cut (its milestone's
        evaluation; the first epoch's is in the start, and until a cut's epoch has reported, the nearest cut's
        before it stands for it), and the end's extra (of the last epoch of the trials that completed; until one
        has, the latest milestone's)."""
        def completed(t: str) -> bool:
            return t in self.ended and self.epochs[t] >= self.rungs.max_t > 1

        first = [s[0][1] for t, s in self.seconds.items() if t not in self.cold] or [
            s[0][1] for s in self.seconds.values()]
        if not first:
            return None
        later = [x for t, s in self.seconds.items() for x in (s[1:-1] if completed(t) else s[1:])]
        plain = [x for e, x in later if e not in self.rungs.cuts]
        epoch = statistics.mean(plain or [x for _, x in later] or first)
        milestone, extra = [], 0.0
        for cut in self.rungs.cuts:
            here = [x for e, x in later if e == cut]
            if plain and here and cut > 1:
                extra = statistics.mean(here) - epoch
            milestone.append(extra if cut > 1 else 0.0)
        last = [s[-1][1] for t, s in self.seconds.items() if completed(t)]
        between = statistics.mean(self.gaps) if self.gaps else TUNE_GAP_S
        # until a trial completes, its end's evaluation is taken as the latest milestone's: at least as much
        return TrialCost(between + statistics.mean(first) - epoch, epoch, tuple(milestone),
                         statistics.mean(last) - epoch if last else extra)

    def left(self, now: float | None = None) -> float | None:
        """Expected wall seconds to the sweep's end at `now` (default: this moment; None before the first report): its
        trials' rest, then the end the dry run's forecast also counts (the results printed), as the user waits for
        both."""
        cost = self.cost()
        return None if cost is None else self._left(cost, now)

    def _left(self, cost: TrialCost, now: float | None) -> float:
        return time_left(self.rungs, self.trials, self.slots, cost, *self._state(now)) + SWEEP_END_S

    def outcomes_left(self, now: float, sweeps: int) -> list[float]:
        """The time left in each of `sweeps` sweeps simulated on from this state at `now` by the model `left` takes
        the mean of (plan.outcomes_left), the sweep's end included as there."""
        return [SWEEP_END_S + s for s in outcomes_left(self.rungs, self.trials, self.slots, self.cost(),
                                                        *self._state(now), sweeps=sweeps)]

    def epochs_left(self) -> float:
        """Expected trial-epochs still to train."""
        return epochs_left(self.rungs, self.trials, *self._state(None))

    def _state(self, now: float | None) -> tuple[list[tuple[int, float, float | None]], int, tuple, tuple]:
        """As time_left takes them: the running trials (epochs, seconds since their latest report at `now`, rank),
        the trials started, the ranks recorded at each cut (with batches: the earlier batches', then the batch
        under way's)."""
        now = time.time() if now is None else now
        rank, recorded, current = self.standing()
        running = [(e, max(0.0, now - self.heard[t]) if t in self.heard else 0.0, rank.get(t))
                   for t, e in self.epochs.items() if t not in self.ended]
        return running, len(self.epochs), recorded, current

    def standing(self) -> tuple[dict[str, float], tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
        """What ASHA holds so far, as Rungs.odds takes it: each trial's rank among the values at the first cut
        (from 0, worst, to 1, best; a trial keeps it at every cut), and the ranks recorded at each cut; with
        --reproducible's batches (in the order the trials began), those of the earlier batches and those of the
        batch under way apart (empty where there are no batches)."""
        if not self.rungs.cuts:
            return {}, (), ()
        first = {t: v[self.rungs.cuts[0]] for t, v in self.at_cuts.items() if self.rungs.cuts[0] in v}
        order = sorted(first, key=first.get)
        rank = {t: (i + 1) / (len(order) + 1) for i, t in enumerate(order)}
        under_way = self._batch_under_way()

        def ranks(cut: int, in_batch: bool) -> tuple[float, ...]:
            return tuple(sorted(rank[t] for t, v in self.at_cuts.items()
                                if cut in v and t in rank and (t in under_way) == in_batch))
        return (rank, tuple(ranks(cut, False) for cut in self.rungs.cuts),
                tuple(ranks(cut, True) for cut in self.rungs.cuts) if self.rungs.batch else ())

    def _batch_under_way(self) -> set[str]:
        """With --reproducible's batches (the trials in the order they began): the trials of the batch under way,
        the next one where every trial began has ended."""
        if not self.rungs.batch:
            return set()
        size, began = self.rungs.batch, sorted(self.began, key=self.began.get)
        end = len(began) + left_in_batch(size, len(began), any(t not in self.ended for t in began))
        return set(began[end - size:end])

    def line(self) -> str | None:
        """The progress line, now; printing it (`said`) restarts the wait for the next one between tables."""
        if self.rungs is None:
            return None
        self.said = time.monotonic()
        elapsed = duration(time.monotonic() - self.started)
        head = f"gensweep: {elapsed} elapsed, {len(self.ended)} of {self.trials} trials ended"
        cost = self.cost()  # once a table: it reads every report so far
        if cost is None:
            return f"{head}; time left: once the first trials report"
        return (f"{head}; about {duration(self._left(cost, None))} left ({cost.epoch:.2g} s an epoch so far, on "
                f"{self.slots} slots)")


tally = Tally()


@clocked
class ProgressTally(tune.Callback):
    """Driver side: each trial's epochs and seconds as it reports, and which trials have ended."""

    @staticmethod
    def _key(trial) -> str:
        return checkpoints.trial_dirname(trial.config.get("model_name", ""), trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        tally.record(self._key(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trial)

    def _ended(self, trial) -> None:
        """A trial's end, and between progress tables the line, at most every LINE_EVERY_S: not after the last
        trial, whose end the last table and the results follow."""
        tally.ended.add(self._key(trial))
        if len(tally.ended) < tally.trials and time.monotonic() - tally.said >= LINE_EVERY_S:
            if line := tally.line():
                print(line, flush=True)
