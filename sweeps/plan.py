"""What a sweep will run, and how long that takes: ASHA's expected survivors, a trial's cost under the sweep's
evaluation plan, and the sweep's wall time on its slots. The dry run (`--dry-run`) prints it before a sweep
starts, the progress output re-estimates the time left from what the trials report, and the leaderboard of an
interrupted sweep says what is left. Plain Python: no Ray, no torch.

The model of ASHA: at each milestone before the last epoch, 1 / reduction_factor of the trials that reach it go on
(ASHA stops those below the (1 - 1/reduction_factor) quantile of the values recorded there). Expected counts are
fractional; the wall time is the makespan of whole trials, each slot taking the next trial as it frees, with the
trials' lengths drawn to match those counts.
"""
from __future__ import annotations

import dataclasses
import heapq
import math

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

    def survivors(self, arrivals: float) -> float:
        """Expected trials that go on from a cut that `arrivals` trials reach. ASHA compares each arrival with the
        values recorded there before it: the first goes on, and the i-th (values in random order) beats the
        (1 - 1/rf) quantile of the i - 1 before it with probability 1 - (q (i - 2) + 1) / i, which is 1/2 for the
        second and tends to 1/rf, so a small sweep keeps more than 1/rf."""
        q = 1 - 1 / self.reduction_factor

        def kept(n: int) -> float:
            return min(n, 1) + sum(1 - (q * (i - 2) + 1) / i for i in range(2, n + 1))

        whole = math.floor(arrivals)
        return kept(whole) + (arrivals - whole) * (kept(whole + 1) - kept(whole))

    def arrivals(self, trials: float) -> list[float]:
        """Expected trials reaching each cut, then the expected number that complete (one more entry)."""
        out = [float(trials)]
        for _ in self.cuts:
            out.append(self.survivors(out[-1]))
        return out

    def reaching(self, epoch: int, trials: float) -> float:
        """Expected trials that train epoch `epoch` (1-based)."""
        return self.arrivals(trials)[sum(m < epoch for m in self.cuts)]

    def ends(self, trials: float) -> list[tuple[int, float]]:
        """(epoch, expected trials that end there): at each cut, those stopped; at max_t, those that complete."""
        counts = self.arrivals(trials)
        return [*((m, counts[k] - counts[k + 1]) for k, m in enumerate(self.cuts)), (self.max_t, counts[-1])]

    def trial_epochs(self, trials: float) -> float:
        return sum(e * n for e, n in self.ends(trials))

    def remaining_epochs(self, epoch: int, trials: float) -> float:
        """Expected epochs still to train for a trial that has trained `epoch` epochs and goes on, in a sweep of
        `trials` (having gone on past a cut, it is among that cut's survivors)."""
        if epoch >= self.max_t:
            return 0.0
        here = self.reaching(epoch + 1, trials)
        return sum(self.reaching(e, trials) for e in range(epoch + 1, self.max_t + 1)) / here if here else 0.0


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
        return (self.startup + epochs * self.epoch + sum(c for m, c in zip(rungs.cuts, self.milestone) if m <= epochs)
                + (self.end if epochs >= rungs.max_t else 0.0))

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
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"




@dataclasses.dataclass(frozen=True)
class Pace:
    """What a sweep's trial-epochs have cost so far, from their reports: a trial's first epoch (its start
    included), the epochs after it, the last epoch of a trial that completes (the end-of-trial work), and Tune's
    work between one trial's last report and the next one's start in that process."""
    first: float
    middle: float
    last: float
    between: float = 0.0

    def trial(self, rungs: Rungs, epochs: int) -> float:
        """Seconds of a whole trial of `epochs` epochs, from the end of the one before it in its process."""
        return self.between + self.first + max(0, epochs - 1) * self.middle + (
            self.last - self.middle if epochs >= rungs.max_t and epochs > 1 else 0.0)

    def rest(self, rungs: Rungs, trials: int, epoch: int) -> float:
        """Expected seconds left of a trial that has trained `epoch` epochs and goes on."""
        if epoch >= rungs.max_t:
            return 0.0
        completes = rungs.arrivals(trials)[-1] / rungs.reaching(epoch + 1, trials)
        return rungs.remaining_epochs(epoch, trials) * self.middle + completes * (self.last - self.middle)


def time_left(rungs: Rungs, trials: int, slots: int, pace: Pace, running_epochs: list[int], started: int) -> float:
    """Wall seconds left: the running trials' expected rest, then the trials not started yet (the plan's last
    ones), at the pace the sweep's reports show."""
    busy = [pace.rest(rungs, trials, e) for e in running_epochs]
    pending = max(0, trials - started)
    lengths = trial_lengths(rungs, trials)[trials - pending:]
    return makespan([pace.trial(rungs, e) for e in lengths], slots, busy)
