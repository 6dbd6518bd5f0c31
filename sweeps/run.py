"""Run a hyperparameter sweep: Ray Tune + Optuna (TPE) + ASHA, one W&B run per trial, a leaderboard at the end.

    python sweeps/run.py --space vae --preset smoke
    python sweeps/run.py --space vae --fixed beta=4 --num-samples 1
    python sweeps/run.py --resume NAME
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

# The classic reporter prints one compact table with the columns we choose; the new engine prints every metric.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# FID is reported only at ASHA milestones (the fidelity ladder) and a diverged trial's last report has no ranking
# metric at all: both are intended, so Tune must not insist on the metric in every result.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# Every trial checkpoints every epoch by design (resumable sweeps); Tune's "snapshotting often" warning is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# A diverged trial's last report has no ranking metric (trainables/trainable.py); Tune's strict metric check would
# turn that one report into an error that ends the whole sweep.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
if not any(a.startswith("--address") for a in sys.argv) and not os.environ.get("RAY_ADDRESS"):
    # Local Ray on one machine: this makes Ray's node-IP lookup answer loopback instead of the external address
    # (read once when ray is imported, hence here before any import of ray).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from genmodels.data import DATASETS, load_images
from genmodels.engine import TrainConfig
from genmodels.errors import ResourceUnavailable, config_from_dict
from genmodels.registry import model_class
from sweeps import storage as sweep_storage
from sweeps.spaces import SPACES, Space

DATA_KEYS = {"dataset", "train_size", "test_size", "data_dir", "checkpoint"}
class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block first
        raise UsageError(f"{message} (see --help)")


def default_storage() -> Path:
    return Path(os.environ.get("GENSWEEP_RESULTS", Path.home() / "gensweep-runs"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="vae", help=f"search space: {', '.join(SPACES)} (default vae)")
    p.add_argument("--preset", default="auto", choices=["auto", "smoke", "full"],
                   help="budgets: smoke (tiny, CPU, minutes), full (paper scale, GPU); auto = full if a GPU is "
                        "visible, else smoke")
    p.add_argument("--dataset", choices=DATASETS, help="override the preset's dataset (smoke: synthetic, "
                                                        "full: cifar10)")
    p.add_argument("--data-dir", help="folder holding (or to download) the datasets; default ~/.cache/gensweep/data")
    p.add_argument("--num-samples", type=int, help="number of trials (default: the preset's)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials running at once (0 = as resources allow)")
    p.add_argument("--gpus-per-trial", type=_gpus_per_trial, default=None,
                   help="GPUs per trial, fractions allowed (0.25 = four trials share a GPU), or auto: measure one "
                        "trial's peak GPU memory and pack as many as fit (at most 8); default 1 if a GPU is "
                        "visible, else 0")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (host:port or 'auto'); default: $RAY_ADDRESS (set inside a Ray job), "
                        "else start Ray in-process")
    p.add_argument("--name", help="sweep name: W&B group and results folder (default SPACE-PRESET-TIME)")
    p.add_argument("--storage-path", help=f"results root, local path or s3:// / gs:// URI (default {default_storage()})")
    p.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler and of every trial (default 0)")
    p.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a hyperparameter or config value, e.g. --fixed beta=4 --fixed epochs=20 (repeatable)")
    p.add_argument("--metric", help="ranking metric, where the space offers a choice (e.g. vqvae: fid or rfid)")
    p.add_argument("--fid-network", choices=["inception", "standin"],
                   help="FID features: inception (TF 2015-12-05, comparable to papers; the full preset's) or standin "
                        "(a small fixed random network, only for smoke runs; the smoke preset's)")
    p.add_argument("--fid-weights", help="Inception weights file for offline machines (make one with "
                                         "`python -m genmodels.fid_weights --out PATH`); implies --fid-network "
                                         "inception")
    p.add_argument("--final-fid-samples", type=int, help="samples for the FID at the end of each completed trial "
                                                          "(full preset: 10000; 50000 to compare with papers)")
    p.add_argument("--checkpoint", help="a trained checkpoint (state.pt) to evaluate instead of training, for "
                                        "sampling-only spaces such as ncsn-sampling")
    p.add_argument("--vgg-weights", help="VGG-19 weights file for the DFC perceptual loss on offline machines")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "gensweep"), help="W&B project")
    p.add_argument("--wandb-entity", default=os.environ.get("WANDB_ENTITY"), help="W&B entity (user or team)")
    p.add_argument("--no-artifacts", action="store_true", help="do not log final checkpoints as W&B artifacts")
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME (under --storage-path)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.space not in SPACES:
        raise UsageError(f"unknown space {args.space!r}; choose one of {', '.join(SPACES)}")
    if args.final_fid_samples is not None and args.final_fid_samples < 2:
        raise UsageError(f"--final-fid-samples must be at least 2, got {args.final_fid_samples}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    gpus = 0 if args.gpus_per_trial in (None, "auto") else args.gpus_per_trial
    if args.max_concurrent < 0 or args.cpus_per_trial <= 0 or gpus < 0:
        raise UsageError("--max-concurrent, --cpus-per-trial and --gpus-per-trial must not be negative")
    return args


def _gpus_per_trial(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def parse_fixed(items: list[str]) -> dict[str, Any]:
    fixed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--fixed takes KEY=VALUE, got {item!r}")
        try:
            fixed[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            fixed[key] = raw  # bare strings such as arch=conv
    return fixed


def build_config(space: Space, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The param space of the sweep: searched domains, preset values, CLI overrides; checked key by key."""
    fixed = parse_fixed(args.fixed)
    config = {**space.params, **space.presets[preset].config, "model": space.model, "seed": args.seed}
    if args.dataset:
        config["dataset"] = args.dataset
    if args.data_dir:
        config["data_dir"] = str(Path(args.data_dir).expanduser().resolve())
    model_keys = {f.name for f in dataclasses.fields(model_class(space.model).Config)}
    if args.vgg_weights:
        if "vgg_weights" not in model_keys:
            raise UsageError(f"--vgg-weights applies to spaces with a perceptual loss, not {space.name!r}")
        config["vgg_weights"] = str(Path(args.vgg_weights).expanduser().resolve())
    if args.checkpoint:
        path = Path(args.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"--checkpoint {args.checkpoint} is not a file; pass a trial's checkpoint_*/state.pt")
        config["checkpoint"] = str(path)
    elif space.needs_checkpoint:
        raise UsageError(f"space {space.name!r} evaluates a trained model: pass --checkpoint PATH/state.pt")
    known = {f.name for f in dataclasses.fields(TrainConfig)} | DATA_KEYS | model_keys
    unknown = sorted(set(fixed) - known)
    if unknown:
        raise UsageError(f"--fixed {unknown[0]} is not a setting of space {space.name!r}; "
                         f"known: {', '.join(sorted(known))}")
    config.update(fixed)
    config_from_dict(TrainConfig, {k: v for k, v in config.items() if not _is_domain(v)})  # type errors now
    return config


def _is_domain(v: Any) -> bool:
    from ray.tune.search.sample import Domain

    return isinstance(v, Domain)


def load_data(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Loaded once here and shared with every trial through the Ray object store."""
    kw = dict(data_dir=config.get("data_dir"))
    return {"train": load_images(config["dataset"], "train", limit=config.get("train_size") or None, **kw),
            "test": load_images(config["dataset"], "test", limit=config.get("test_size") or None, **kw)}


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


def configure_wandb(args: argparse.Namespace) -> str:
    """W&B mode for every trial, decided before Ray starts so the workers inherit it."""
    from trainables.wandb_logging import is_logged_in

    if args.no_wandb:
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if is_logged_in() else "offline"


def init_ray(address: str | None, env: dict[str, str]) -> None:
    import ray

    runtime_env = {"env_vars": env}
    if address:
        check_address(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # One machine: keep Ray on loopback, so it neither depends on nor exposes the external interface.
        ray.init(include_dashboard=False, runtime_env=runtime_env, _node_ip_address="127.0.0.1")


def trial_name(trial) -> str:
    """Readable run names for the progress table and W&B: model, trial id, searched values."""
    from sweeps.leaderboard import short

    parts = [f"{k}={short(v)}" for k, v in getattr(trial, "evaluated_params", {}).items()]
    return "_".join([trial_dirname(trial), ",".join(parts)]) if parts else trial_dirname(trial)


def trial_dirname(trial) -> str:
    return f"{trial.config['model']}_{trial.trial_id}"


def _optuna_search_class():
    from ray.tune.search.optuna import OptunaSearch

    class MilestoneOptunaSearch(OptunaSearch):
        """OptunaSearch that passes over results without the ranking metric (FID exists only at ASHA milestones;
        a diverged trial has none); Optuna's intermediate values then hold only comparable points."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    return MilestoneOptunaSearch


def trial_resources(args: argparse.Namespace) -> dict[str, float]:
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else float(torch.cuda.is_available())
    return {"cpu": args.cpus_per_trial, "gpu": gpus}


def make_tuner(space: Space, preset: str, config: dict[str, Any], args: argparse.Namespace, data, storage: str,
               name: str, wandb_mode: str, metric: str, fid_plan, resume: bool = False):
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from trainables.trainable import TrialSettings, train_trial

    MilestoneOptunaSearch = _optuna_search_class()

    searched = [k for k, v in config.items() if _is_domain(v)]
    settings = TrialSettings(space=space.name, metric=metric, mode=space.mode, fid=fid_plan,
                             checkpoint_overrides=tuple(searched + list(parse_fixed(args.fixed))))
    callbacks = []
    if wandb_mode != "disabled":
        from trainables.wandb_logging import GensweepWandbCallback

        callbacks.append(GensweepWandbCallback(
            max_epochs=int(config["epochs"]), log_artifacts=not args.no_artifacts, project=args.wandb_project,
            entity=args.wandb_entity, group=name, job_type="trial",
            tags=[space.model, space.name, preset, str(config["dataset"])]))
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=data, settings=settings),
                                    trial_resources(args))
    if resume:
        # The saved tuner state holds the param space, searcher (Optuna history), scheduler and callbacks.
        return tune.Tuner.restore(sweep_storage.join(storage, name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    p = space.presets[preset]
    epochs = int(config["epochs"])
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=min(p.grace_period, epochs),
                              reduction_factor=p.reduction_factor)
    search_alg = MilestoneOptunaSearch(sampler=TPESampler(seed=args.seed)) if searched else None
    if search_alg and args.max_concurrent:
        search_alg = ConcurrencyLimiter(search_alg, max_concurrent=args.max_concurrent)
    # Not sorted by metric: Tune's sort fails on a trial whose last report has no metric (diverged, or between FID
    # milestones); the leaderboard at the end is ranked.
    reporter = tune.CLIReporter(metric_columns={metric: metric, "epoch": "epoch"},
                                parameter_columns=[k for k in config if _is_domain(config[k])], max_report_frequency=15)
    return tune.Tuner(
        trainable, param_space=config,
        tune_config=tune.TuneConfig(metric=metric, mode=space.mode, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=args.num_samples or p.num_samples,
                                    max_concurrent_trials=args.max_concurrent or None,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage, progress_reporter=reporter, verbose=1,
                                  callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=3),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  # The image grids trials write on any node reach storage every 5 minutes and when
                                  # the trial ends (not at every report: that would upload every grid again).
                                  sync_config=tune.SyncConfig(sync_artifacts=True,
                                                              sync_artifacts_on_checkpoint=False)))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (UsageError, ResourceUnavailable, ValueError) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    storage = sweep_storage.resolve(args.storage_path or str(default_storage()))
    if args.resume:
        sweep = read_sweep(storage, args.resume)
        # Trials that start after the resume get the resources the sweep started with, unless given again now
        # (a driver on a CPU-only head would otherwise default new trials to no GPU).
        resources = sweep.get("resources", {})
        kept = [f"--{flag}-per-trial={resources[key]}" for flag, key in [("cpus", "cpu"), ("gpus", "gpu")]
                if key in resources]
        args = parse_args([*kept, *args.argv])
        space, preset, config, name = SPACES[sweep["space"]], sweep["preset"], sweep["constants"], args.resume
        metric, fid = sweep["metric"], sweep["fid"]
    else:
        space = SPACES[args.space]
        preset = args.preset if args.preset != "auto" else ("full" if torch.cuda.is_available() else "smoke")
        config = build_config(space, preset, args)
        name = args.name or f"{space.name}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        metric, fid = resolve_metric(space, args.metric), resolve_fid(space, preset, args)
    if args.address and not args.resume and not torch.cuda.is_available() and (
            args.preset == "auto" or args.gpus_per_trial is None):
        # The defaults look at this machine, and a cluster's driver usually runs on a CPU-only head node.
        print("gensweep: note: this driver sees no GPU, so --preset auto means smoke and trials request no GPU "
              "by default; on a GPU cluster pass --preset full --gpus-per-trial 1 (or a fraction)")
    model = model_class(space.model)
    model.prepare(config)  # config checks and weights first: fail before loading data
    data = load_data(config)
    config.update(model.prepare(config, data["train"]))
    if args.gpus_per_trial == "auto":
        from sweeps.packing import auto_gpus_per_trial

        args.gpus_per_trial = auto_gpus_per_trial(space.model, config, data)
    plan = make_fid_plan(fid, data, config, space.presets[preset], metric)
    print(f"gensweep: space={space.name} preset={preset} model={space.model} dataset={config['dataset']} "
          f"(train {len(data['train'])}, test {len(data['test'])} images) ranking by {metric} ({space.mode}); "
          f"FID network: {fid['network']}" + ("" if fid["network"] == "inception" else
                                                " (smoke stand-in: not comparable to published FIDs)"))
    wandb_mode = configure_wandb(args)
    os.environ["WANDB_MODE"] = wandb_mode
    init_ray(args.address, {"WANDB_MODE": wandb_mode, "WANDB_SILENT": "true"})
    tuner = make_tuner(space, preset, config, args, data, storage, name, wandb_mode, metric, plan,
                       resume=bool(args.resume))
    if not args.resume:
        write_sweep(storage, name, space, preset, config, args, metric, fid)
    print(f"gensweep: if this driver stops, continue the sweep with: python sweeps/run.py --resume {name} "
          f"--storage-path {storage}" + (" --address ADDRESS" if args.address else ""))
    tuner.fit()

    from sweeps.leaderboard import local_rows, print_table

    print()
    print_table(local_rows(storage, name), metric, space.mode, title=f"Leaderboard of {name} (local results)")
    print(f"\nresults: {storage}/{name}")
    if wandb_mode == "offline":
        print(f"W&B runs were logged offline; upload them with `wandb sync {storage}/{name}/*/wandb/offline-run-*`")
    return 0


def resolve_metric(space: Space, requested: str | None) -> str:
    allowed = space.metrics or (space.metric,)
    if requested and requested not in allowed:
        raise UsageError(f"--metric {requested} is not offered by space {space.name!r}; choose {', '.join(allowed)}")
    return requested or space.metric


def resolve_fid(space: Space, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """FID settings of the sweep: the preset's budget, overridden by the CLI."""
    from sweeps.spaces import FID_BUDGETS

    budget = space.presets[preset].fid or FID_BUDGETS[preset]
    weights = str(Path(args.fid_weights).expanduser().resolve()) if args.fid_weights else None
    network = "inception" if weights else (args.fid_network or budget.network)
    return {"network": network, "weights_path": weights, "ladder": list(budget.ladder),
            "step_fractions": list(budget.step_fractions), "final": args.final_fid_samples or budget.final}


def make_fid_plan(fid: dict[str, Any], data: dict[str, torch.Tensor], config: dict[str, Any], preset,
                  metric: str):
    """Load the feature network here, once (a missing one fails now, in one line), and compute the test split's
    reference statistics (cached on disk) that every trial shares through the object store."""
    from genmodels.metrics.fid import FIDScorer
    from trainables.evaluation import FIDPlan, asha_milestones

    scorer = FIDScorer(fid["network"], fid["weights_path"])
    ref = scorer.reference(data["test"], key=f"{config['dataset']}-test")
    del scorer
    epochs = int(config["epochs"])
    milestones = asha_milestones(epochs, min(preset.grace_period, epochs), preset.reduction_factor)
    return FIDPlan(network=fid["network"], weights_path=fid["weights_path"], ref=ref, milestones=milestones,
                   ladder=tuple(fid["ladder"]), step_fractions=tuple(fid["step_fractions"]), final_n=fid["final"],
                   rank_by=metric if metric in ("fid", "rfid") else None)


def write_sweep(storage: str, name: str, space: Space, preset: str, config: dict[str, Any],
                args: argparse.Namespace, metric: str, fid: dict[str, Any]) -> None:
    constants = {k: v for k, v in config.items() if not _is_domain(v)}
    info = {"space": space.name, "preset": preset, "metric": metric, "mode": space.mode, "fid": fid,
            "constants": constants, "searched": [k for k, v in config.items() if _is_domain(v)],
            "resources": trial_resources(args), "argv": args.argv}
    sweep_storage.write_sweep_info(storage, name, info)


def read_sweep(storage: str, name: str) -> dict[str, Any]:
    try:
        return sweep_storage.read_sweep_info(storage, name)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
