"""The plan's arithmetic (sweeps/plan.py): ASHA's expected survivors against Ray's ASHA itself, whole trials on
slots, the time left, and what the leaderboard of an unfinished sweep says is left."""
from __future__ import annotations

import random
import re

import pytest
from conftest import saved_spec_of
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeps.batched_asha import BatchedASHA
from sweeps.budgets import ASHASettings
from sweeps.leaderboard import left_line
from sweeps.plan import Rungs, TrialCost, makespan, outcome_left, sweep_seconds, time_left, trial_lengths


def _reached(scheduler, trials: int, cuts: tuple[int, ...], batch: int, runs: int = 300) -> list[float]:
    """The mean number of trials that reach each cut, then complete, over `runs` sweeps of `scheduler()` on trials
    of random values, each kept at every cut: `batch` trials at a time, each batch through every cut in the order
    the trials went on before the next batch starts."""
    rng, reached = random.Random(0), [0.0] * (len(cuts) + 1)
    for _ in range(runs):
        asha = scheduler()
        trial_ids = [type("T", (), {"trial_id": str(i), "storage": None})() for i in range(trials)]
        for t in trial_ids:
            asha.on_trial_add(None, t)
        value = {t: rng.random() for t in trial_ids}
        for first in range(0, trials, batch):
            alive = trial_ids[first:first + batch]
            for k, epoch in enumerate(cuts):
                reached[k] += len(alive)
                alive = [t for t in alive if asha.on_trial_result(None, t, {"epoch": epoch, "v": value[t]})
                         == TrialScheduler.CONTINUE]
            reached[-1] += len(alive)
    return [n / runs for n in reached]


@pytest.mark.parametrize("trials, rf", [(8, 2), (12, 2), (30, 3), (100, 3)])
def test_expected_survivors_match_rays_asha_on_values_that_keep_their_order(trials, rf):
    """Ray's ASHA on trials arriving one after another in random order of value, each keeping its value at every
    cut: the mean number that reach each cut over many sweeps is what Rungs.arrivals expects (more than 1/rf go on:
    the first arrival at a cut has nothing to lose to, and a late arrival at a later cut has beaten more trials)."""
    cuts = tuple(m for m in ASHASettings(8, 1, rf).milestones if m < 8)  # ASHA's own rungs: 1, 2, 4 or 1, 3
    reached = _reached(lambda: ASHAScheduler(time_attr="epoch", metric="v", mode="max", max_t=8, grace_period=1,
                                             reduction_factor=rf), trials, cuts, batch=trials)
    expected = Rungs(8, cuts, rf).arrivals(trials)
    for k in range(len(reached)):
        assert reached[k] == pytest.approx(expected[k], rel=0.06), (k, reached, expected)


@pytest.mark.parametrize("trials, batch, rf", [(8, 2, 2), (12, 3, 3), (9, 4, 2)])
def test_expected_survivors_of_reproducible_batches_match_batched_asha(trials, batch, rf):
    """--reproducible: sweeps/batched_asha.py on batches of trials, each trial keeping its value at every cut,
    cut against the earlier batches' values only: the mean number that reach each cut is what Rungs.arrivals
    expects with batches (the first batch has nothing to be cut against and completes)."""
    cuts = tuple(m for m in ASHASettings(8, 1, rf).milestones if m < 8)
    reached = _reached(lambda: BatchedASHA("epoch", "v", "max", 8, (*cuts, 8), rf, batch_size=batch), trials, cuts,
                       batch)
    expected = Rungs(8, cuts, rf, batch=batch).arrivals(trials)
    assert expected[-1] > Rungs(8, cuts, rf).arrivals(trials)[-1]  # more complete than ASHA's asynchronous cuts
    for k in range(len(reached)):
        assert reached[k] == pytest.approx(expected[k], rel=0.06), (k, reached, expected)


def test_a_batch_lasts_as_long_as_its_longest_trial():
    """--reproducible's wall time: the next batch starts when the whole batch before it has ended, so a batch
    of one trial that completes and one stopped at the first cut lasts as long as the complete one."""
    cost, rungs = TrialCost(startup=1, epoch=2, milestone=(0, 3), end=5), Rungs(4, (1, 2), 2, batch=2)
    whole, stopped = cost.seconds(rungs, 4), cost.seconds(rungs, 1)
    assert outcome_left(rungs, 2, cost, [], 0, [3, 3, 1, 3]) == 2 * whole
    assert outcome_left(rungs, 2, cost, [], 0, [3, 1, 1, 1]) == whole + stopped
    # without batches the slot a stopped trial frees takes the next trial at once
    assert outcome_left(Rungs(4, (1, 2), 2), 2, cost, [], 0, [3, 1, 1, 1]) == whole
    # the batch under way: its running trial (epoch 2 of 4, 1 s into its next) and its trial not started yet
    assert outcome_left(rungs, 2, cost, [(2, 1.0, 0.5)], 3, [3, 1, 1]) == max(2 * 2 + 5 - 1.0, stopped) + stopped
    device, wall = sweep_seconds(cost, rungs, 8, 2)
    assert device == pytest.approx(sum(cost.expected(rungs, row) for row in rungs.odds(8)))
    assert wall > sweep_seconds(cost, Rungs(4, (1, 2), 2), 8, 2)[1] and wall > device / 2


def test_trial_lengths_add_up_to_the_expected_counts():
    rungs = Rungs(4, (1, 2), 2)
    lengths = trial_lengths(rungs, 8)
    assert len(lengths) == 8 and sorted(lengths) == [1, 1, 1, 2, 4, 4, 4, 4]  # ends 3.5, 0.9, 3.6: whole
    assert sum(lengths) == pytest.approx(rungs.trial_epochs(8), abs=2)


def test_makespan_takes_the_next_trial_as_a_slot_frees():
    assert makespan([4, 1, 1, 1, 1], 2) == 4
    assert makespan([1, 1, 1], 2) == 2
    assert makespan([3], 2, busy=[5, 1]) == 5  # the free slot takes it at 1, ends at 4; the busy one at 5


def test_a_sweeps_seconds_are_its_trials_on_its_slots():
    cost = TrialCost(startup=1, epoch=2, milestone=(10, 20), end=5)
    rungs = Rungs(4, (1, 2), 2)
    assert cost.seconds(rungs, 1) == 1 + 2 + 10 and cost.seconds(rungs, 4) == 1 + 8 + 30 + 5
    device, wall = sweep_seconds(cost, rungs, 8, 2)
    assert device == sum(cost.seconds(rungs, e) for e in trial_lengths(rungs, 8)) and device / 2 <= wall < device


def test_time_left_counts_the_running_and_the_unstarted():
    rungs, pace = Rungs(4, (1, 2), 2), TrialCost(startup=2.0, epoch=1.0, milestone=(0.0, 0.0), end=4.0)
    assert pace.seconds(rungs, 1) == 3 and pace.seconds(rungs, 2) == 4 and pace.seconds(rungs, 4) == 3 + 2 + 5
    assert time_left(rungs, 8, 2, pace, [], 8) == 0
    assert time_left(rungs, 8, 2, pace, [(2, 0.0, 0.5)], 8) == 1 + 5  # past both cuts: its last epoch is the end's
    # the seconds since the running trial's latest report are spent on its rest already
    assert time_left(rungs, 8, 2, pace, [(2, 1.5, 0.5)], 8) == 6 - 1.5
    assert time_left(rungs, 8, 2, pace, [(2, 9.0, 0.5)], 8) == 0
    assert time_left(rungs, 8, 2, pace, [(4, 0.0, 0.5)], 8) == 0  # its last epoch reported, its end not yet seen
    pending = [pace.expected(rungs, odds) for odds in rungs.odds(4)]
    assert time_left(rungs, 8, 2, pace, [], 4) == makespan(pending, 2)


def test_a_milestones_evaluation_counts_for_the_trials_that_reach_it():
    """An FID at the cut at epoch 2 costs 6 epochs: a trial pays it only where it gets there, and once."""
    rungs, cost = Rungs(4, (1, 2), 2), TrialCost(startup=2.0, epoch=1.0, milestone=(0.0, 6.0), end=4.0)
    assert cost.expected(rungs, (1.0, 1.0, 1.0), trained=1) == 3 + 6 + 4  # it goes on to the end
    assert cost.expected(rungs, (1.0, 1.0, 0.0), trained=1) == 1 + 6  # stopped at epoch 2, after its evaluation
    assert cost.expected(rungs, (1.0, 0.0, 0.0), trained=1) == 0  # stopped at epoch 1: nothing more
    assert cost.expected(rungs, (1.0, 1.0, 1.0), trained=2) == 2 + 4  # its evaluation at epoch 2 is behind it
    assert cost.expected(rungs, (1.0, 0.5, 0.25)) == pytest.approx(2 + (0.5 * 1 + 0.25 * 2 + 0.25 * 4) + 0.5 * 6
                                                                  + 0.25 * 4)
    running = [(1, 0.0, 0.9)]  # the best so far at epoch 1, when ASHA holds a worse value at epoch 2
    assert time_left(rungs, 2, 2, cost, running, 2, ((0.1, 0.9), (0.1,))) == 3 + 6 + 4


def test_each_trial_to_start_has_its_odds_and_the_first_completes():
    """The i-th trial's chances of reaching each cut and completing add up, over the trials, to the expected
    counts; the first trial has nothing to lose to at any cut, and a later one goes on less often. A trial's
    expected cost is the mean of its whole costs over where it may end."""
    rungs, pace = Rungs(4, (1, 2), 2), TrialCost(startup=2.0, epoch=1.0, milestone=(0.0, 3.0), end=4.0)
    odds = rungs.odds(8)
    assert odds[0] == (1.0, 1.0, 1.0) and all(1 == a >= b >= c >= 0 for a, b, c in odds) and odds[7][2] < odds[1][2]
    assert tuple(map(sum, zip(*odds))) == rungs.arrivals(8)
    a, b, c = odds[5]  # it ends at epoch 1 with probability a - b, at 2 with b - c, completes with c
    assert rungs.outlook(odds[5]) == pytest.approx((1 * (a - b) + 2 * (b - c) + 4 * c, c))
    assert pace.expected(rungs, odds[5]) == pytest.approx(
        (a - b) * pace.seconds(rungs, 1) + (b - c) * pace.seconds(rungs, 2) + c * pace.seconds(rungs, 4))


def test_the_odds_follow_the_values_recorded_so_far():
    """Values are ranks at the first cut (1 best). With the best trial recorded first at both cuts, new trials go
    on less often than at a sweep's start; a running trial that beats what the next cut holds completes, one that
    does not stops there."""
    rungs = Rungs(4, (1, 2), 2)
    best_first = rungs.odds(4, recorded=((0.9, 0.2), (0.9,)))
    assert sum(o[-1] for o in best_first) < sum(o[-1] for o in rungs.odds(4)) - 0.5
    assert rungs.odds(0, ((0.9, 0.2, 0.95), (0.9,)), running=((0.95, 1),)) == ((1.0, 1.0, 1.0),)
    assert rungs.odds(0, ((0.9, 0.2, 0.5), (0.9,)), running=((0.5, 1),)) == ((1.0, 1.0, 0.0),)


def test_the_board_of_an_unfinished_sweep_says_what_is_left():
    """What is left follows the values ASHA holds: a trial interrupted after the first milestone (it went on there)
    that is the best so far is expected to train on to the end, one that is worse than the trial ASHA holds at the
    next milestone to stop there."""
    spec = saved_spec_of(max_epochs=4).replace(num_samples=8)

    def trial(name, status, fids):
        history = [{"epoch": e, "time_this_iter_s": 2.0, "time_total_s": 2.0 * e, "fid": f}
                   for e, f in enumerate(fids, 1)]
        return {"trial": name, "status": status, "history": history, "last": history[-1]}

    def left(interrupted_fids):
        done = [trial("a", "completed", [20, 19, 18, 17]), trial("b", "stopped (ASHA)", [30])]
        line = left_line([*done, trial("c", "unfinished", interrupted_fids)], spec)
        assert line.startswith("gensweep: unfinished: 2 of 8 trials ended, 1 under way or interrupted, 5 not started")
        assert "2 s a trial-epoch" in line
        return float(re.search(r"about ([\d.]+) trial-epochs", line)[1])

    assert left([10]) > left([25]) + 1.5  # the best one has three epochs to go, the other one one
    assert left_line([trial("a", "completed", [20, 19, 18, 17])] * 8, spec) is None
