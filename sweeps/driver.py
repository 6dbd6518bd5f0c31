"""The driver of a sweep (`gensweep run` and `gensweep resume`; their flags are in sweeps/cli.py): the spec, the data
and the FID plan, then Ray Tune + Optuna (TPE) + ASHA with one W&B run per trial, then the leaderboard and an exit
code that says how the sweep ended."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch

from genmodels.data import load_splits
from genmodels.experiment import prepare
from genmodels.registry import trial_config
from sweeps import cluster, dry_run, full_storage, progress, warm_start
from sweeps import param_space as ps
from sweeps import storage as sweep_storage
from sweeps.full_storage import StorageWatch
from sweeps.leaderboard import print_board
from sweeps.packing import auto_gpus_per_trial
from sweeps.rows import pareto_front, trial_row
from sweeps.spaces import SMOKE_NOTE
from sweeps.spec import SweepSpec, UsageError
from sweeps.study import save_study
from sweeps.study_writer import StudyWriter
from sweeps.sweep_results import UNFINISHED, sweep_trials
from sweeps.tuner import make_fid_plan, make_tuner, restorable, restore_tuner
from trainables import checkpoints, driver_clock
from trainables.evaluation import process_scorer
from trainables.wandb_auth import is_logged_in
from trainables.wandb_logging import WandbLogger

if TYPE_CHECKING:
    from sweeps.warm_start import WarmStart


def command(args: argparse.Namespace) -> int:
    """Run or resume the sweep; bad input raises (sweeps/cli.py prints it in one line, exit 2)."""
    if args.resume and args.warm_start:
        raise UsageError("--resume continues a sweep with its own history; --warm-start starts a new one: pass one")
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    signals_received.clear()
    full_storage.full_message = None
    try:
        return run(args)
    except KeyboardInterrupt:  # before the sweep started (data, FID reference), or a second Ctrl-C during Ray's start
        print("gensweep: stopped before the sweep started; nothing ran: run the same command again", file=sys.stderr)
        return stop_code()
    finally:
        signal.signal(signal.SIGTERM, previous)


# SIGTERM (what `ray job stop`, Slurm and Kubernetes send) stops a sweep as Ctrl-C does; only the exit code differs.
signals_received: list[int] = []


def on_sigterm(signum: int, frame) -> None:
    signals_received.append(signum)
    if local_ray and signum == signal.SIGTERM:
        threading.Thread(target=watch_ray, args=(list(local_ray),), name="gensweep-ray-watch", daemon=True).start()
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or handler is on_sigterm:
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)  # Tune's while the sweep runs (save the state, stop); else Python's: raise


# A SIGTERM to the driver's whole process group (`kill -TERM -- -PGID`, a shell's job control, Slurm's scancel, many
# supervisors) reaches the local Ray's GCS and raylet too: they are the driver's children, in its group, and end
# within seconds. Tune's graceful stop then waits a minute for a GCS that is gone, and the driver dies without its
# leaderboard. So while Tune stops, the driver watches them: if they end first, the sweep ends as a killed driver's
# does, at once: the board from storage, the resume line, exit 143.
RAY_PROCESSES = ("gcs_server", "raylet")
local_ray: list[int] = []  # their PIDs while this driver's local Ray runs
ending: dict[str, Any] = {}  # what stop_without_ray needs: spec, storage, the resume line


def ray_children() -> list[int]:
    """PIDs of this process's children that are the local Ray's GCS or raylet (none without /proc)."""
    return [pid for pid, (name, parent, _) in _processes().items() if parent == os.getpid() and name in RAY_PROCESSES]


def _processes() -> dict[int, tuple[str, int, str]]:
    """(name, parent PID, state) of every process, from /proc (none without it)."""
    pids = [p for p in os.listdir("/proc") if p.isdigit()] if os.path.isdir("/proc") else []
    return {int(pid): stat for pid in pids if (stat := _stat(pid))}


def _stat(pid: str | int) -> tuple[str, int, str] | None:
    """(name, parent PID, state) of a process from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, int(rest[1]), rest[0]


def watch_ray(pids: list[int], every_s: float = 0.1) -> None:
    """Until the driver shuts Ray down itself (local_ray cleared): stop_without_ray as soon as one of the local
    Ray's processes has ended (gone, or dead and unreaped)."""
    while local_ray:
        if any((s := _stat(pid)) is None or s[2] in "ZX" for pid in pids):
            if local_ray:
                stop_without_ray()
            return
        time.sleep(every_s)


def stop_without_ray() -> None:
    """The end of a sweep whose Ray died with its driver: the leaderboard from the trials' results in storage, the
    resume line, this driver's own processes ended by PID, exit 143. Tune's state is the one it saved last, as after
    a killed driver, and --resume continues from it."""
    print("\ngensweep: SIGTERM reached the local Ray's own processes too (a signal to the whole process group): "
          "the sweep stops now, from what its trials stored", flush=True)
    try:
        if ending:
            spec, storage = ending["spec"], ending["storage"]
            trials = sweep_trials(storage, spec)
            print_board([trial_row(t, spec) for t in trials], spec, "local", trials)
            print(f"gensweep: interrupted; continue with: {ending['resume']}", flush=True)
    finally:
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)


def wait_for_trial_workers(ray_pids: list[int], timeout_s: float = 5.0) -> None:
    """Before ray.shutdown: wait (a second, usually) until the worker processes of the local Ray (default_worker.py
    under its raylet; not its agents) have exited. Tune asks its trial actors to exit as the sweep ends, and
    ray.shutdown SIGTERMs a worker still on its way out; a SIGTERM landing in a Python weakref callback there
    prints "Exception ignored ... SystemExit" on the driver's stderr."""
    deadline = time.monotonic() + timeout_s
    while ray_pids and time.monotonic() < deadline:
        if not any(_is_worker(pid) for root in ray_pids for pid in _descendants(root)):
            return
        time.sleep(0.05)


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"default_worker.py" in f.read()
    except OSError:
        return False


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _) in _processes().items():
        children.setdefault(parent, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_code() -> int:
    """The exit code of a sweep stopped by a signal: 128 + its number, as a shell reports a process it killed."""
    return 143 if signal.SIGTERM in signals_received else 130


@contextlib.contextmanager
def signals_held():
    """Ctrl-C or SIGTERM while Ray starts: held until ray.init returns (a KeyboardInterrupt inside it leaves Ray's
    processes half started and can crash the interpreter on its way out); a second one stops at once."""
    held: list[int] = []

    def hold(signum: int, frame) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        print("gensweep: stopping once Ray has started (seconds); press Ctrl-C again to stop at once", flush=True)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signals_received.extend(held)


def sweep_spec(args: argparse.Namespace, storage: str) -> SweepSpec:
    """The sweep to run: new from the command line, or the saved one for --resume, where trials that start after the
    resume get the resources the sweep started with unless given again now (a driver on a CPU-only head would
    otherwise default new trials to no GPU)."""
    if not args.resume:
        return SweepSpec.from_args(args, storage)
    spec = SweepSpec.load(storage, args.resume)
    if not restorable(storage, spec.name):
        raise UsageError(f"sweep {spec.name!r} was saved but stopped before Tune saved any state (no trial ran); "
                         f"delete {sweep_storage.join(storage, spec.name)} and start it again: "
                         f"{'gensweep run' if args.prog.startswith('gensweep') else 'python sweeps/run.py'} "
                         f"{shlex.join(spec.argv)}" + ("" if "--name" in " ".join(spec.argv) else
                                                      f" --name {spec.name}"))
    given = {key: value for key, value in [("cpu", args.cpus_per_trial), ("gpu", args.gpus_per_trial)]
             if value is not None}
    return spec.replace(resources={**spec.resources, **given}) if given else spec


def run(args: argparse.Namespace) -> int:
    """parse -> spec -> prepare -> data -> FID plan -> (locked) Ray, Tuner, leaderboard; or with --dry-run, after
    the same checks, the plan (sweeps/dry_run.py)."""
    if getattr(args, "no_measure", False) and not args.dry_run:
        raise UsageError("--no-measure goes with --dry-run (a plan without the measurement); add --dry-run")
    storage = sweep_storage.resolve(args.storage_path or str(sweep_storage.default_storage()))
    try:
        sweep_storage.check_writable(storage)
    except OSError as e:
        raise UsageError(str(e)) from None
    if args.address:
        cluster.check_address(args.address)  # seconds, before the data and the FID reference are loaded
    spec = sweep_spec(args, storage)
    source = warm_start.load(storage, args.warm_start, spec) if args.warm_start else None
    if not spec.searched and spec.num_samples > 1 and not args.resume:
        print(f"gensweep: note: nothing is left to search (--seed-defaults or --fixed pin every searched value), so "
              f"the {spec.num_samples} trials are identical: same values, same seed (a determinism check; for one "
              f"comparison trial, leave out --num-samples)")
    gpus = spec.resources["gpu"]
    if args.address and not args.resume and not torch.cuda.is_available() and (
            args.preset == "auto" or args.gpus_per_trial is None):
        # The defaults look at this machine, and a cluster's driver usually runs on a CPU-only head node.
        print("gensweep: note: this driver sees no GPU, so --preset auto means smoke and trials request no GPU "
              "by default; on a GPU cluster pass --preset full --gpus-per-trial 1 (or a fraction)")
    if not args.address and gpus != "auto":
        cluster.check_gpus(gpus)
    point = trial_config(ps.representative(spec.param_space))
    prepare(point)  # checks and weights first: fail before loading data
    data = load_splits(point.data)
    given, prepared = point.flat(), prepare(point, data["train"]).flat()  # + values derived from the data, for all
    derived = {k: v for k, v in prepared.items() if k.startswith("model.") and given[k] != v}
    spec = spec.replace(constants={**spec.constants, **derived}) if derived else spec
    warm = warm_start.plan(source, spec) if source else None  # from the final values: the budgets compared
    if warm:
        spec = spec.replace(warm_start=warm.record())
    if getattr(args, "dry_run", False):
        # a missing feature network is refused as by a run; loaded as a CPU trial process keeps it, so that the
        # forecast's measurement there does not load it again
        process_scorer(spec.fid.network, spec.fid.weights_path, "cpu")
        return dry_run.show(spec, args, data, point.data.dataset)
    if gpus == "auto":
        spec = spec.replace(resources={**spec.resources, "gpu": auto_gpus_per_trial(spec.model_name,
                                                                                    spec.param_space, data)})
    plan = make_fid_plan(spec, data["test"], point.data.dataset)
    print(f"gensweep: space={spec.space} preset={spec.preset} model={spec.model_name} dataset={point.data.dataset} "
          f"(train {len(data['train'])}, test {len(data['test'])} images) ranking by {spec.metric} ({spec.mode}); "
          f"FID network: {spec.fid.network}" + ("" if spec.fid.network == "inception" else
                                                  " (smoke stand-in: not comparable to published FIDs)"))
    if spec.preset == "smoke" and not args.resume:
        why = "no GPU visible, so --preset auto chose smoke" if args.preset == "auto" else "--preset smoke"
        print(f"gensweep: {why}: {SMOKE_NOTE}")
    if warm:
        print(warm.describe())
    lock = sweep_storage.SweepLock(storage, spec.name)
    try:
        lock.acquire()
    except OSError as e:
        raise UsageError(str(e)) from None
    try:
        return run_locked(spec, args, storage, data, plan, warm)
    finally:
        lock.release()


def run_locked(spec: SweepSpec, args: argparse.Namespace, storage: str, data: dict[str, torch.Tensor],
               plan, warm: WarmStart | None = None) -> int:
    """Start Ray, run (or resume) the sweep, print the leaderboard; the exit code says how it ended."""
    wandb_mode = configure_wandb(args)
    os.environ["WANDB_MODE"] = wandb_mode
    with signals_held() as held:
        cluster.init_ray(args.address, {"WANDB_MODE": wandb_mode, "WANDB_SILENT": "true"})
    local_ray[:] = [] if args.address else ray_children()
    try:
        if held:
            print("gensweep: stopped while Ray was starting; nothing ran: run the same command again")
            return stop_code()
        return run_on_ray(spec, args, storage, data, plan, wandb_mode, warm)
    finally:
        local_ray.clear()
        ray.shutdown()  # the local Ray's processes end with the driver, whatever ended the sweep


def run_on_ray(spec: SweepSpec, args: argparse.Namespace, storage: str, data: dict[str, torch.Tensor], plan,
               wandb_mode: str, warm: WarmStart | None = None) -> int:
    if spec.reproducible and not spec.max_concurrent and not args.resume:
        spec = spec.replace(max_concurrent=cluster.trials_at_once(spec))
    if spec.reproducible and not args.resume:
        print(f"gensweep: --reproducible: batches of {spec.max_concurrent} trials, each suggested and cut by ASHA "
              f"from the batches before it (rerun elsewhere with --max-concurrent {spec.max_concurrent})")
    cluster.allow_pending_trials(spec, on_cluster=bool(args.address))
    if args.address and spec.resources["gpu"]:
        cluster.warn_if_no_node_has_the_gpus(spec.resources["gpu"])
    checkpoints.resumed_driver = bool(args.resume)
    if args.resume:
        # the study whole from the stored trials that ended (the killed driver may not have written its last
        # ones); the writer restored with the sweep appends the trials that end from now on
        save_study(storage, spec, ended_only=True)
        tuner = restore_tuner(spec, data, plan, storage)
    else:
        watch = [] if sweep_storage.is_uri(storage) else [StorageWatch(sweep_storage.join(storage, spec.name))]
        # the Optuna study on disk: each trial that ends is added to it (sweeps/study_writer.py)
        tuner = make_tuner(spec, data, plan, [*wandb_callbacks(args, wandb_mode, spec), *watch,
                                              StudyWriter(storage, spec.name)], storage, warm)
    cluster.warn_if_asha_is_serial(spec)
    progress.tally.begin(spec, cluster.trials_at_once(spec), sweep_storage.join(storage, spec.name)
                         if args.resume and not sweep_storage.is_uri(storage) else None)
    if not args.resume:
        spec.save(storage)
    # in the form the sweep was started with: an installed gensweep has no sweeps/run.py to call
    resume = (f"gensweep resume {spec.name}" if args.prog.startswith("gensweep") else
              f"python sweeps/run.py --resume {spec.name}") + f" --storage-path {shlex.quote(storage)}" + (
        f" --address {shlex.quote(args.address)}" if args.address else "")
    print(f"gensweep: if this driver stops, continue the sweep with: {resume}")
    ending.update(spec=spec, storage=storage, resume=resume)
    interrupted, folder = False, sweep_storage.join(storage, spec.name)
    driver_clock.reset()
    started = time.monotonic()
    try:
        tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C while Tune saves its state: stop now, resume from what is saved
        interrupted = True
    except (OSError, EOFError) as e:  # EOFError: Tune reading back a state file the full disk cut short
        if not (full_storage.is_full(e) or (full_storage.free_bytes(folder) or full_storage.MiB) < full_storage.MiB):
            raise
        full_storage.full_message = full_storage.describe(folder, full_storage.SPARE_BYTES)
    finally:
        # every logger in this process: on --resume, Tune runs the one restored with the sweep, not ours
        WandbLogger.close_all(timeout_s=10)
        StudyWriter.close_all()
        wait_for_trial_workers(list(local_ray))
        local_ray.clear()  # Ray's processes end now, and not because of a signal
        ray.shutdown()  # now: the trials' last log lines reach the screen before the board, not after it

    record_driver_time(folder, time.monotonic() - started)
    trials = sweep_trials(storage, spec)
    if args.resume:
        # once more whole: a resumed sweep's callbacks come back from its tuner.pkl, which may hold none that
        # writes the study (a sweep started before there was one), or name a storage path it has left
        save_study(storage, spec, trials)
    rows = [trial_row(t, spec) for t in trials]
    print()
    print_board(rows, spec, "local", trials)
    if len(spec.objectives) > 1:
        log_front_to_wandb(rows, spec, args, wandb_mode, storage)
    print(f"\nresults: {storage}/{spec.name} (image grids: {storage}/{spec.name}/<trial>/images/)")
    if wandb_mode == "offline" and logged_offline(storage, spec.name):
        print(f"W&B runs were logged offline; upload them with `wandb sync {shlex.quote(storage)}/{spec.name}/*/wandb/"
              f"offline-run-*`")
    if full_storage.full_message:
        print(f"gensweep: {full_storage.full_message}; free some space there, then continue with: {resume}")
        return 1
    return exit_status(rows, stop_code() if interrupted or signals_received else 0, resume)


def record_driver_time(folder: str, wall_s: float) -> None:
    """What gensweep's callbacks and searcher cost the driver's event loop (trainables/driver_clock.py), as
    driver.json in the sweep's folder and one line; a resumed sweep's file covers its last driver."""
    totals = driver_clock.totals()
    spent = sum(t["s"] for t in totals.values())
    try:
        sweep_storage.write_text(sweep_storage.join(folder, DRIVER_FILE),
                                 json.dumps({"wall_s": wall_s, "gensweep_s": spent, "hooks": totals,
                                             "per_hook": driver_clock.per_hook()}, indent=1))
    except OSError:  # a full disk has been said already; this file is only a measurement
        pass
    dearest = ", ".join(f"{name} {t['s']:.1f} s" for name, t in list(totals.items())[:3])
    print(f"gensweep: the driver spent {spent:.1f} s of the sweep's {wall_s:.0f} s in gensweep's callbacks and "
          f"searcher ({spent / max(wall_s, 1e-9):.1%}{': ' + dearest if dearest else ''}; {DRIVER_FILE})")


def log_front_to_wandb(rows: list[dict[str, Any]], spec: SweepSpec, args: argparse.Namespace, wandb_mode: str,
                       storage: str) -> None:
    """The Pareto front as a table in a W&B run of its own, in the sweep's group."""
    if wandb_mode == "disabled":
        return
    import wandb  # seconds to import, for multi-objective sweeps only (the trials' logger runs in its own thread)

    objectives = list(spec.objectives)
    front, where = pareto_front(rows, objectives, spec.mode)
    keys = sorted({k for r in front for k in r["params"]})
    table = wandb.Table(columns=["trial", *objectives, *keys],
                        data=[[r["trial"], *[r["objectives"][m]["value"] for m in objectives],
                               *[r["params"].get(k) for k in keys]] for r in front])
    # beside the trials' runs, for `wandb sync`
    folder = None if sweep_storage.is_uri(storage) else f"{storage}/{spec.name}"
    run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, group=spec.name, job_type="pareto",
                     dir=folder, name=f"{spec.name}-pareto-front", reinit="create_new",
                     config={"objectives": objectives, "compared": where})
    run.log({"pareto_front": table})
    run.finish()


def logged_offline(storage: str, name: str) -> bool:
    """Whether the sweep's trials wrote offline W&B runs (a sweep started with --no-wandb has none to sync)."""
    return sweep_storage.is_uri(storage) or any(Path(storage, name).glob("*/wandb/offline-run-*"))


def exit_status(rows: list[dict[str, Any]], stopped_by: int, resume: str) -> int:
    """0 when at least one trial completed; `stopped_by` (130 Ctrl-C, 143 SIGTERM) or 130 when the sweep stopped
    with trials unfinished; 1 when no trial completed. The last line says why; each diverged trial gets a line
    saying where."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if row["status"] == "diverged":
            why = row.get("error") or "a non-finite loss"
            print(f"gensweep: {row['trial']} diverged ({why})")
    unfinished = sum(counts.get(s, 0) for s in UNFINISHED)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    if stopped_by or unfinished:
        print(f"gensweep: interrupted ({summary}); continue with: {resume}")
        return stopped_by or 130
    if not any(row["status"] in ("completed", "stopped (ASHA)") for row in rows):
        print(f"gensweep: no trial completed ({summary or 'no trials'}); see the errors above")
        return 1
    return 0


DRIVER_FILE = "driver.json"


def configure_wandb(args: argparse.Namespace) -> str:
    """W&B mode for every trial, decided before Ray starts so the workers inherit it."""
    if args.no_wandb:
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if is_logged_in() else "offline"


def wandb_callbacks(args: argparse.Namespace, wandb_mode: str, spec: SweepSpec) -> list:
    if wandb_mode == "disabled":
        return []
    dataset = str(spec.constants.get("data.dataset"))
    return [WandbLogger(project=args.wandb_project, entity=args.wandb_entity, group=spec.name,
                        tags=[spec.model_name, spec.space, spec.preset, dataset], max_epochs=spec.max_epochs,
                        log_artifacts=not args.no_artifacts, metric=spec.metric)]
