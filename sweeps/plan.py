"""What a sweep will run, and how long that takes: ASHA's expected survivors, a trial's cost under the sweep's
evaluation plan, and the sweep's wall time on its slots. The dry run (`--dry-run`) prints it before a sweep
starts, the progress output re-estimates the time left from what the trials report, and the leaderboard of an
interrupted sweep says what is left. Plain Python: no Ray, no torch.

The model of ASHA (`_asha_odds`): at a milestone a trial goes on when its value beats the (1 - 1/reduction_factor)
quantile of those recorded there before it, so a small sweep keeps more than 1/reduction_factor (the first arrival
has nothing to lose to). Trials start in random order of value and keep their rank from one milestone to the next
(ASHA's premise; the smoke sweeps' values do): a late arrival at a later milestone has beaten more trials to get
there, and goes on more often than an early one. Expected counts are fractional; the forecast's wall time is the
makespan of whole trials, each slot taking the next trial as it frees, with the trials' lengths drawn to match
those counts. The time left takes each trial at its own odds, given the values ASHA has recorded so far.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import random
from bisect import insort
from functools import lru_cache

# Not measured by a dry run (it starts no Ray): what a local sweep spends starting and stopping Ray, and Tune's work
# around each trial and report (starting the trial in a reused process, handing over its report, persisting its
# checkpoint), as measured on a 2-core machine, 2026-12-07 (docs/PERFORMANCE.md, "Forecasts"). The time left reads
# Tune's work between trials from the sweep itself once it has some.
RAY_START_S = 5.0
TUNE_PER_TRIAL_S = 0.3
TUNE_PER_REPORT_S = 0.35


@dataclasses.dataclass(frozen=True)
class Rungs:
    """ASHA's cuts: the epochs at which trials are compared (before max_t), and its reduction factor."""
    max_t: int
    cuts: tuple[int, ...]
    reduction_factor: int

    @classmethod
    def of(cls, spec) -> Rungs:
        return cls(spec.asha.max_t, tuple(m for m in spec.milestones if m < spec.asha.max_t),
                   spec.asha.reduction_factor)

    def odds(self, pending: int, recorded: tuple[tuple[float, ...], ...] = (),
             running: tuple[tuple[float | None, int], ...] = ()) -> tuple[tuple[float, ...], ...]:
        """The probability that each trial reaches each cut, then that it completes: the `running` trials first
        (each one's value, or None before its first cut, and its epochs so far), then the `pending` trials in the
        order they will start, given the values `recorded` at each cut so far (none: the sweep's start). Values are
        ranks among the trials' values at the first cut, from 0 (worst) to 1 (best)."""
        return _asha_odds(self.cuts, self.reduction_factor, recorded,
                          tuple((value, sum(c <= epochs for c in self.cuts), epochs) for value, epochs in running),
                          pending)

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


@lru_cache(maxsize=16)
def _asha_odds(cuts: tuple[int, ...], rf: int, recorded: tuple[tuple[float, ...], ...],
               running: tuple[tuple[float | None, int, int], ...], pending: int) -> tuple[tuple[float, ...], ...]:
    """Rungs.odds (running: value, cuts passed, epochs). Ray's ASHA (its cutoff: numpy's linear-interpolated
    percentile of the values recorded at the cut) on simulated sweeps: a trial's value is drawn at random where not
    known and kept at every cut; the running trials arrive at their next cuts first (the furthest along first), the
    survivors of one cut at the next in the order they went on. Seeded: the same state gets the same odds."""
    rows = len(running) + pending
    if not rows:
        return ()
    # each simulated sweep copies what is recorded (a C copy, ~1/20 of an arrival's cost) and simulates the rows
    work = rows * max(1, len(cuts)) + sum(map(len, recorded)) // 20
    rng, sweeps = random.Random(0), max(2, ASHA_DRAWS // max(1, work))
    q, reached = 1 - 1 / rf, [[0] * (len(cuts) + 1) for _ in range(rows)]
    order = sorted(range(len(running)), key=lambda i: -running[i][2])
    for _ in range(sweeps):
        alive = [(running[i][0] if running[i][0] is not None else rng.random(), i, running[i][1]) for i in order]
        alive += [(rng.random(), len(running) + i, 0) for i in range(pending)]
        for k in range(len(cuts)):
            values = list(recorded[k]) if k < len(recorded) else []
            going_on = []
            for value, row, passed in alive:
                reached[row][k] += 1
                if passed > k:  # went on from this cut already
                    going_on.append((value, row, passed))
                    continue
                at = q * (len(values) - 1)
                low = math.floor(at)
                if not values or value >= values[low] + (at - low) * (values[min(low + 1, len(values) - 1)]
                                                                      - values[low]):
                    going_on.append((value, row, passed))
                insort(values, value)
            alive = going_on
        for _, row, _ in alive:
            reached[row][-1] += 1
    return tuple(tuple(n / sweeps for n in row) for row in reached)


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
              started: int, recorded: tuple[tuple[float, ...], ...] = ()) -> float:
    """Wall seconds left at the trial `cost` the sweep's reports show (Tally.cost): the running trials' expected
    rest (`running`: each one's epochs so far, the seconds since it reported the latest, already spent on the next,
    and its value as Rungs.odds takes it), then the trials not started yet, each at its odds given the values
    `recorded` at each cut so far."""
    odds = _odds_left(rungs, trials, running, started, recorded)
    busy = [max(0.0, cost.expected(rungs, row, trained=epochs) - since)
            for (epochs, since, _), row in zip(running, odds)]
    return makespan([cost.expected(rungs, row) for row in odds[len(running):]], slots, busy)


def epochs_left(rungs: Rungs, trials: int, running: list[tuple[int, float, float | None]], started: int,
                recorded: tuple[tuple[float, ...], ...] = ()) -> float:
    """Expected trial-epochs still to train, the trials taken as time_left takes them."""
    odds = _odds_left(rungs, trials, running, started, recorded)
    return max(0.0, sum(rungs.outlook(row)[0] for row in odds) - sum(epochs for epochs, _, _ in running))


def _odds_left(rungs: Rungs, trials: int, running: list[tuple[int, float, float | None]], started: int,
               recorded: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """Rungs.odds of the running trials (time_left's `running`), then of the trials not started yet."""
    return rungs.odds(max(0, trials - started), recorded, tuple((value, epochs) for epochs, _, value in running))
