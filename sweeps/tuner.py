"""The Tuner of a sweep, new or restored for `--resume`, assembled from its `SweepSpec`: the trainable with its FID
plan, Optuna's TPE sampler, ASHA on the spec's milestones, the progress table and the trial-end recorder."""
from __future__ import annotations

import contextlib
import io
import re
import warnings
from typing import TYPE_CHECKING, Any

import torch
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from genmodels.metrics.fid import FIDScorer
from sweeps import progress
from sweeps import storage as sweep_storage
from sweeps.batched_asha import BatchedASHA, stored_results
from sweeps.rows import short
from sweeps.spec import SweepSpec
from trainables import checkpoints
from trainables.driver_clock import clocked
from trainables.evaluation import FIDPlan
from trainables.trainable import TrialPlan, train_trial

if TYPE_CHECKING:
    from sweeps.warm_start import WarmStart


def trial_name(trial) -> str:
    """Readable run names for the progress table and W&B: model, trial id, searched values."""
    parts = [f"{k.split('.')[-1]}={short(v)}" for k, v in getattr(trial, "evaluated_params", {}).items()]
    return "_".join([trial_dirname(trial), ",".join(parts)]) if parts else trial_dirname(trial)


def trial_dirname(trial) -> str:
    """The trial's folder in the sweep (Tune's saved state names this function: sweeps started earlier resume)."""
    return checkpoints.trial_dirname(trial.config["model_name"], trial.trial_id)


@clocked
class MilestoneOptunaSearch(OptunaSearch):
    """OptunaSearch that passes over results without the ranking metric (FID exists only at ASHA milestones; a
    diverged trial has none); Optuna's intermediate values then hold only comparable points. A trial that ends
    without every objective (diverged) is recorded as pruned, not as a failed `tell`."""

    def _has_objectives(self, result: dict | None) -> bool:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        return bool(result) and all(m in result for m in metrics)

    def suggest(self, trial_id: str) -> dict | None:  # here to be clocked: TPE's cost grows with the study
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._has_objectives(result):
            with warnings.catch_warnings():
                # a resumed trial reports again an epoch Optuna's history may hold (a replayed report): Optuna keeps
                # the value it has and warns "The reported value is ignored because this step ... is already
                # reported", which says nothing wrong
                warnings.filterwarnings("ignore", message=".*is already reported", category=UserWarning)
                super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result if self._has_objectives(result) else None, error)


def make_fid_plan(spec: SweepSpec, test_images: torch.Tensor, dataset: str) -> FIDPlan:
    """Load the feature network here, once (a missing one fails now, in one line), and compute the test split's
    reference statistics (cached on disk) that every trial shares through the object store. The ladder is read
    at the spec's milestones: ASHA's rungs, from the same settings as the scheduler's."""
    fid = spec.fid
    scorer = FIDScorer(fid.network, fid.weights_path)
    ref = scorer.reference(test_images, key=f"{dataset}-test")
    del scorer
    # FID on the ladder when any objective is an FID: every trial that reaches a milestone then has one
    rank_by = next((m for m in spec.objectives if m in ("fid", "rfid")), None)
    return FIDPlan(network=fid.network, weights_path=fid.weights_path, ref=ref, milestones=spec.milestones,
                   ladder=fid.ladder, step_fractions=fid.step_fractions, final_n=fid.final, rank_by=rank_by,
                   rfid=fid.rfid)


@clocked
class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive `--resume`. Tune does not save the scheduler with the sweep's state (only the
    searcher and the callbacks; the scheduler comes back from tuner.pkl, pickled when the Tuner was made, with empty
    rungs), so a restored ASHA would compare a trial reaching a milestone only with those that reached it after the
    resume. Here each trial Tune adds has its own stored reports (result.json in its folder in storage) passed
    through ASHA again, in order, decisions ignored: ASHA records a trial's value at each milestone it reaches, once,
    so the rungs hold again what the first driver had recorded, whatever order the trials come back in. A new trial
    (no folder yet, or no result.json) adds nothing; a line that does not parse (cut short by a crash) is passed
    over. Reports the driver never synced to storage are not in result.json; a resumed trial reports those again
    itself. Same constructor as ASHAScheduler; the "num_stopped" of the debug string counts the replayed stops."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        for result in stored_results(trial):
            super().on_trial_result(tune_controller, trial, result)


def asha_scheduler(spec: SweepSpec) -> ResumableASHA | BatchedASHA:
    # ASHA counts epochs as the trial reports them: Tune's training_iteration restarts from its own (possibly older)
    # checkpoint after a resume, and decisions must stay on the epoch milestones the FID ladder uses.
    if spec.reproducible:
        return BatchedASHA("epoch", spec.metric, spec.mode, spec.asha.max_t, spec.milestones,
                           spec.asha.reduction_factor, batch_size=spec.max_concurrent or 1)
    return ResumableASHA(time_attr="epoch", metric=spec.metric, mode=spec.mode, max_t=spec.asha.max_t,
                         grace_period=spec.asha.grace_period, reduction_factor=spec.asha.reduction_factor)


def sweep_reporter(results: str, mode: str, **kwargs: Any) -> tune.CLIReporter:
    """Tune's CLIReporter, saying where the results are (not the driver's staging folder) and showing ASHA's rung
    cut-offs as the metric reads: ASHA negates a metric that is minimised, and its debug string shows that."""
    class SweepReporter(tune.CLIReporter):
        def report(self, trials, done: bool, *sys_info: str) -> None:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                super().report(trials, done, *sys_info)
            text = re.sub(r"(?m)^Result logdir: .*$", f"Results: {results} (image grids: <trial>/images/)",
                          out.getvalue())
            if mode == "min":  # "Iter 2.000: -7.6" means a cut-off at 7.6
                text = re.sub(r"(?m)^Bracket: .*$", lambda line: re.sub(
                    r"(Iter [\d.]+: )(-?)(\d)", lambda m: m[1] + ("" if m[2] else "-") + m[3], line[0]), text)
            print(text, end="", flush=True)
            if (line := progress.tally.line()) and not done:
                print(line, flush=True)

    return SweepReporter(**kwargs)


def _trainable(spec: SweepSpec, data: dict[str, torch.Tensor], fid_plan: FIDPlan | None, folder: str):
    plan = TrialPlan(spec.metric, spec.mode, fid_plan, spec.milestones, spec.checkpoint_every_s, spec.objectives)
    return tune.with_resources(tune.with_parameters(train_trial, data=data, plan=plan, folder=folder),
                               dict(spec.resources))


def restorable(storage: str, name: str) -> bool:
    """Whether Tune saved the sweep's state (a driver killed in its first seconds leaves only gensweep's file)."""
    return tune.Tuner.can_restore(sweep_storage.join(storage, name))


def restore_tuner(spec: SweepSpec, data: dict[str, torch.Tensor], fid_plan: FIDPlan | None,
                  storage: str) -> tune.Tuner:
    """The Tuner of an interrupted sweep. Tune's saved state holds the param space, the searcher (Optuna's
    history), the scheduler, every trial's config and the callbacks the sweep started with."""
    folder = sweep_storage.join(storage, spec.name)
    return tune.Tuner.restore(folder, trainable=_trainable(spec, data, fid_plan, folder), resume_unfinished=True,
                              resume_errored=True)


def search_algorithm(spec: SweepSpec, warm: WarmStart | None = None):
    """Optuna's TPE (multi-objective with several objectives), None when nothing is searched. A warm start
    (sweeps/warm_start.py) hands it a study that already holds the told trials, or the points to run first."""
    if not spec.searched:
        return None
    multi = len(spec.objectives) > 1
    warm_args: dict[str, Any] = {}
    if warm and warm.told:
        warm_args = {"storage": warm.study_storage(spec, spec.name), "study_name": spec.name}
    elif warm and warm.rerun:
        warm_args = {"points_to_evaluate": [dict(p) for p in warm.rerun]}
    search_alg = MilestoneOptunaSearch(metric=list(spec.objectives) if multi else spec.metric,
                                       mode=[spec.mode] * len(spec.objectives) if multi else spec.mode,
                                       sampler=TPESampler(seed=spec.seed), **warm_args)
    if not spec.max_concurrent:
        return search_alg
    # --reproducible: the next batch is suggested when the whole previous one has ended (sweeps/batched_asha.py)
    return ConcurrencyLimiter(search_alg, max_concurrent=spec.max_concurrent, batch=spec.reproducible)


def make_tuner(spec: SweepSpec, data: dict[str, torch.Tensor], fid_plan: FIDPlan | None, callbacks: list,
               storage: str, warm: WarmStart | None = None) -> tune.Tuner:
    """The Tuner of a new sweep. With several objectives, Optuna's multi-objective TPE gets every one of them, and
    ASHA stops trials on the first (`spec.metric`): early stopping needs one ranking at a rung, and ASHA's cut (the
    bottom of a rung on that objective) is principled on its own; the Pareto front is drawn from the trials that
    ran on."""
    folder = sweep_storage.join(storage, spec.name)
    search_alg = search_algorithm(spec, warm)
    # Not sorted by metric: Tune's sort fails on a trial whose last report has no metric (diverged, or between FID
    # milestones); the leaderboard at the end is ranked.
    reporter = sweep_reporter(folder, spec.mode, metric_columns={**{m: m for m in spec.objectives}, "epoch": "epoch"},
                              parameter_columns={k: k.split(".")[-1] for k in spec.searched}, max_report_frequency=30)
    return tune.Tuner(
        _trainable(spec, data, fid_plan, folder), param_space=spec.param_space,
        # The scheduler and the searcher carry their own metrics (the searcher may have several).
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=asha_scheduler(spec),
                                    num_samples=spec.num_samples,
                                    # the ConcurrencyLimiter holds it when there is a searcher
                                    max_concurrent_trials=None if search_alg else spec.max_concurrent or None,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_dirname,
                                    # A finished trial's process runs the next one: no new process to start, no
                                    # torch import, dataset fetch or feature network load per trial (each trial
                                    # seeds itself and builds its own model, optimizer and CUDA graphs).
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, progress_reporter=reporter, verbose=1,
                                  callbacks=[*callbacks, checkpoints.TrialEndRecorder(folder),
                                             progress.ProgressTally()],
                                  failure_config=tune.FailureConfig(max_failures=3),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  # The image grids trials write on any node reach storage every 5 minutes and when
                                  # the trial ends (not at every report: that would upload every grid again).
                                  sync_config=tune.SyncConfig(sync_artifacts=True,
                                                              sync_artifacts_on_checkpoint=False)))
