"""Ray for a sweep: in-process on this machine, or a running cluster; what this driver can check about it first.

Every check that can fail in one line (an address that does not answer, more GPUs per trial than any machine has)
runs before a trial is started; the warnings say when a sweep will wait, or when ASHA's cuts depend on timing.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

import optuna
import ray
import torch

from sweeps.spec import SweepSpec, UsageError


def check_address(address: str) -> None:
    """Fail in seconds, not minutes, when a cluster address does not answer. `auto` is resolved as Ray resolves it
    (documented in `ray.init`): $RAY_ADDRESS, else the address the last `ray start` on this machine wrote to
    `<ray temp dir>/ray_current_cluster`; a stale one there would have Ray retry for minutes, deaf to Ctrl-C."""
    if address == "local" or address.startswith("ray://"):
        return
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS") or _last_started_cluster()
        if not found:
            raise UsageError("--address auto: no Ray cluster was started on this machine (`ray start --head` starts "
                             "one); start one, pass its host:port, or leave out --address to run locally")
        if found != "auto" and "://" not in found:
            _check_answers(found, f"--address auto found {found} (from the last `ray start` on this machine, or "
                                  f"$RAY_ADDRESS), which does not answer: that cluster has stopped")
        return
    _check_answers(address, f"cannot reach a Ray cluster at {address}")


def _last_started_cluster() -> str | None:
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        return (Path(temp) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _check_answers(address: str, what: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or address, int(port or 6379)), timeout=5).close()
    except (OSError, ValueError):
        raise UsageError(f"{what}; start a cluster with `ray start --head` "
                         f"or leave out --address to run locally") from None


def check_gpus(gpus_per_trial: float, visible: int | None = None) -> None:
    """UsageError unless this machine can ever give a trial `gpus_per_trial` GPUs (a fraction needs one GPU)."""
    visible = torch.cuda.device_count() if visible is None else visible
    needed = math.ceil(gpus_per_trial)
    if needed > visible:
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g} needs {needed} GPU{'s' * (needed > 1)} per trial and "
                         f"this machine has {visible}: every trial would wait forever; pass --gpus-per-trial "
                         f"{min(visible, 1) if visible else 0} or run on a machine (or --address a cluster) with GPUs")


def init_ray(address: str | None, env: dict[str, str]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory": noise on every start
    runtime_env = {"env_vars": env}
    # WARNING: Ray's and Tune's INFO lines (started, wrote results) say nothing the progress table does not.
    if address:
        check_address(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # The raylet this starts would prestart a worker per CPU for the first driver; Tune's trials run in workers
        # of the sweep's own job, so those sit idle, cost a second of a core each to start, and are killed idle a
        # second later, where one now and then writes abseil's "[mutex.cc : 452] RAW: Lock blocking" on its way out
        # (forwarded to the driver's stderr as "(pid=N) ..."). RAY_<name> sets Ray's config; a value given wins.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # One machine: keep Ray on loopback, so it neither depends on nor exposes the external interface.
        ray.init(include_dashboard=False, runtime_env=runtime_env, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)


def allow_pending_trials(spec: SweepSpec, on_cluster: bool) -> None:
    """Let Tune start as many trials at once as fit. With a searcher of its own (Optuna here) and no concurrency
    limit, Tune keeps one trial pending at a time (`TUNE_MAX_PENDING_TRIALS_PG` "auto"), so trials start one after
    another even where several fit. Pending trials are the ones that fit now (a cluster: at least 16, so that an
    autoscaler sees the demand); `--max-concurrent` caps them, and a value set in the environment wins."""
    if spec.max_concurrent or "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
        return  # the ConcurrencyLimiter sets it, or the user did
    available, resources = ray.cluster_resources(), spec.resources
    fit = [int(available.get("CPU", 0) // resources["cpu"])]
    if resources["gpu"]:
        fit.append(int(available.get("GPU", 0) // resources["gpu"]))
    pending = max(1, min(spec.num_samples, *fit))
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(pending, 16) if on_cluster else pending)


def warn_if_no_node_has_the_gpus(gpus_per_trial: float) -> None:
    """On a cluster, say so when no live node offers a trial's GPUs: its trials wait until such a node joins, which
    an autoscaling cluster whose config has that node type will add, and any other cluster never will."""
    needed = math.ceil(gpus_per_trial)
    most = max((node["Resources"].get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if most < needed:
        print(f"gensweep: warning: --gpus-per-trial {gpus_per_trial:g} needs a node with {needed} GPU(s) and no node "
              f"of this cluster has them now (most: {most:g}); trials wait until one joins (an autoscaler adds one "
              f"only if a node type in the cluster's config offers them). Ctrl-C and pass a smaller "
              f"--gpus-per-trial if none will.")


def limits_at_once(spec: SweepSpec, cpus: float, gpus: float) -> dict[str, int]:
    """What bounds the trials running at once, by name: the trials, --max-concurrent (when given), and how many
    trials `cpus` CPUs and `gpus` GPUs fit (a trial's GPUs counted as 1 while --gpus-per-trial auto is unmeasured)."""
    gpu = 1.0 if spec.resources["gpu"] == "auto" else float(spec.resources["gpu"])
    limits = {"trials": spec.num_samples, "CPUs": int(cpus // spec.resources["cpu"])}
    if spec.max_concurrent:
        limits["--max-concurrent"] = spec.max_concurrent
    if gpu:
        limits["GPUs"] = int(gpus // gpu)
    return limits


def trials_at_once(spec: SweepSpec) -> int:
    """How many of the sweep's trials run at once on the Ray this driver is connected to (without Ray: the trials
    and --max-concurrent alone)."""
    if not ray.is_initialized():
        return max(1, min(spec.num_samples, spec.max_concurrent or spec.num_samples))
    available = ray.cluster_resources()
    return max(1, min(limits_at_once(spec, available.get("CPU", 0), available.get("GPU", 0)).values()))


def warn_if_asha_is_serial(spec: SweepSpec) -> None:
    """Say so when fewer trials run at once than ASHA's reduction factor: an asynchronous rung then compares a trial
    with the few that happened to report before it, so its cuts depend on arrival order (not with --reproducible,
    whose cuts read earlier batches only)."""
    if not ray.is_initialized() or spec.reproducible:
        return
    at_once = trials_at_once(spec)
    if at_once < spec.asha.reduction_factor:
        print(f"gensweep: warning: {at_once} trial(s) at a time, fewer than ASHA's reduction factor "
              f"{spec.asha.reduction_factor}: its early cuts then depend on which trials reported first. Run more at "
              f"once (pack trials on a GPU with --gpus-per-trial 0.5, fewer --cpus-per-trial, or a cluster); see "
              f"docs/sweeps.md, 'One GPU'.")
