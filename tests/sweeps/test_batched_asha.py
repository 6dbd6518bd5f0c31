"""`--reproducible`'s scheduler (sweeps/batched_asha.py), driven as TuneController drives a scheduler, with no Ray
started: one trial at a time it is Ray's ASHA; with several, a trial's decisions do not depend on the order in which
its batch reaches a milestone; a resumed sweep's rungs come back from the stored reports."""
from __future__ import annotations

import itertools
import json
import pickle
import random
from types import SimpleNamespace

import pytest
from conftest import saved_spec_of
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeps.batched_asha import BatchedASHA
from sweeps.tuner import asha_scheduler

SPEC = saved_spec_of(max_epochs=8)  # fid (min) at epochs 1, 2, 4, 8, reduction factor 2


def batched(batch_size: int) -> BatchedASHA:
    return asha_scheduler(SPEC.replace(reproducible=True, max_concurrent=batch_size))


class Trial(SimpleNamespace):
    storage = None  # no stored reports: a new trial


def trials(n: int) -> list[Trial]:
    return [Trial(trial_id=f"t{i}") for i in range(n)]


def curves(n: int, seed: int) -> list[list[float]]:
    """Each trial's FID at epochs 1..8 (falling, with ties and crossings)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, rate = rng.choice([60.0, 70.0, 80.0]), rng.choice([0.5, 0.7, 0.9])
        out.append([round(start * rate ** (e / 4), 1) for e in range(1, 9)])
    return out


def run(scheduler, n: int, fids: list[list[float]], order: list[int]) -> dict[str, int]:
    """Trials report their epochs in `order` (trial indices, each trial's reports in epoch order); the epoch each
    trial was stopped at (8: ran to the end)."""
    ts = trials(n)
    for t in ts:
        scheduler.on_trial_add(None, t)
    epoch, ended = [0] * n, {}
    for i in order:
        if ts[i].trial_id in ended:
            continue
        epoch[i] += 1
        decision = scheduler.on_trial_result(None, ts[i], {"epoch": epoch[i], "fid": fids[i][epoch[i] - 1]})
        if decision == TrialScheduler.STOP:
            ended[ts[i].trial_id] = epoch[i]
            scheduler.on_trial_complete(None, ts[i], {"epoch": epoch[i], "fid": fids[i][epoch[i] - 1]})
    return ended


@pytest.mark.parametrize("seed", range(5))
def test_one_trial_at_a_time_it_decides_as_rays_asha(seed):
    fids = curves(12, seed)
    order = [i for i in range(12) for _ in range(8)]  # each trial to its end or its stop, then the next
    ray_asha = ASHAScheduler(time_attr="epoch", metric="fid", mode="min", max_t=8, grace_period=1, reduction_factor=2)
    stopped = run(batched(1), 12, fids, order)
    assert stopped == run(ray_asha, 12, fids, order)
    assert any(e < 8 for e in stopped.values())  # the cuts happened


def interleavings(batch: list[int], rng: random.Random) -> list[int]:
    """The batch's reports interleaved at random (each trial's 8 in epoch order)."""
    slots = [i for i in batch for _ in range(8)]
    rng.shuffle(slots)
    return slots


@pytest.mark.parametrize("seed", range(5))
def test_in_batches_the_decisions_do_not_depend_on_arrival_order(seed):
    """Batches of 3 (each ends before the next starts, as the batched ConcurrencyLimiter runs them), their reports
    interleaved at random: every run stops the same trials at the same epochs. Ray's ASHA, on the same runs, does
    not."""
    fids, rng = curves(12, seed), random.Random(seed)
    outcomes, ray_outcomes = set(), set()
    for _ in range(20):
        order = list(itertools.chain.from_iterable(interleavings([b, b + 1, b + 2], rng) for b in range(0, 12, 3)))
        outcomes.add(tuple(sorted(run(batched(3), 12, fids, order).items())))
        ray_outcomes.add(tuple(sorted(run(ASHAScheduler(time_attr="epoch", metric="fid", mode="min", max_t=8,
                                                        grace_period=1, reduction_factor=2), 12, fids, order).items())))
    assert len(outcomes) == 1
    assert any(e < 8 for _, e in next(iter(outcomes)))
    if seed == 0:
        assert len(ray_outcomes) > 1  # what --reproducible is for


def test_the_first_batch_runs_on_and_later_ones_are_cut_against_earlier_batches_only():
    scheduler = batched(2)
    a, b, c, d = trials(4)
    for t in (a, b, c, d):
        scheduler.on_trial_add(None, t)
    # batch 0: b is far worse than a at epoch 1, and still goes on (no earlier batch)
    assert scheduler.on_trial_result(None, a, {"epoch": 1, "fid": 10.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, b, {"epoch": 1, "fid": 90.0}) == TrialScheduler.CONTINUE
    # batch 1: against a and b (median 50); c and d are not compared with each other
    assert scheduler.on_trial_result(None, d, {"epoch": 1, "fid": 40.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, c, {"epoch": 1, "fid": 45.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, c, {"epoch": 8, "fid": 5.0}) == TrialScheduler.STOP  # max_t
    assert "batches of 2" in scheduler.debug_string() and "Iter 1.000: -" in scheduler.debug_string()


def test_a_resumed_sweep_gets_its_rungs_and_batches_back_from_the_stored_reports(tmp_path):
    """Tune pickles the scheduler into tuner.pkl before any trial and adds every trial again, in order, on resume:
    the rungs are read back from each trial's result.json, and the next trial is cut as in the first driver."""
    import pyarrow.fs

    fs = pyarrow.fs.LocalFileSystem()

    class Stored(SimpleNamespace):
        storage = SimpleNamespace(storage_filesystem=fs)

        @property
        def path(self) -> str:
            return str(tmp_path / self.trial_id)

    tuner_pkl = pickle.dumps(batched(2))
    reports = {"a": [(1, 10.0), (2, 8.0)], "b": [(1, 90.0)], "c": [(1, 30.0)]}
    first, ts = pickle.loads(tuner_pkl), {i: Stored(trial_id=i) for i in "abcd"}
    for t in ts.values():
        first.on_trial_add(None, t)
    for i, rows in reports.items():
        (tmp_path / i).mkdir()
        for epoch, fid in rows:
            first.on_trial_result(None, ts[i], {"epoch": epoch, "fid": fid})
        (tmp_path / i / "result.json").write_text("".join(json.dumps({"epoch": e, "fid": f}) + "\n" for e, f in rows))
    resumed = pickle.loads(tuner_pkl)
    for t in ts.values():
        resumed.on_trial_add(None, t)
    assert resumed.rungs == first.rungs and resumed.batch_of == first.batch_of
    # d (batch 1) at epoch 1: against a and b only (median 50), not c of its own batch
    assert resumed.on_trial_result(None, ts["d"], {"epoch": 1, "fid": 45.0}) == TrialScheduler.CONTINUE
    assert resumed.on_trial_result(None, ts["c"], {"epoch": 2, "fid": 9.0}) == TrialScheduler.STOP  # a's 8 alone
