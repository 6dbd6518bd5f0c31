"""What a sweep will run, and how long that takes: ASHA's expected survivors, a trial's cost under the sweep's
evaluation plan, and the sweep's wall time on its slots. The dry run (`--dry-run`) prints it before a sweep
starts, the progress output re-estimates the time left from what the trials report, and the leaderboard of an
interrupted sweep says what is left. Plain Python: no Ray, no torch.

The model of ASHA (`asha_outcomes`): at a milestone a trial goes on when its value beats the (1 - 1/reduction_factor)
quantile of those recorded there before it, so a small sweep keeps more than 1/reduction_factor (the first arrival
has nothing to lose to). Trials start in random order of value and keep their rank from one milestone to the next
(ASHA's premise; the smoke sweeps' values do): a late arrival at a later milestone has beaten more trials to get
there, and goes on more often than an early one. Expected counts are fractional; the forecast's wall time is the
makespan of whole trials, each slot taking the next trial as it frees, with the trials' lengths drawn to match
those counts. The time left takes each trial at its own odds, given the values ASHA has recorded so far.

With `--reproducible` (sweeps/batched_asha.py) trials run in batches: a trial is cut against the earlier batches'
values only (the first batch runs to the end), and the next batch starts when the whole batch before it has ended.
Its wall time is then the mean, over simulated sweeps, of each batch's makespan one after another: a batch lasts as
long as its longest trial, which expected lengths would understate.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import random
import statistics
from bisect import insort
from functools import lru_cache

# Not measured by a dry run (it starts no Ray): what a local sweep spends around its trials, measured on a 2-core
# machine, 2026-12-07, on 12 README sweeps and on a full-preset-shaped one (docs/PERFORMANCE.md, "Forecasts"):
# - Ray's start and the Tuner made (W&B's mode, the study, the callbacks): 3.0 s, and 2.9 s on the full-shaped one;
# - Tune's start of the first trials beyond what a trial process's start costs alone (their actors; two processes
#   starting at once): 1.0 s, and 1.3 s;
# - the sweep's end after its last trial's last report (Tune's end, W&B's runs finished, Ray stopped, until the
#   driver prints the results): 1.5 s, and 1.8 s;
# - Tune's work around each report, beyond the dry run's epoch: 0.04 s, and 0.2 s.
# The time left reads Tune's work from the sweep itself once it has some; the end comes once, at the end.
RAY_START_S = 3.0
TUNE_START_S = 1.0
SWEEP_END_S = 1.5
TUNE_PER_REPORT_S = 0.05
# Tune's work between the last report of one trial in a process and the next one's start (median 0.08-0.11 s over
# 72 trials in each of three sets of 12 README sweeps): the dry run's per trial, and the time left's until the sweep
# shows its own (sweeps/progress.py).
TUNE_GAP_S = 0.1


@dataclasses.dataclass(frozen=True)
class Rungs:
    """ASHA's cuts: the epochs at which trials are compared (before max_t), its reduction factor, and with
    `--reproducible` the size of its batches (0: ASHA's own asynchronous cuts)."""
    max_t: int
    cuts: tuple[int, ...]
    reduction_factor: int
    batch: int = 0

    @classmethod
    def of(cls, spec, at_once: int = 1) -> Rungs:
        """The spec's rungs; a --reproducible sweep's batches are --max-concurrent, or the trials `at_once` that the
        driver then takes for it."""
        return cls(spec.asha.max_t, tuple(m for m in spec.milestones if m < spec.asha.max_t),
                   spec.asha.reduction_factor, (spec.max_concurrent or at_once) if spec.reproducible else 0)

    def odds(self, pending: int, recorded: tuple[tuple[float, ...], ...] = (),
             running: tuple[tuple[float | None, int], ...] = (), current: tuple[tuple[float, ...], ...] = (),
             started: int = 0) -> tuple[tuple[float, ...], ...]:
        """The probability that each trial reaches each cut, then that it completes: the `running` trials first
        (each one's value, or None before its first cut, and its epochs so far), then the `pending` trials in the
        order they will start, given the values `recorded` at each cut so far (none: the sweep's start). Values are
        ranks among the trials' values at the first cut, from 0 (worst) to 1 (best). With batches, `recorded` holds
        the earlier batches' values, `current` those of the batch under way, and `started` counts the trials
        started so far."""
        if not self.batch:  # what ASHA's own cuts do not depend on: one cached answer for every such state
            current, started = (), 0
        return _asha_odds(self, recorded, _running(self, running), pending, current, started)

    def outlook(self, odds: tuple[float, ...]) -> tuple[float, float]:
        """A trial's expected epochs at its end, and the probability that it completes, from its odds."""
        return sum(e * p for e, p in self._ends(odds)), odds[-1]

    def arrivals(self, trials: int) -> tuple[float, ...]:
        """Expected trials reaching each cut, then the expected number that complete (one more entry)."""
        return _arrivals(self, trials)

    def reaching(self, epoch: int, trials: int) -> float:
        """Expected trials that train epoch `epoch` (1-based)."""
        return self.arrivals(trials)[sum(m < epoch for m in self.cuts)]

    def ends(self, trials: int) -> list[tuple[int, float]]:
        """(epoch, expected trials that end there): at each cut, those stopped; at max_t, those that complete."""
        return self._ends(self.arrivals(trials))

    def _ends(self, reached: tuple[float, ...]) -> list[tuple[int, float]]:
        """(epoch, share that ends there) from the shares reaching each cut and completing."""
        return [*((m, reached[k] - reached[k + 1]) for k, m in enumerate(self.cuts)), (self.max_t, reached[-1])]

    def trial_epochs(self, trials: int) -> float:
        return sum(e * n for e, n in self.ends(trials))


@lru_cache(maxsize=16)
def _arrivals(rungs: Rungs, trials: int) -> tuple[float, ...]:
    return tuple(map(sum, zip(*rungs.odds(trials))))


ASHA_DRAWS = 100_000  # arrivals simulated per expectation (2 sweeps or more: a big sweep's trials average out)
BATCHED_DRAWS = 1_000  # at most, for a batched sweep's wall time (each sweep's makespans are computed too)


def _running(rungs: Rungs, running) -> tuple[tuple[float | None, int, int], ...]:
    """(value, epochs) -> (value, cuts passed, epochs), as asha_outcomes takes the running trials."""
    return tuple((value, sum(c <= epochs for c in rungs.cuts), epochs) for value, epochs in running)


def _sweeps(rungs: Rungs, rows: int, recorded: tuple[tuple[float, ...], ...]) -> int:
    """Simulated sweeps per expectation: ASHA_DRAWS arrivals. Each copies what is recorded (a C copy, ~1/20 of an
    arrival's cost) and simulates the rows."""
    return max(2, ASHA_DRAWS // max(1, rows * max(1, len(rungs.cuts)) + sum(map(len, recorded)) // 20))


@lru_cache(maxsize=16)
def _asha_odds(rungs: Rungs, recorded: tuple[tuple[float, ...], ...],
               running: tuple[tuple[float | None, int, int], ...], pending: int,
               current: tuple[tuple[float, ...], ...] = (), started: int = 0) -> tuple[tuple[float, ...], ...]:
    """Rungs.odds (running: value, cuts passed, epochs): the share of simulated sweeps (asha_outcomes) in which each
    trial reaches each cut, and completes."""
    rows = len(running) + pending
    if not rows:
        return ()
    sweeps = _sweeps(rungs, rows, recorded)
    ended = [[0] * (len(rungs.cuts) + 2) for _ in range(rows)]  # row -> how many sweeps it got n stages in
    for stages in asha_outcomes(rungs, recorded, running, pending, sweeps, current, started):
        for row, n in enumerate(stages):
            ended[row][n] += 1
    # it reached stage k in the sweeps where it got more than k stages
    return tuple(tuple(sum(counts[k + 1:]) / sweeps for k in range(len(rungs.cuts) + 1)) for counts in ended)


def _cutoff(values: list[float], q: float) -> float | None:
    """numpy's linear-interpolated percentile (q in 0..1) of `values`, sorted, as Ray's ASHA and BatchedASHA cut
    (None where nothing is recorded: the trial goes on)."""
    if not values:
        return None
    at = q * (len(values) - 1)
    low = math.floor(at)
    return values[low] + (at - low) * (values[min(low + 1, len(values) - 1)] - values[low])


def asha_outcomes(rungs: Rungs, recorded: tuple[tuple[float, ...], ...],
                  running: tuple[tuple[float | None, int, int], ...], pending: int, sweeps: int,
                  current: tuple[tuple[float, ...], ...] = (), started: int = 0):
    """`sweeps` simulated sweeps from this state (Rungs.odds's; running: value, cuts passed, epochs), each as how
    far each trial gets: the cuts it reaches, plus one if it completes (the running trials first, then the pending
    ones). A trial's value is drawn at random where not known and kept at every cut. ASHA: a trial is cut against
    everything recorded there before it; the running trials arrive at their next cuts first (the furthest along
    first), the survivors of one cut at the next in the order they went on. Batches (rungs.batch): against the
    earlier batches' values only, the batch under way (the running trials and the rest of its `rungs.batch`) first.
    Seeded: the same state gets the same outcomes."""
    rng, q, cuts = random.Random(0), 1 - 1 / rungs.reduction_factor, rungs.cuts
    order = sorted(range(len(running)), key=lambda i: -running[i][2])
    rows = len(running) + pending
    first = min(pending, left_in_batch(rungs.batch, started, bool(running))) if rungs.batch else pending
    recorded = tuple(sorted(recorded[k]) if k < len(recorded) else [] for k in range(len(cuts)))
    for _ in range(sweeps):
        stages = [0] * rows
        alive = [(running[i][0] if running[i][0] is not None else rng.random(), i, running[i][1]) for i in order]
        alive += [(rng.random(), len(running) + i, 0) for i in range(first)]
        values = [list(v) for v in recorded]
        batch = [list(current[k]) if k < len(current) else [] for k in range(len(cuts))]  # the batch's own values
        start = len(running) + first
        while alive:
            for k in range(len(cuts)):
                cutoff, going_on, seen = _cutoff(values[k], q), [], values[k]
                for value, row, passed in alive:
                    stages[row] += 1
                    if passed > k:  # went on from this cut already
                        going_on.append((value, row, passed))
                        continue
                    if cutoff is None or value >= cutoff:
                        going_on.append((value, row, passed))
                    if rungs.batch:
                        batch[k].append(value)  # the later batches are cut against it
                        continue
                    insort(seen, value)  # the next arrival is: _cutoff inline, the simulation's hot loop
                    at = q * (len(seen) - 1)
                    low = int(at)
                    cutoff = seen[low] + (at - low) * (seen[min(low + 1, len(seen) - 1)] - seen[low])
                alive = going_on
            for _, row, _ in alive:
                stages[row] += 1
            if not rungs.batch:
                break
            values = [sorted(v + b) for v, b in zip(values, batch)]
            batch = [[] for _ in cuts]
            alive = [(rng.random(), row, 0) for row in range(start, min(start + rungs.batch, rows))]
            start += rungs.batch
        yield stages


def left_in_batch(batch: int, started: int, running: bool) -> int:
    """Trials of the batch under way not started yet, with `started` trials started so far (`running`: some of
    them still are); with none running and the last batch whole, the next batch is the one under way."""
    under_way = (started - 1) // batch if running else started // batch
    return (under_way + 1) * batch - started


@dataclasses.dataclass(frozen=True)
class TrialCost:
    """Seconds of one trial's phases on one slot: its start (a new process's imports, the Experiment built, the
    first step), each epoch (training and its cheap evaluation), the extra work at each cut's milestone (the
    ranking evaluation, the FID at that rung's samples and sampler budget, grids, a checkpoint) and at the end
    (the final evaluation, FID and reconstruction FID, grids, a checkpoint)."""
    startup: float
    epoch: float
    milestone: tuple[float, ...]  # one per cut
    end: float

    def seconds(self, rungs: Rungs, epochs: int) -> float:
        """A trial that trains `epochs` epochs (ended there by ASHA, or completed at max_t)."""
        return self.expected(rungs, (*(float(epochs >= m) for m in rungs.cuts), float(epochs >= rungs.max_t)))

    def expected(self, rungs: Rungs, odds: tuple[float, ...], trained: int = 0) -> float:
        """Expected seconds of a trial with these odds (Rungs.odds: of reaching each cut, then of completing; the
        seconds are linear in them), or of what is left of it after `trained` epochs."""
        if trained >= rungs.max_t:
            return 0.0
        epochs, completes = rungs.outlook(odds)
        return ((0.0 if trained else self.startup) + (epochs - trained) * self.epoch + completes * self.end
                + sum(p * c for m, p, c in zip(rungs.cuts, odds, self.milestone) if m > trained))

    def scaled(self, factor: float) -> TrialCost:
        return TrialCost(self.startup * factor, self.epoch * factor, tuple(c * factor for c in self.milestone),
                         self.end * factor)


def trial_lengths(rungs: Rungs, trials: int) -> list[int]:
    """`trials` whole trials' epochs, in the counts ASHA is expected to give (largest remainder), in an order
    that spreads the long ones as ASHA's early trials do (each rung's first trials have nothing to lose to)."""
    ends = rungs.ends(trials)
    counts = [math.floor(n) for _, n in ends]
    rest = sorted(range(len(ends)), key=lambda i: ends[i][1] - counts[i], reverse=True)
    for i in rest[:trials - sum(counts)]:
        counts[i] += 1
    lengths = [e for (e, _), c in zip(ends, counts) for _ in range(c)]
    lengths.sort(reverse=True)
    # interleave: longest, shortest, next longest, ... (a sweep's long trials are not all at its start)
    out = []
    while lengths:
        out.append(lengths.pop(0))
        if lengths:
            out.append(lengths.pop())
    return out


def makespan(durations: list[float], slots: int, busy: list[float] | None = None) -> float:
    """The wall time of running `durations` in order on `slots` slots, each taking the next as it frees; `busy`:
    seconds the slots are still busy with trials already running."""
    free = sorted((busy or [])[:slots]) + [0.0] * max(0, slots - len(busy or []))
    heapq.heapify(free)
    end = max(free, default=0.0)
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


def sweep_seconds(cost: TrialCost, rungs: Rungs, trials: int, slots: int) -> tuple[float, float]:
    """(device-seconds, wall seconds) of `trials` trials of this cost on `slots` slots."""
    if rungs.batch:
        device = sum(cost.expected(rungs, row) for row in rungs.odds(trials))
        return device, time_left(rungs, trials, slots, cost, [], 0)
    durations = [cost.seconds(rungs, e) for e in trial_lengths(rungs, trials)]
    return sum(durations), makespan(durations, slots)


def duration(seconds: float) -> str:
    """1 h 05 min, 4 min 10 s, 12 s."""
    seconds = max(0.0, seconds)
    if seconds >= 10:
        seconds = round(seconds)  # 59.7 s is 1 min 00 s, as 60.2 s is
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def time_left(rungs: Rungs, trials: int, slots: int, cost: TrialCost, running: list[tuple[int, float, float | None]],
              started: int, recorded: tuple[tuple[float, ...], ...] = (),
              current: tuple[tuple[float, ...], ...] = ()) -> float:
    """Wall seconds left at the trial `cost` the sweep's reports show (Tally.cost): the running trials' expected
    rest (`running`: each one's epochs so far, the seconds since it reported the latest, already spent on the next,
    and its value as Rungs.odds takes it), then the trials not started yet, each at its odds given the values
    `recorded` at each cut so far (with batches: the earlier batches', and `current` the batch under way's)."""
    if rungs.batch:
        return _batched_left(rungs, trials, slots, cost, tuple(running), started, recorded, current)
    odds = _odds_left(rungs, trials, running, started, recorded)
    busy = [max(0.0, cost.expected(rungs, row, trained=epochs) - since)
            for (epochs, since, _), row in zip(running, odds)]
    return makespan([cost.expected(rungs, row) for row in odds[len(running):]], slots, busy)


@lru_cache(maxsize=16)
def _batched_left(rungs: Rungs, trials: int, slots: int, cost: TrialCost, running: tuple, started: int,
                  recorded: tuple, current: tuple) -> float:
    """time_left with batches: the mean over simulated sweeps (a batch lasts as long as its longest trial)."""
    return statistics.mean(outcomes_left(rungs, trials, slots, cost, running, started, recorded, current))


def outcomes_left(rungs: Rungs, trials: int, slots: int, cost: TrialCost, running, started: int,
                  recorded: tuple[tuple[float, ...], ...] = (), current: tuple[tuple[float, ...], ...] = (),
                  sweeps: int | None = None) -> list[float]:
    """The wall seconds left in each of `sweeps` sweeps simulated on from time_left's state (default: as many as
    an expectation takes, at most BATCHED_DRAWS)."""
    pending = max(0, trials - started)
    if not running and not pending:
        return [0.0]
    sweeps = sweeps or min(BATCHED_DRAWS, _sweeps(rungs, len(running) + pending, recorded))
    values = _running(rungs, [(value, epochs) for epochs, _, value in running])
    return [outcome_left(rungs, slots, cost, running, started, stages)
            for stages in asha_outcomes(rungs, recorded, values, pending, sweeps, current, started)]


def outcome_left(rungs: Rungs, slots: int, cost: TrialCost, running, started: int, stages: list[int]) -> float:
    """The wall seconds left in one simulated sweep (asha_outcomes' `stages`, from time_left's state): the running
    trials' rest and the trials to start after them, batch after batch where rungs.batch says."""
    def cost_of(n: int, trained: int = 0) -> float:  # a trial that reaches n stages: n - 1 cuts, or completes
        return cost.expected(rungs, tuple(float(k < n) for k in range(len(rungs.cuts) + 1)), trained)

    busy = [max(0.0, cost_of(n, epochs) - since) for (epochs, since, _), n in zip(running, stages)]
    whole = [cost_of(n) for n in range(len(rungs.cuts) + 2)]  # a trial not started yet: one of these lengths
    durations = [whole[n] for n in stages[len(running):]]
    first = min(len(durations), left_in_batch(rungs.batch, started, bool(running))) if rungs.batch else len(durations)
    wall = makespan(durations[:first], slots, busy)
    for i in range(first, len(durations), rungs.batch or 1):
        wall += makespan(durations[i:i + rungs.batch], slots)
    return wall


def epochs_left(rungs: Rungs, trials: int, running: list[tuple[int, float, float | None]], started: int,
                recorded: tuple[tuple[float, ...], ...] = (), current: tuple[tuple[float, ...], ...] = ()) -> float:
    """Expected trial-epochs still to train, the trials taken as time_left takes them."""
    odds = _odds_left(rungs, trials, running, started, recorded, current)
    return max(0.0, sum(rungs.outlook(row)[0] for row in odds) - sum(epochs for epochs, _, _ in running))


def _odds_left(rungs: Rungs, trials: int, running: list[tuple[int, float, float | None]], started: int,
               recorded: tuple[tuple[float, ...], ...],
               current: tuple[tuple[float, ...], ...] = ()) -> tuple[tuple[float, ...], ...]:
    """Rungs.odds of the running trials (time_left's `running`), then of the trials not started yet."""
    return rungs.odds(max(0, trials - started), recorded, tuple((value, epochs) for epochs, _, value in running),
                      current, started)
