"""Run a hyperparameter sweep: Ray Tune + Optuna (TPE) + ASHA, one W&B run per trial, a leaderboard at the end.

    python sweeps/run.py --space vae --preset smoke
    python sweeps/run.py --space vae --fixed beta=4 --num-samples 1
    python sweeps/run.py --resume NAME

Every value is checked before Ray starts: bad input gets one line and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genmodels.config import ConfigError  # noqa: E402
from genmodels.errors import ResourceUnavailable  # noqa: E402
from sweeps.storage import default_storage  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block first
        from sweeps.tuner import UsageError

        raise UsageError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from genmodels.config import DATASETS
    from sweeps.spaces import SPACES
    from sweeps.tuner import UsageError

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
    p.add_argument("--storage-path",
                   help=f"results root, local path or s3:// / gs:// URI (default {default_storage()})")
    p.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler and of every trial (default 0)")
    p.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="pin a hyperparameter or config value, e.g. --fixed beta=4 --fixed epochs=20 (repeatable; "
                        "section.field keys such as model.beta or train.epochs work too)")
    p.add_argument("--metric", help="ranking metric, where the space offers a choice (e.g. vqvae: fid or rfid; "
                                    "vae: test_bpd, test_iwae_bpd or fid)")
    p.add_argument("--objectives", metavar="M1,M2",
                   help="search several ranking metrics at once (e.g. fid,test_iwae_bpd): Optuna's multi-objective "
                        "TPE gets all, ASHA stops trials on the first, the leaderboard shows the Pareto front")
    p.add_argument("--seed-defaults", action="store_true",
                   help="pin every searched value to the seed project's own configuration (one trial by default), "
                        "to compare a sweep with it at the same preset; --fixed still overrides")
    p.add_argument("--no-rfid", action="store_true",
                   help="skip the reconstruction FID at the end of each trial (it doubles the Inception cost); "
                        "not with --metric rfid")
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
    if args.max_concurrent < 0:
        raise UsageError(f"--max-concurrent must not be negative, got {args.max_concurrent}")
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial must be more than 0, got {args.cpus_per_trial:g}")
    if isinstance(args.gpus_per_trial, float) and args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must not be negative, got {args.gpus_per_trial:g}")
    return args


def _gpus_per_trial(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from sweeps.ray_env import configure_environment

    configure_environment(local=not any(a.startswith("--address") for a in argv) and not os.environ.get("RAY_ADDRESS"))
    from sweeps.tuner import UsageError

    try:
        return _main(argv)
    except (UsageError, ConfigError, ResourceUnavailable) as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2


@dataclasses.dataclass
class Sweep:
    """A sweep as the driver runs it: new from the command line, or read back from storage for --resume."""
    space: Any  # sweeps.spaces.Space
    preset: str
    name: str
    param_space: dict[str, Any]  # flat section.field keys; search domains for a new sweep, constants on resume
    metric: str  # what ASHA stops on and the leaderboard ranks by: the first objective
    fid: dict[str, Any]
    objectives: tuple[str, ...] = ()  # with --objectives: every metric Optuna optimises


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def resolve_sweep(args: argparse.Namespace, storage: str) -> tuple[Sweep, argparse.Namespace]:
    """The sweep to run and the arguments it runs with; UsageError (one line) for a name that is unsafe, in use,
    or (with --resume) unknown."""
    import torch

    from sweeps import param_space as ps
    from sweeps.spaces import SPACES
    from sweeps.tuner import UsageError, resolve_fid

    if args.resume:
        info = read_sweep(storage, args.resume)
        # Trials that start after the resume get the resources the sweep started with, unless given again now
        # (a driver on a CPU-only head would otherwise default new trials to no GPU).
        resources = info.get("resources", {})
        kept = [f"--{flag}-per-trial={resources[key]}" for flag, key in [("cpus", "cpu"), ("gpus", "gpu")]
                if key in resources]
        args = parse_args([*kept, *args.argv])
        return Sweep(SPACES[info["space"]], info["preset"], args.resume, info["param_space_constants"],
                     info["metric"], info["fid"], tuple(info.get("objectives", ()))), args
    space = SPACES[args.space]
    preset = args.preset if args.preset != "auto" else ("full" if torch.cuda.is_available() else "smoke")
    name = args.name or f"{space.name}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not SAFE_NAME.fullmatch(name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, not starting with "
                         f"'.' or '-'), so the printed --resume and wandb sync commands can be pasted as they are")
    if sweep_exists(storage, name):
        raise UsageError(f"a sweep named {name!r} already exists under {storage}; continue it with --resume {name}, "
                         f"or start a new one with another --name")
    fixed = {**(space.seed_defaults if args.seed_defaults else {}), **ps.parse_fixed(args.fixed)}
    param_space = ps.build_param_space(space, preset, fixed, cli_overrides(space, args), args.seed)
    if args.seed_defaults and args.num_samples is None:
        args.num_samples = 1  # nothing is left to search
    fid = resolve_fid(space, preset, args.fid_network, _path(args.fid_weights), args.final_fid_samples)
    objectives = tuple(resolve_metric(space, m.strip()) for m in args.objectives.split(",")) if args.objectives \
        else ()
    if objectives and (len(set(objectives)) < 2 or args.metric):
        raise UsageError("--objectives takes two or more different metrics, and replaces --metric (the first "
                         "objective is the one ASHA stops on)")
    metric = objectives[0] if objectives else resolve_metric(space, args.metric)
    if args.no_rfid and "rfid" in (metric, *objectives):
        raise UsageError("--no-rfid leaves nothing to rank by with --metric rfid; drop one of them")
    fid["rfid"] = not args.no_rfid
    return Sweep(space, preset, name, param_space, metric, fid, objectives), args


def _main(argv: list[str]) -> int:
    import torch

    from genmodels.registry import model_class, trial_config
    from sweeps import param_space as ps
    from sweeps import storage as sweep_storage
    from sweeps.tuner import UsageError, check_gpus, make_fid_plan

    args = parse_args(argv)
    storage = sweep_storage.resolve(args.storage_path or str(default_storage()))
    try:
        sweep_storage.check_writable(storage)
    except OSError as e:
        raise UsageError(str(e)) from None
    sweep, args = resolve_sweep(args, storage)
    space, param_space, metric, fid = sweep.space, sweep.param_space, sweep.metric, sweep.fid
    if args.address and not args.resume and not torch.cuda.is_available() and (
            args.preset == "auto" or args.gpus_per_trial is None):
        # The defaults look at this machine, and a cluster's driver usually runs on a CPU-only head node.
        print("gensweep: note: this driver sees no GPU, so --preset auto means smoke and trials request no GPU "
              "by default; on a GPU cluster pass --preset full --gpus-per-trial 1 (or a fraction)")
    if not args.address and isinstance(args.gpus_per_trial, float):
        check_gpus(args.gpus_per_trial, torch.cuda.device_count())
    point = trial_config(ps.representative(param_space))
    model = model_class(space.model)
    model.prepare(point)  # checks and weights first: fail before loading data
    data = load_data(point.data)
    param_space.update({f"model.{k}": v for k, v in model.prepare(point, data["train"]).items()})
    if args.gpus_per_trial == "auto":
        from sweeps.packing import auto_gpus_per_trial

        args.gpus_per_trial = auto_gpus_per_trial(space.model, param_space, data)
    epochs = point.train.epochs
    # FID on the ladder when any objective is an FID: every trial that reaches a milestone then has one
    fid_ranked = next((m for m in (metric, *sweep.objectives) if m in ("fid", "rfid")), metric)
    plan = make_fid_plan(fid, data["test"], point.data.dataset, epochs, space.presets[sweep.preset], fid_ranked)
    print(f"gensweep: space={space.name} preset={sweep.preset} model={space.model} dataset={point.data.dataset} "
          f"(train {len(data['train'])}, test {len(data['test'])} images) ranking by {metric} ({space.mode}); "
          f"FID network: {fid['network']}" + ("" if fid["network"] == "inception" else
                                                " (smoke stand-in: not comparable to published FIDs)"))
    lock = sweep_storage.SweepLock(storage, sweep.name)
    try:
        lock.acquire()
    except OSError as e:
        raise UsageError(str(e)) from None
    try:
        return run_locked(sweep, args, storage, data, plan, epochs)
    finally:
        lock.release()


def run_locked(sweep: Sweep, args: argparse.Namespace, storage: str, data, plan, epochs: int) -> int:
    """Start Ray, run (or resume) the sweep, print the leaderboard; the exit code says how it ended."""
    from sweeps import param_space as ps
    from sweeps.tuner import init_ray, make_tuner, trial_resources

    space, name, metric, param_space = sweep.space, sweep.name, sweep.metric, sweep.param_space
    wandb_mode = configure_wandb(args)
    os.environ["WANDB_MODE"] = wandb_mode
    resources = trial_resources(args.cpus_per_trial, args.gpus_per_trial)
    init_ray(args.address, {"WANDB_MODE": wandb_mode, "WANDB_SILENT": "true"})
    if args.address and resources["gpu"]:
        warn_if_no_node_has_the_gpus(resources["gpu"])
    callbacks = wandb_callbacks(args, wandb_mode, name, space, sweep.preset, str(param_space.get("data.dataset")),
                                epochs, metric)
    tuner = make_tuner(space, sweep.preset, param_space, data, storage, name, metric=metric, fid_plan=plan,
                       resources=resources, num_samples=args.num_samples or space.presets[sweep.preset].num_samples,
                       max_concurrent=args.max_concurrent, seed=args.seed, callbacks=callbacks,
                       objectives=sweep.objectives, resume=bool(args.resume))
    warn_if_asha_is_serial(space.presets[sweep.preset].reduction_factor, resources,
                           args.num_samples or space.presets[sweep.preset].num_samples, args.max_concurrent)
    if not args.resume:
        write_sweep(storage, name, {
            "space": space.name, "preset": sweep.preset, "metric": metric, "objectives": list(sweep.objectives),
            "mode": space.mode, "fid": sweep.fid,
            "max_epochs": epochs, "param_space_constants": ps.constants(param_space),
            "searched": ps.searched_keys(param_space), "fixed": ps.parse_fixed(args.fixed), "resources": resources,
            "argv": args.argv})
    resume = f"python sweeps/run.py --resume {name} --storage-path {shlex.quote(storage)}" + (
        f" --address {shlex.quote(args.address)}" if args.address else "")
    print(f"gensweep: if this driver stops, continue the sweep with: {resume}")
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C while Tune saves its state: stop now, resume from what is saved
        interrupted = True
    finally:
        from trainables.wandb_logging import WandbLogger

        # every logger in this process: on --resume, Tune runs the one restored with the sweep, not ours
        WandbLogger.close_all(timeout_s=10)

    from sweeps.leaderboard import local_rows, print_front, print_table

    rows = local_rows(storage, name)
    print()
    if sweep.objectives:
        print_front(rows, list(sweep.objectives), space.mode)
        log_front_to_wandb(rows, sweep, args, wandb_mode, storage)
    print_table(rows, metric, space.mode, title=f"Leaderboard of {name} (local results)")
    print(f"\nresults: {storage}/{name} (image grids: {storage}/{name}/<trial>/images/)")
    if wandb_mode == "offline":
        print(f"W&B runs were logged offline; upload them with `wandb sync {shlex.quote(storage)}/{name}/*/wandb/"
              f"offline-run-*`")
    return exit_status(rows, interrupted, resume)


def log_front_to_wandb(rows: list[dict[str, Any]], sweep: Sweep, args: argparse.Namespace, wandb_mode: str,
                       storage: str) -> None:
    """The Pareto front as a table in a W&B run of its own, in the sweep's group."""
    if wandb_mode == "disabled":
        return
    import wandb

    from sweeps.leaderboard import pareto_front

    front, where = pareto_front(rows, list(sweep.objectives), sweep.space.mode)
    keys = sorted({k for r in front for k in r["params"]})
    table = wandb.Table(columns=["trial", *sweep.objectives, *keys],
                        data=[[r["trial"], *[r["objectives"][m]["value"] for m in sweep.objectives],
                               *[r["params"].get(k) for k in keys]] for r in front])
    from sweeps.storage import is_uri

    folder = None if is_uri(storage) else f"{storage}/{sweep.name}"  # beside the trials' runs, for `wandb sync`
    run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, group=sweep.name, job_type="pareto",
                     dir=folder, name=f"{sweep.name}-pareto-front", reinit="create_new",
                     config={"objectives": list(sweep.objectives), "compared": where})
    run.log({"pareto_front": table})
    run.finish()


def warn_if_no_node_has_the_gpus(gpus_per_trial: float) -> None:
    """On a cluster, say so when no live node offers a trial's GPUs: its trials wait until such a node joins, which
    an autoscaling cluster whose config has that node type will add, and any other cluster never will."""
    import math

    import ray

    needed = math.ceil(gpus_per_trial)
    most = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if most < needed:
        print(f"gensweep: warning: --gpus-per-trial {gpus_per_trial:g} needs a node with {needed} GPU(s) and no node "
              f"of this cluster has them now (most: {most:g}); trials wait until one joins (an autoscaler adds one "
              f"only if a node type in the cluster's config offers them). Ctrl-C and pass a smaller "
              f"--gpus-per-trial if none will.")


def warn_if_asha_is_serial(reduction_factor: int, resources: dict[str, float], num_samples: int,
                           max_concurrent: int) -> None:
    """Say so when fewer trials run at once than ASHA's reduction factor: an asynchronous rung then compares a trial
    with the few that happened to report before it, so its cuts depend on arrival order."""
    import ray

    if not ray.is_initialized():
        return
    available = ray.cluster_resources()
    limits = [num_samples, max_concurrent or num_samples,
              int(available.get("CPU", 0) // resources["cpu"]) if resources["cpu"] else num_samples]
    if resources["gpu"]:
        limits.append(int(available.get("GPU", 0) // resources["gpu"]))
    at_once = max(1, min(limits))
    if at_once < reduction_factor:
        print(f"gensweep: warning: {at_once} trial(s) at a time, fewer than ASHA's reduction factor "
              f"{reduction_factor}: its early cuts then depend on which trials reported first. Run more at once "
              f"(pack trials on a GPU with --gpus-per-trial 0.5, fewer --cpus-per-trial, or a cluster); see README, "
              f"'One GPU'.")


def exit_status(rows: list[dict[str, Any]], interrupted: bool, resume: str) -> int:
    """0 when at least one trial completed; 130 when the sweep was interrupted (unfinished trials); 1 when no
    trial completed. The last line says why."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    unfinished = sum(counts.get(s, 0) for s in ("running", "pending", "paused", "no result"))
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    if interrupted or unfinished:
        print(f"gensweep: interrupted ({summary}); continue with: {resume}")
        return 130
    if not any(row["status"] in ("completed", "stopped (ASHA)") for row in rows):
        print(f"gensweep: no trial completed ({summary or 'no trials'}); see the errors above")
        return 1
    return 0


def cli_overrides(space, args: argparse.Namespace) -> dict[str, Any]:
    """Config values that flags other than --fixed set: data, weights files, the checkpoint to evaluate."""
    from genmodels.registry import model_class
    from sweeps.tuner import UsageError

    overrides: dict[str, Any] = {}
    if args.dataset:
        overrides["data.dataset"] = args.dataset
    if args.data_dir:
        overrides["data.data_dir"] = _path(args.data_dir)
    if args.vgg_weights:
        if not hasattr(model_class(space.model).Config, "vgg_weights"):
            raise UsageError(f"--vgg-weights applies to spaces with a perceptual loss, not {space.name!r}")
        overrides["model.vgg_weights"] = _path(args.vgg_weights)
    if args.checkpoint:
        path = Path(args.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"--checkpoint {args.checkpoint} is not a file; pass a trial's checkpoint_*/state.pt")
        check_checkpoint(path, space.model)
        overrides["checkpoint"] = str(path)
    elif space.needs_checkpoint:
        raise UsageError(f"space {space.name!r} evaluates a trained model: pass --checkpoint PATH/state.pt")
    return overrides


def check_checkpoint(path: Path, model_name: str) -> None:
    """UsageError (one line) unless `path` loads (weights only) as a finished run of `model_name` with a config that
    this version reads: checked here, once, not in every trial."""
    from genmodels.engine import load_checkpoint
    from genmodels.registry import trial_config
    from sweeps.tuner import UsageError

    try:
        state = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - truncated, garbage, or not weights-only: one line, whatever it was
        raise UsageError(f"--checkpoint {path} cannot be read as a gensweep checkpoint ({type(e).__name__}); pass "
                         f"a trial's checkpoint_*/state.pt") from None
    found = state.get("model_name") if isinstance(state, dict) else None
    if found != model_name or "config" not in state:
        raise UsageError(f"--checkpoint {path} holds {'a ' + repr(found) + ' model' if found else 'no gensweep run'}; "
                         f"this space evaluates {model_name} checkpoints")
    try:
        trial_config(state["config"])
    except ConfigError as e:
        raise UsageError(f"--checkpoint {path}: its config does not load ({e})") from None


def _path(text: str | None) -> str | None:
    return str(Path(text).expanduser().resolve()) if text else None


def load_data(data) -> dict[str, Any]:
    """Loaded once here and shared with every trial through the Ray object store."""
    from genmodels.data import load_images

    return {split: load_images(data.dataset, split, data.data_dir or None,
                               limit=(data.train_size if split == "train" else data.test_size) or None)
            for split in ("train", "test")}


def configure_wandb(args: argparse.Namespace) -> str:
    """W&B mode for every trial, decided before Ray starts so the workers inherit it."""
    from trainables.wandb_logging import is_logged_in

    if args.no_wandb:
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if is_logged_in() else "offline"


def wandb_callbacks(args: argparse.Namespace, wandb_mode: str, name: str, space, preset: str, dataset: str,
                    epochs: int, metric: str) -> list:
    if wandb_mode == "disabled":
        return []
    from trainables.wandb_logging import WandbLogger

    return [WandbLogger(project=args.wandb_project, entity=args.wandb_entity, group=name,
                        tags=[space.model, space.name, preset, dataset], max_epochs=epochs,
                        log_artifacts=not args.no_artifacts, metric=metric)]


def resolve_metric(space, requested: str | None) -> str:
    from sweeps.tuner import UsageError

    allowed = space.metrics or (space.metric,)
    if requested and requested not in allowed:
        raise UsageError(f"--metric {requested} is not offered by space {space.name!r}; choose {', '.join(allowed)}")
    return requested or space.metric


def sweep_exists(storage: str, name: str) -> bool:
    from sweeps import storage as sweep_storage

    return sweep_storage.read_text(sweep_storage.join(storage, name, sweep_storage.SWEEP_FILE)) is not None


def write_sweep(storage: str, name: str, info: dict[str, Any]) -> None:
    from sweeps import storage as sweep_storage

    sweep_storage.write_sweep_info(storage, name, info)


def read_sweep(storage: str, name: str) -> dict[str, Any]:
    from sweeps import storage as sweep_storage
    from sweeps.tuner import UsageError

    try:
        return sweep_storage.read_sweep_info(storage, name)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
