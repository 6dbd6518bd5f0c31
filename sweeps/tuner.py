"""What a sweep assembles around the trainable: Ray on this machine or a cluster, the FID plan, Optuna's sampler,
ASHA, the W&B logger, and the Tuner that runs them (new, or restored for `--resume`)."""
from __future__ import annotations

import logging
import math
import re
import socket
from typing import Any

import torch

from sweeps import storage as sweep_storage
from sweeps.param_space import is_domain
from sweeps.spaces import FID_LADDERS, Space


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def check_address(address: str) -> None:
    """Fail in seconds, not minutes, when a host:port cluster address does not answer."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or address, int(port or 6379)), timeout=5).close()
    except (OSError, ValueError):
        raise UsageError(f"cannot reach a Ray cluster at {address}; start one with `ray start --head` "
                         f"or leave out --address to run locally") from None


def init_ray(address: str | None, env: dict[str, str]) -> None:
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory": noise on every start
    runtime_env = {"env_vars": env}
    # WARNING: Ray's and Tune's INFO lines (started, wrote results) say nothing the progress table does not.
    if address:
        check_address(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # One machine: keep Ray on loopback, so it neither depends on nor exposes the external interface.
        ray.init(include_dashboard=False, runtime_env=runtime_env, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)


def trial_name(trial) -> str:
    """Readable run names for the progress table and W&B: model, trial id, searched values."""
    from sweeps.leaderboard import short

    parts = [f"{k.split('.')[-1]}={short(v)}" for k, v in getattr(trial, "evaluated_params", {}).items()]
    return "_".join([trial_dirname(trial), ",".join(parts)]) if parts else trial_dirname(trial)


def trial_dirname(trial) -> str:
    from trainables.checkpoints import trial_dirname as dirname

    return dirname(trial.config["model_name"], trial.trial_id)


def _optuna_search_class():
    from ray.tune.search.optuna import OptunaSearch

    class MilestoneOptunaSearch(OptunaSearch):
        """OptunaSearch that passes over results without the ranking metric (FID exists only at ASHA milestones;
        a diverged trial has none); Optuna's intermediate values then hold only comparable points. A trial that
        ends without every objective (diverged) is recorded as pruned, not as a failed `tell`."""

        def _has_objectives(self, result: dict | None) -> bool:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            return bool(result) and all(m in result for m in metrics)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self._has_objectives(result):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            super().on_trial_complete(trial_id, result if self._has_objectives(result) else None, error)

    return MilestoneOptunaSearch


def check_gpus(gpus_per_trial: float, visible: int) -> None:
    """UsageError unless this machine can ever give a trial `gpus_per_trial` GPUs (a fraction needs one GPU)."""
    needed = math.ceil(gpus_per_trial)
    if needed > visible:
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g} needs {needed} GPU{'s' * (needed > 1)} per trial and "
                         f"this machine has {visible}: every trial would wait forever; pass --gpus-per-trial "
                         f"{min(visible, 1) if visible else 0} or run on a machine (or --address a cluster) with GPUs")


def trial_resources(cpus: float, gpus: float | None) -> dict[str, float]:
    return {"cpu": cpus, "gpu": gpus if gpus is not None else float(torch.cuda.is_available())}


def resolve_fid(space: Space, preset: str, network: str | None, weights: str | None,
                final_samples: int | None) -> dict[str, Any]:
    """FID settings of the sweep: the preset's ladder, overridden by the command line."""
    budget = space.presets[preset].fid or FID_LADDERS[preset]
    network = "inception" if weights else (network or budget.network)
    return {"network": network, "weights_path": weights, "ladder": list(budget.ladder),
            "step_fractions": list(budget.step_fractions), "final": final_samples or budget.final}


def make_fid_plan(fid: dict[str, Any], test_images: torch.Tensor, dataset: str, epochs: int, preset, metric: str):
    """Load the feature network here, once (a missing one fails now, in one line), and compute the test split's
    reference statistics (cached on disk) that every trial shares through the object store."""
    from genmodels.metrics.fid import FIDScorer
    from trainables.evaluation import FIDPlan, asha_milestones

    scorer = FIDScorer(fid["network"], fid["weights_path"])
    ref = scorer.reference(test_images, key=f"{dataset}-test")
    del scorer
    milestones = asha_milestones(epochs, min(preset.grace_period, epochs), preset.reduction_factor)
    return FIDPlan(network=fid["network"], weights_path=fid["weights_path"], ref=ref, milestones=milestones,
                   ladder=tuple(fid["ladder"]), step_fractions=tuple(fid["step_fractions"]), final_n=fid["final"],
                   rank_by=metric if metric in ("fid", "rfid") else None, rfid=fid.get("rfid", True))


def sweep_reporter(results: str, mode: str, **kwargs: Any):
    """Tune's CLIReporter, saying where the results are (not the driver's staging folder) and showing ASHA's rung
    cut-offs as the metric reads: ASHA negates a metric that is minimised, and its debug string shows that."""
    import contextlib
    import io

    from ray import tune

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

    return SweepReporter(**kwargs)


def make_tuner(space: Space, preset: str, param_space: dict[str, Any], data, storage: str, name: str, *,
               metric: str, fid_plan, resources: dict[str, float], num_samples: int, max_concurrent: int,
               seed: int, callbacks: list, objectives: tuple[str, ...] = (), resume: bool = False):
    """The Tuner of a sweep. With several `objectives`, Optuna's multi-objective TPE gets every one of them, and
    ASHA stops trials on the first (`metric`): early stopping needs one ranking at a rung, and ASHA's cut (the
    bottom of a rung on that objective) is principled on its own; the Pareto front is drawn from the trials that
    ran on."""
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from trainables.checkpoints import TrialEndRecorder
    from trainables.trainable import SweepContext, train_trial

    folder = sweep_storage.join(storage, name)
    sweep = SweepContext(space=space.name, metric=metric, mode=space.mode, fid=fid_plan, folder=folder)
    callbacks = [*callbacks, TrialEndRecorder(folder)]
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, sweep=sweep), resources)
    if resume:
        # The saved tuner state holds the param space, searcher (Optuna history), scheduler, every trial's config
        # and the callbacks the sweep started with.
        return tune.Tuner.restore(sweep_storage.join(storage, name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    p = space.presets[preset]
    epochs = int(param_space["train.epochs"])
    # ASHA counts epochs as the trial reports them: Tune's training_iteration restarts from its own (possibly older)
    # checkpoint after a resume, and decisions must stay on the epoch milestones the FID ladder uses.
    scheduler = ASHAScheduler(time_attr="epoch", metric=metric, mode=space.mode, max_t=epochs,
                              grace_period=min(p.grace_period, epochs), reduction_factor=p.reduction_factor)
    searched = [k for k, v in param_space.items() if is_domain(v)]
    objectives = tuple(objectives) or (metric,)
    search_alg = _optuna_search_class()(
        metric=list(objectives) if len(objectives) > 1 else metric,
        mode=[space.mode] * len(objectives) if len(objectives) > 1 else space.mode,
        sampler=TPESampler(seed=seed)) if searched else None
    if search_alg and max_concurrent:
        search_alg = ConcurrencyLimiter(search_alg, max_concurrent=max_concurrent)
    # Not sorted by metric: Tune's sort fails on a trial whose last report has no metric (diverged, or between FID
    # milestones); the leaderboard at the end is ranked.
    reporter = sweep_reporter(folder, space.mode, metric_columns={**{m: m for m in objectives}, "epoch": "epoch"},
                              parameter_columns={k: k.split(".")[-1] for k in searched}, max_report_frequency=15)
    return tune.Tuner(
        trainable, param_space=param_space,
        # The scheduler and the searcher carry their own metrics (the searcher may have several).
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples,
                                    # the ConcurrencyLimiter holds it when there is a searcher
                                    max_concurrent_trials=None if search_alg else max_concurrent or None,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage, progress_reporter=reporter, verbose=1,
                                  callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=3),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  # The image grids trials write on any node reach storage every 5 minutes and when
                                  # the trial ends (not at every report: that would upload every grid again).
                                  sync_config=tune.SyncConfig(sync_artifacts=True,
                                                              sync_artifacts_on_checkpoint=False)))
