"""Tune's overhead on one trial: the same config trained by calling the engine directly, then as a one-trial sweep.

    python -m bench overhead --space vae --preset full --seconds 60 --json overhead.json
    python -m bench overhead --space vae --preset smoke --seconds 60      # CPU

Both runs do the same work per epoch: train, evaluate, write the sample grids, save a checkpoint, and the
model's final evaluation at the end. The Tune run goes through the sweep's own make_tuner (sweeps/tuner.py) (ASHA, the
trainable, checkpoints handed to Tune every epoch, the progress reporter; W&B and FID off), on a Ray started for it
alone. The searched hyperparameters are pinned to one point (the largest numeric choices, the first string
choices), so both runs train the same config; Optuna's suggestion, a few milliseconds per trial, is left out.
steps_per_epoch is set so that the direct run's training lasts about --seconds. The direct run uses one torch
thread, as Ray gives a trial of one CPU (OMP_NUM_THREADS=1).

overhead = (Tune wall time - direct wall time) / direct wall time, with and without ray.init, which a sweep pays
once, not per trial.

`--sweep`: how busy a whole sweep keeps its trial slots. It runs the preset's sweep through the real CLI in a
subprocess (sweeps/run.py --space S --preset P --no-wandb, into a temporary folder), then reads each trial's reports
from the result.json Tune writes in its folder (`--results FOLDER` reads a sweep that has already run instead):

    python -m bench overhead --sweep --space vae --preset smoke --json busy.json

A trial starts at its first report's timestamp less that report's time_this_iter_s and ends at its last report's
timestamp (Tune's timestamps are whole seconds); its own time is its last time_total_s. busy fraction = the trials'
own time / (slots x (last end - first start)), slots = CPUs / CPUs per trial (--slots); peak concurrency is the most
trials running at once; a gap is how long after a trial's end the next trial started.
"""
from __future__ import annotations

import argparse
import bisect
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from genmodels.config import TrialConfig
from genmodels.io import json_lines

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="vae")
    p.add_argument("--preset", default="smoke", choices=["smoke", "full"])
    p.add_argument("--seconds", type=float, default=60.0, help="training time of the trial, run directly")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's, at most 10")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default 1 if a GPU is visible, else 0")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", type=Path, default=None)
    busy = p.add_argument_group("--sweep: a whole sweep's busy fraction")
    busy.add_argument("--sweep", action="store_true", help="run the preset's whole sweep through sweeps/run.py")
    busy.add_argument("--results", type=Path, default=None, help="read this sweep folder's trials instead of running")
    busy.add_argument("--sweep-args", default="", help="more run.py arguments, as one string (e.g. '--num-samples 4')")
    busy.add_argument("--slots", type=int, default=os.cpu_count(),
                      help="trials Tune can run at once: CPUs / CPUs per trial (default: this machine's CPUs)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def trial_spans(folder: Path) -> list[dict[str, Any]]:
    """Each trial's start, end and own seconds, from the result.json (a JSON report a line) in its folder."""
    spans = []
    for path in sorted(folder.glob("*/result.json")):
        reports = json_lines(path.read_text())
        if reports:
            first, last = reports[0], reports[-1]
            spans.append({"trial": path.parent.name, "start": first["timestamp"] - first["time_this_iter_s"],
                          "end": last["timestamp"], "own_s": last["time_total_s"], "reports": len(reports)})
    return spans


def busy_figures(spans: list[dict[str, Any]], slots: int) -> dict[str, Any]:
    """The sweep's trial time, busy fraction, peak concurrency and the gaps from a trial's end to the next start."""
    if not spans:
        raise ValueError("no trial reported anything (no result.json with a report)")
    first, last = min(s["start"] for s in spans), max(s["end"] for s in spans)
    own = sum(s["own_s"] for s in spans)
    # at one instant, ends before starts: a trial starting the second another ends does not overlap it
    running = peak = 0
    for _, change in sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans]):
        running += change
        peak = max(peak, running)
    starts = sorted(s["start"] for s in spans)
    gaps = []
    for end in sorted(s["end"] for s in spans):
        i = bisect.bisect_left(starts, end)
        if i < len(starts):  # the last trials to end have no next start
            gaps.append(starts[i] - end)
    span = last - first
    return {"trials": len(spans), "trial_s": own, "span_s": span, "slots": slots,
            "busy_fraction": own / (slots * span) if span > 0 else None, "peak_concurrency": peak,
            "mean_concurrency": own / span if span > 0 else None,
            "gap_mean_s": sum(gaps) / len(gaps) if gaps else None, "gap_max_s": max(gaps, default=None),
            "gaps_s": gaps, "spans": [{**s, "start": s["start"] - first, "end": s["end"] - first} for s in spans]}


def sweep_busy(args: argparse.Namespace) -> dict[str, Any]:
    """--sweep / --results: run the sweep through the CLI (or read one), and how busy its trial slots were."""
    from bench.common import environment, write_json
    from genmodels.engine import default_device

    with tempfile.TemporaryDirectory(prefix="gsbusy") as tmp:
        wall_s, command = None, None
        folder = args.results
        if folder is None:
            command = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", args.space,
                       "--preset", args.preset, "--no-wandb", "--storage-path", tmp, "--name", "bench",
                       *(["--data-dir", args.data_dir] if args.data_dir else []), *shlex.split(args.sweep_args)]
            print(f"sweep: {shlex.join(command)}", flush=True)
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall_s = time.perf_counter() - start
            if args.json:  # the sweep's own output, beside the figures
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.with_suffix(".log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
                raise SystemExit(f"the sweep failed (exit {done.returncode}):\n{tail}")
            folder = Path(tmp) / "bench"
        figures = busy_figures(trial_spans(folder), args.slots)
    report = {"space": args.space, "preset": args.preset, "command": command, "wall_s": wall_s, **figures,
              **environment(default_device())}
    wall = f"CLI wall {wall_s:.1f} s, " if wall_s is not None else ""
    busy = "n/a" if figures["busy_fraction"] is None else f"{100 * figures['busy_fraction']:.0f}%"
    gaps = "none" if figures["gap_mean_s"] is None else \
        f"mean {figures['gap_mean_s']:.1f} s, max {figures['gap_max_s']:.1f} s"
    print(f"sweep: {figures['trials']} trials, {wall}trials first start to last end {figures['span_s']:.1f} s; "
          f"the trials' own time {figures['trial_s']:.1f} s; {figures['slots']} slots busy {busy}; concurrency "
          f"peak {figures['peak_concurrency']}, mean {figures['mean_concurrency'] or 0:.2f}; from a trial's end to "
          f"the next start: {gaps}")
    write_json(args.json, report)
    return report


def direct_run(cfg: TrialConfig, data: dict, out_dir: Path) -> float:
    """The trial's work without Tune, as genmodels.train does it: wall seconds from building the experiment."""
    from genmodels.experiment import Experiment
    from genmodels.train import train_to_end

    start = time.perf_counter()
    train_to_end(Experiment(cfg, data["train"], data["test"]), out_dir, log=lambda line: None)
    return time.perf_counter() - start


def step_seconds(cfg: TrialConfig, data: dict, steps: int = 10) -> float:
    """Seconds per training step at this config (after a warm-up epoch of 3 steps)."""
    from genmodels.experiment import Experiment

    exp = Experiment(cfg.replace("train", steps_per_epoch=steps), data["train"], data["test"])
    exp.train_epoch(3)
    start = time.perf_counter()
    exp.train_epoch()
    return (time.perf_counter() - start) / steps


def tune_run(space, preset: str, config: dict[str, Any], args: argparse.Namespace, data: dict,
             storage: Path) -> dict[str, float]:
    """One trial through the sweep's own make_tuner on a fresh local Ray; wall seconds of ray.init and fit()."""
    import ray
    import torch

    from sweeps.spaces import FID_SETTINGS
    from sweeps.spec import ASHASettings, SweepSpec
    from sweeps.tuner import make_tuner

    epochs, p = int(config["train.epochs"]), space.presets[preset]
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else float(torch.cuda.is_available())
    spec = SweepSpec(name="overhead", space=space.name, preset=preset, model_name=space.model, constants=config,
                     searched=(), objectives=(space.metric,), mode=space.mode,
                     asha=ASHASettings(epochs, min(p.grace_period, epochs), p.reduction_factor),
                     fid=FID_SETTINGS[preset], resources={"cpu": 1.0, "gpu": gpus}, num_samples=1)
    start = time.perf_counter()
    # address="local": always a new Ray of our own (never a cluster another process started on this machine)
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"WANDB_MODE": "disabled"}}, _temp_dir=tempfile.mkdtemp(prefix="gsray"))
    init_s = time.perf_counter() - start
    try:
        tuner = make_tuner(spec, data, None, [], str(storage))
        start = time.perf_counter()
        results = tuner.fit()
        fit_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    result = results[0]
    if result.error:
        raise RuntimeError(f"the Tune trial failed: {result.error}")
    return {"ray_init_s": init_s, "fit_s": fit_s, "trial_time_total_s": result.metrics.get("time_total_s")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.sweep or args.results:
        return sweep_busy(args)
    from sweeps.ray_env import configure_environment

    configure_environment(local=True)  # the same Ray/Tune environment variables as a real sweep, before Ray's import
    import torch

    from bench.common import environment, write_json
    from genmodels.data import load_splits
    from genmodels.engine import default_device
    from genmodels.experiment import prepare
    from genmodels.registry import trial_config
    from sweeps.packing import worst_case_configs
    from sweeps.param_space import build_param_space
    from sweeps.spaces import SPACES

    # Ray runs a trial with OMP_NUM_THREADS = its CPUs (1 here): the direct run uses as many threads
    torch.set_num_threads(1)
    space = SPACES[args.space]
    overrides = {"data.data_dir": str(Path(args.data_dir).expanduser().resolve())} if args.data_dir else {}
    param_space = build_param_space(space, args.preset, {}, overrides, seed=0)
    cfg = trial_config(worst_case_configs(param_space)[0])  # one point of the space, the same for both runs
    data = load_splits(cfg.data)
    cfg = prepare(cfg, data["train"])
    cfg = cfg.replace("train", epochs=args.epochs or min(cfg.train.epochs, 10))
    if hasattr(cfg.model, "stage1_epochs"):  # vqvae: both stages, in proportion
        cfg = cfg.replace("model", stage1_epochs=max(1, cfg.train.epochs // 2))
    per_step = step_seconds(cfg, data)
    cfg = cfg.replace("train", steps_per_epoch=max(1, math.ceil(args.seconds / cfg.train.epochs / per_step)))
    epochs, steps = cfg.train.epochs, cfg.train.steps_per_epoch
    print(f"overhead: {space.model} at {epochs} epochs x {steps} steps ({per_step * 1000:.1f} ms/step, "
          f"~{args.seconds:.0f} s of training)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        direct_s = direct_run(cfg, data, Path(tmp) / "direct")
        print(f"direct: {direct_s:.1f} s", flush=True)
        tuned = tune_run(space, args.preset, cfg.flat(), args, data, Path(tmp) / "tune")
    report = {"space": args.space, "preset": args.preset, "epochs": epochs, "steps_per_epoch": steps,
              "step_ms": per_step * 1000, "direct_s": direct_s, **tuned,
              "overhead": (tuned["fit_s"] - direct_s) / direct_s,
              "overhead_with_ray_init": (tuned["fit_s"] + tuned["ray_init_s"] - direct_s) / direct_s,
              **environment(default_device())}
    print(f"tune: ray.init {tuned['ray_init_s']:.1f} s, fit {tuned['fit_s']:.1f} s (the trial's own "
          f"time_total_s {tuned['trial_time_total_s']:.1f} s); overhead "
          f"{100 * report['overhead']:.1f}% ({100 * report['overhead_with_ray_init']:.1f}% with ray.init)")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
