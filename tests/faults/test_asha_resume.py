"""ASHA across `--resume`: Tune does not save the scheduler with the sweep's state (TuneController.save_to_dir
saves the searcher and the callbacks only; Tuner.restore unpickles the scheduler from tuner.pkl, written when the
Tuner was made), so the rungs come back empty. The sweep's ResumableASHA rebuilds them from each trial's stored
result.json as Tune adds the trial again. No Ray started: the scheduler is driven as TuneController drives it
(on_trial_add, then on_trial_result per report), with stand-ins for Tune's trials."""
from __future__ import annotations

import json
import pickle
import re
from types import SimpleNamespace

import pyarrow.fs
import pytest
from conftest import saved_spec_of
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from sweeps.tuner import ResumableASHA, asha_scheduler

SPEC = saved_spec_of(max_epochs=4)  # ASHA on fid (min) at epochs 1, 2, 4, reduction factor 2: a rung's median
# Before the kill: A, B reach epoch 2 (weak), C reaches epoch 1 (its epoch-1 checkpoint is where it resumes).
BEFORE = [("a", 1, 80.0), ("b", 1, 70.0), ("c", 1, 60.0), ("a", 2, 60.0), ("b", 2, 50.0)]
# After it: C reaches epoch 2 (strong); D, pending at the kill, reaches epochs 1 and 2.
AFTER = [("c", 2, 20.0), ("d", 1, 10.0)]
D_AT_2 = ("d", 2, 30.0)  # rung 2 holds 60, 50, 20: median 50, and 30 is better; with only 20 there, it is worse


class StoredTrial:
    """What ResumableASHA reads of Tune's Trial: `trial_id` (ASHA's key), `path` (the trial's folder on
    `storage.storage_filesystem`). The filesystem is rooted at tmp_path, as a bucket is for a cloud URI: the path
    means nothing on the local disk."""

    def __init__(self, trial_id: str, root, named: bool = True):
        self.trial_id = trial_id
        self.storage = SimpleNamespace(storage_filesystem=pyarrow.fs.SubTreeFileSystem(str(root),
                                                                                        pyarrow.fs.LocalFileSystem()))
        self._named = named
        (root / "s").mkdir(exist_ok=True)

    @property
    def path(self) -> str:
        if not self._named:  # as Tune's Trial before it names the trial's folder (when it first starts it)
            raise RuntimeError("Should not access `trial_fs_path` without setting `trial_dir_name`")
        return f"s/ncsn_{self.trial_id}"


def result(epoch: int, fid: float | None) -> dict:
    return {"epoch": epoch, **({} if fid is None else {"fid": fid}), "trial_id": "x"}


class Driver:
    """A driver of the sweep: reports go through its scheduler, then into the trial's result.json in storage (as
    Tune's JsonLoggerCallback writes it, synced with the sweep's state)."""

    def __init__(self, scheduler, trials: dict[str, StoredTrial], root):
        self.scheduler, self.trials, self.root = scheduler, trials, root

    def add(self, *ids: str) -> None:
        for i in ids:
            self.scheduler.on_trial_add(None, self.trials[i])

    def report(self, trial_id: str, epoch: int, fid: float | None) -> str:
        decision = self.scheduler.on_trial_result(None, self.trials[trial_id], result(epoch, fid))
        folder = self.root / "s" / f"ncsn_{trial_id}"
        folder.mkdir(exist_ok=True)
        with open(folder / "result.json", "a") as f:
            f.write(json.dumps(result(epoch, fid)) + "\n")
        return decision

    def rungs(self) -> str:
        """ASHA's rungs and their cut-offs, from its public debug string ('Bracket: Iter 4.000: None | ...')."""
        return re.search(r"(?m)^Bracket: .*$", self.scheduler.debug_string())[0]


def run_until_the_kill(tmp_path):
    """The first driver, from tuner.pkl's scheduler (pickled before any trial) to the kill: (tuner.pkl, trials,
    the rungs it had)."""
    tuner_pkl = pickle.dumps(asha_scheduler(SPEC))
    trials = {i: StoredTrial(i, tmp_path) for i in "abcd"}
    first = Driver(pickle.loads(tuner_pkl), trials, tmp_path)
    first.add("a", "b", "c", "d")
    assert all(first.report(*r) == TrialScheduler.CONTINUE for r in BEFORE)
    assert first.report("b", 3, None) == TrialScheduler.CONTINUE  # between milestones: no metric
    with open(tmp_path / "s" / "ncsn_b" / "result.json", "a") as f:
        f.write('{"epoch": 4, "fi')  # cut short by the kill
    return tuner_pkl, trials, first.rungs()


def uninterrupted_decision(tmp_path) -> str:
    """The same reports in the same order, one driver that saw them all."""
    (tmp_path / "twin").mkdir()
    twin = Driver(asha_scheduler(SPEC), {i: StoredTrial(i, tmp_path / "twin") for i in "abcd"}, tmp_path / "twin")
    twin.add("a", "b", "c", "d")
    for r in BEFORE + AFTER:
        twin.report(*r)
    return twin.report(*D_AT_2)


@pytest.mark.parametrize("restore_order", ["dcba", "abcd", "bdac"])
def test_a_resumed_sweeps_asha_has_the_rungs_the_first_driver_had(tmp_path, restore_order):
    """Whatever order Tune adds the restored trials in (by last report time), the rungs hold again every value the
    first driver had recorded, so the trial pending at the kill gets the decision of the uninterrupted sweep."""
    tuner_pkl, trials, rungs_at_the_kill = run_until_the_kill(tmp_path)
    resumed = Driver(pickle.loads(tuner_pkl), trials, tmp_path)
    assert type(resumed.scheduler) is ResumableASHA  # tuner.pkl names the class: importable from sweeps.tuner
    resumed.add(*restore_order)
    assert resumed.rungs() == rungs_at_the_kill and "Iter 2.000: -55.0" in rungs_at_the_kill
    assert all(resumed.report(*r) == TrialScheduler.CONTINUE for r in AFTER)
    assert resumed.report(*D_AT_2) == uninterrupted_decision(tmp_path) == TrialScheduler.CONTINUE


def test_tunes_own_asha_resumes_with_empty_rungs_and_stops_that_trial(tmp_path):
    """The bug: Ray's ASHAScheduler, restored from tuner.pkl, has none of the values recorded before the kill; D is
    compared with C alone at epoch 2 and stopped, where the uninterrupted sweep lets it go on."""
    _, trials, rungs_at_the_kill = run_until_the_kill(tmp_path)
    plain = ASHAScheduler(time_attr="epoch", metric=SPEC.metric, mode=SPEC.mode, max_t=SPEC.asha.max_t,
                          grace_period=SPEC.asha.grace_period, reduction_factor=SPEC.asha.reduction_factor)
    resumed = Driver(pickle.loads(pickle.dumps(plain)), trials, tmp_path)
    resumed.add("d", "c", "b", "a")
    assert resumed.rungs() == "Bracket: Iter 4.000: None | Iter 2.000: None | Iter 1.000: None" != rungs_at_the_kill
    assert all(resumed.report(*r) == TrialScheduler.CONTINUE for r in AFTER)
    assert resumed.report(*D_AT_2) == TrialScheduler.STOP != uninterrupted_decision(tmp_path)


def test_a_trial_without_stored_reports_adds_nothing(tmp_path):
    """A new trial (no folder named yet), one whose folder has no result.json, and Tune's own Trial without storage:
    the rungs stay empty, and the first report of each is decided as by Ray's ASHA."""
    from ray.tune.experiment import Trial

    scheduler = asha_scheduler(SPEC)
    new, unreported, bare = StoredTrial("n", tmp_path, named=False), StoredTrial("u", tmp_path), Trial("x", stub=True)
    for trial in (new, unreported, bare):
        scheduler.on_trial_add(None, trial)
    assert "Iter 1.000: None" in scheduler.debug_string() and "Iter 2.000: None" in scheduler.debug_string()
    assert [scheduler.on_trial_result(None, t, result(1, fid)) for t, fid in ((new, 5.0), (unreported, 9.0))] == [
        TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_an_epoch_reported_again_after_a_resume_warns_nothing(recwarn):
    """A resumed trial reports again an epoch Optuna already holds (a replayed report): no warning on stderr."""
    from ray import tune

    from sweeps.tuner import MilestoneOptunaSearch

    search = MilestoneOptunaSearch(metric="test_bpd", mode="min")
    search.set_search_properties("test_bpd", "min", {"model.beta": tune.uniform(0.1, 1.0)})
    assert search.suggest("t1")
    for _ in range(2):
        search.on_trial_result("t1", {"test_bpd": 8.0, "training_iteration": 2, "epoch": 2})
    assert not [w for w in recwarn if "already reported" in str(w.message)]
