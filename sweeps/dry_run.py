"""`gensweep run ... --dry-run`: the sweep's plan, and a forecast of what it costs measured on this machine, with
nothing started (no Ray) and nothing written to the results folder. The driver checks every flag first, exactly as
for a real run, so a dry run refuses what the run would refuse."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from genmodels.models.base import GenerativeModel
from genmodels.registry import model_class
from sweeps import param_space as ps
from sweeps.cluster import limits_at_once
from sweeps.plan import (
    RAY_START_S,
    SWEEP_END_S,
    TUNE_GAP_S,
    TUNE_PER_REPORT_S,
    TUNE_START_S,
    Rungs,
    TrialCost,
    duration,
    sweep_seconds,
)


def slots(spec, address: str | None) -> tuple[int, str]:
    """How many trials run at once, and what decides it: --max-concurrent, the trials, and what this machine (or
    the cluster at `address`) has for a trial's CPUs and GPUs."""
    if address:
        import ray

        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        try:
            available = ray.cluster_resources()
        finally:
            ray.shutdown()
        cpus, gpus, where = available.get("CPU", 0), available.get("GPU", 0), f"the cluster at {address}"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        gpus, where = torch.cuda.device_count(), "this machine"
    limits = limits_at_once(spec, cpus, gpus)
    why = min(limits, key=limits.get)
    gpu = spec.resources["gpu"]
    return max(1, limits[why]), (f"{where} has {cpus:g} CPUs and {gpus:g} GPUs; a trial takes "
                                 f"{spec.resources['cpu']:g} CPU and {gpu if gpu == 'auto' else f'{gpu:g}'} GPU; "
                                 f"limited by the {why}")


def corners(spec) -> dict[str, dict[str, Any]]:
    """The cheapest and dearest points of the space: every searched value at its low end, then at its high end
    (the larger width, latent size, k, T or codebook costs more; values that change no cost, such as a learning
    rate, do not matter here)."""
    low, high = dict(spec.param_space), dict(spec.param_space)
    for key in spec.searched:
        values = ps.domain_values(spec.param_space[key])
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            low[key], high[key] = min(values), max(values)
        else:
            low[key], high[key] = values[0], values[-1]
    return {"cheapest": low, "dearest": high}


def plan_lines(spec, data: dict[str, torch.Tensor], dataset: str, at_once: int, why: str) -> list[str]:
    rungs = Rungs.of(spec, at_once)
    n = spec.num_samples
    searched = ", ".join(f"{k.split('.')[-1]} {ps.describe_domain(spec.param_space[k])}" for k in spec.searched)
    fixed = ", ".join(f"{k}={v}" for k, v in spec.fixed.items())
    reach = ", ".join(f"{m}: {rungs.reaching(m, n):.3g}" for m in (*rungs.cuts, rungs.max_t))
    lines = [
        f"  space {spec.space}, preset {spec.preset}, model {spec.model_name}, dataset {dataset} (train "
        f"{len(data['train'])}, test {len(data['test'])} images), {spec.max_epochs} epochs a trial",
        f"  searched: {searched or 'nothing'}" + (f"; fixed: {fixed}" if fixed else ""),
        f"  objectives: {', '.join(spec.objectives)} ({spec.mode}); ASHA stops trials on {spec.metric}",
        f"  trials: {n}, {at_once} at once ({why})" + (
            f"; --reproducible: in batches of {rungs.batch}" if rungs.batch else ""),
        f"  ASHA: milestones at epochs {', '.join(map(str, spec.milestones))}, reduction factor "
        f"{spec.asha.reduction_factor}; expected trials at epoch {reach}; {rungs.trial_epochs(n):.3g} trial-epochs",
    ]
    fid = spec.fid
    ranked = next((o for o in spec.objectives if o in ("fid", "rfid")), None)
    ladder = "; ".join(
        f"epoch {m}: {fid.ladder[min(k, len(fid.ladder) - 1)]} samples at "
        f"{fid.step_fractions[min(k, len(fid.step_fractions) - 1)]:.0%} of a sampler's steps"
        for k, m in enumerate(rungs.cuts)) if ranked == "fid" else f"none at milestones ({ranked or spec.metric} ranks)"
    reconstructs = model_class(spec.model_name).reconstruct is not GenerativeModel.reconstruct
    lines.append(f"  FID ({fid.network}): {ladder}; at the end {fid.final} samples at the full budget, with KID"
                 + ("; reconstruction FID on the test split" if reconstructs and (fid.rfid or ranked == "rfid")
                    else ""))
    lines.append(f"  checkpoints: at each milestone and the end, and every {spec.checkpoint_every_s:g} s between "
                 f"(a fault loses at most that much training)")
    return lines


def forecast_lines(spec, data: dict[str, torch.Tensor], at_once: int, device: torch.device,
                   driver_s: float) -> list[str]:
    from sweeps.forecast import measure, process_start_s
    from trainables.trainable import prepare_process

    started = time.perf_counter()
    threads = torch.get_num_threads()
    # a trial's process gets as many threads as CPUs it asked for (Ray sets OMP_NUM_THREADS): so does the timing
    torch.set_num_threads(max(1, int(spec.resources["cpu"])))
    try:
        points = corners(spec)
        prepare_process(device, spec.fid.network, spec.fid.weights_path)  # as a trial process does, timed apart
        notes: set[str] = set()
        costs = {name: measure(point, spec, data, device, notes) for name, point in points.items()}
    finally:
        torch.set_num_threads(threads)
    process_s = process_start_s(spec, device)
    rungs, n = Rungs.of(spec, at_once), spec.num_samples
    cheap, dear = costs["cheapest"], costs["dearest"]
    mean = TrialCost((cheap.startup + dear.startup) / 2, (cheap.epoch + dear.epoch) / 2,
                     tuple((a + b) / 2 for a, b in zip(cheap.milestone, dear.milestone)), (cheap.end + dear.end) / 2)
    fixed = driver_s + RAY_START_S + process_s + TUNE_START_S + SWEEP_END_S
    figures = {name: sweep_seconds(_with_tune(c), rungs, n, at_once) for name, c in
               (("cheapest", cheap), ("mean", mean), ("dearest", dear))}
    unit = "GPU" if device.type == "cuda" else "CPU"
    low, high = sorted(("cheapest", "dearest"), key=lambda k: figures[k][0])
    device_h = {k: v[0] / 3600 for k, v in figures.items()}
    wall = {k: fixed + v[1] for k, v in figures.items()}

    def span(get) -> str:
        a, b = sorted((get(cheap), get(dear)))
        return duration(a) if duration(a) == duration(b) else f"{duration(a)}-{duration(b)}"

    lines = [
        f"forecast (measured on this machine's {device.type.upper()} in {time.perf_counter() - started:.0f} s, at the "
        f"cheapest and the dearest point of the space):",
        f"  a trial: start {span(lambda c: c.startup)}, an epoch {span(lambda c: c.epoch)}, work at a milestone "
        f"{span(lambda c: sum(c.milestone) / max(1, len(c.milestone)))}, at the end {span(lambda c: c.end)}; "
        f"one that completes {span(lambda c: c.seconds(rungs, rungs.max_t))}",
        f"  the sweep: {rungs.trial_epochs(n):.3g} trial-epochs, {device_h['mean']:.2g} {unit}-hours "
        f"({device_h[low]:.2g}-{device_h[high]:.2g}), wall time about {duration(wall['mean'])} "
        f"({duration(wall[low])}-{duration(wall[high])}) on {at_once} slot{'s' * (at_once > 1)}",
        "assumptions:",
        f"  - ASHA lets a trial go on past a milestone when it beats the (1 - 1/{spec.asha.reduction_factor}) "
        f"quantile of the trials before it there; trials start in random order of value and keep their rank from one "
        "milestone to the next (ASHA's premise; the sweep's own values decide: once TPE's random start is over, its "
        "proposals beat more of the trials before them, and more may go on)",
        *([f"  - --reproducible: batches of {rungs.batch}, each trial cut against the earlier batches' values only "
           "(the first batch runs to the end), and a batch holds its slots until its last trial ends"]
          if rungs.batch else []),
        "  - a trial costs the mean of the cheapest and dearest points (TPE draws from the whole space)",
        f"  - each slot starts one trial process ({duration(process_s)} with its first trial's one-time costs, "
        f"measured, and {duration(TUNE_START_S)} more as Tune starts the first ones) and reuses it for the next trials",
        f"  - the driver's start {duration(driver_s)} (imports, checks, data: measured), Ray's start and the Tuner "
        f"{duration(RAY_START_S)}, Tune's work {TUNE_GAP_S:g} s between trials and {TUNE_PER_REPORT_S:g} s a report, "
        f"the end after the last trial {duration(SWEEP_END_S)} (W&B's runs finished, Ray stopped; not measured: no "
        "Ray is started)",
        "  - the FID reference of the test split is cached (the first sweep on a dataset computes it once)",
        *(f"  - {note}" for note in sorted(notes)),
    ]
    return lines


def _with_tune(cost: TrialCost) -> TrialCost:
    """A trial's cost with Tune's work around it: between it and the trial before it in its process, and at each
    epoch's report."""
    return TrialCost(cost.startup + TUNE_GAP_S, cost.epoch + TUNE_PER_REPORT_S, cost.milestone, cost.end)


def no_forecast_reason(spec, address: str | None) -> str | None:
    """Why this machine cannot measure the trials' cost (None: it can)."""
    gpu = spec.resources["gpu"]
    if (gpu == "auto" or float(gpu) > 0) and not torch.cuda.is_available():
        return "the trials ask for GPUs and this machine has none"
    if address and gpu and torch.cuda.is_available():
        return (f"the trials run on the cluster at {address}, whose GPUs may differ from this machine's "
                f"{torch.cuda.get_device_name()}")
    return None


def show(spec, args, data: dict[str, torch.Tensor], dataset: str) -> int:
    driver_s = time.process_time()  # this process so far: the imports, checks and data a real run's driver does too
    at_once, why = slots(spec, args.address)
    print(f"gensweep: dry run of sweep {spec.name}: its plan{'' if args.no_measure else ' and forecast'}; nothing "
          f"is started or written")
    print("\n".join(plan_lines(spec, data, dataset, at_once, why)))
    reason = None if args.no_measure else no_forecast_reason(spec, args.address)
    if reason:
        print(f"gensweep: no forecast: {reason}; the plan only")
    elif not args.no_measure:
        device = torch.device("cuda" if torch.cuda.is_available() and spec.resources["gpu"] not in (0, 0.0) else "cpu")
        print("\n".join(forecast_lines(spec, data, at_once, device, driver_s)))
    command = " ".join(a for a in args.argv if a not in ("--dry-run", "--no-measure"))
    print(f"gensweep: to run it: {'gensweep run' if args.prog.startswith('gensweep') else 'python sweeps/run.py'} "
          f"{command}".rstrip())
    return 0
