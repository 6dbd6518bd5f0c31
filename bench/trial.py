"""`python -m bench trial`: one trial's wall time by phase, at a preset's real shapes and batch, for a
sweep's two evaluation plans side by side, measured in this process:

    python -m bench trial --model vae --preset full --device cuda --json trial.json
    python -m bench trial --model vae --preset full --epochs 2 --steps 5                 # a CPU: minutes
    python -m bench trial --model ncsn --preset full --epochs 1 --steps 2 --one-step-sampling --max-samples 8

Plans: `per-epoch` (a full evaluation, grids and a checkpoint every epoch: the trainable before milestones) and
`milestones` (those at ASHA's milestones and at the end, the cheap subset evaluation in between, and a checkpoint
whenever --checkpoint-every-s has passed since the last). Both run the FID ladder at the milestones when the sweep
ranks by FID, and the final evaluation, FID and grids at the end.

Each phase is timed on this run's few epochs and scaled to a real one: training by steps (a real epoch is 50,000
CIFAR-10 images, or the preset's steps_per_epoch), evaluation by test images (synthetic images in the real dataset's
train / test ratio; with --steps below a real epoch, fewer of both; or --test-images), an FID by its samples
(--max-samples), a sampler's chains by their steps (--one-step-sampling). A whole trial is the preset's epochs of
those costs under each plan's schedule. Start-up is building the Experiment until its first training step is done,
with the data already in memory (as a trial gets it); a new process's interpreter start and imports, measured in a
subprocess, come on top once per trial process and are not in the shares (Tune's reuse_actors runs one trial after
another in the same process).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import (
    BENCH_MODELS,
    CIFAR_TEST_IMAGES,
    CIFAR_TRAIN_IMAGES,
    SMOKE_IMAGES,
    add_run_arguments,
    bench_config,
    bench_images,
    environment,
    format_table,
    sync,
    timed_run,
    trial_preset,
    write_json,
)
from bench.processes import append_rows
from sweeps.budgets import ASHASettings

PHASES = ("startup", "train", "evaluation", "fid", "grids", "checkpoint", "final_eval")
PLANS = ("per-epoch", "milestones")


def plan_seconds(unit: dict[str, Any], epochs: int, milestones: tuple[int, ...], plan: str,
                 checkpoint_every_s: float, milestone_eval: str = "eval_full") -> dict[str, float]:
    """A whole trial's seconds by phase: the per-epoch costs in `unit` on the plan's schedule, as the trainable
    (trainables/trainable.py) runs it: the milestones plan evaluates at a milestone and at the end as
    `milestone_eval` says (eval_full where a full-only metric ranks the trials, else eval_test: the whole split,
    cheap metrics)."""
    seconds = dict.fromkeys(PHASES, 0.0)
    seconds["startup"] = unit["startup"]
    since_checkpoint = 0.0
    for epoch in range(1, epochs + 1):
        last = epoch == epochs
        due = plan == "per-epoch" or last or epoch in milestones  # full evaluation and grids
        rung = milestones.index(epoch) if epoch in milestones and not last else None
        evaluation = "eval_subset" if not due else "eval_full" if plan == "per-epoch" else milestone_eval
        cost = {"train": unit["train"], "evaluation": unit[evaluation]}
        since_checkpoint += sum(cost.values())
        cost["fid"] = unit["fid_final"] if last else unit["fid_rungs"][rung] if rung is not None else 0.0
        cost["final_eval"] = unit["final_eval"] if last else 0.0
        cost["grids"] = (unit["grids_final"] if last else unit["grids"]) if due else 0.0
        # the trainable decides after the epoch's evaluation, and counts from the end of the last checkpoint's save
        checkpoint = due or since_checkpoint >= checkpoint_every_s
        cost["checkpoint"] = unit["checkpoint"] if checkpoint else 0.0
        since_checkpoint = 0.0 if checkpoint else since_checkpoint + cost["fid"]
        for phase, s in cost.items():
            seconds[phase] += s
    return seconds


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def process_start_s() -> float:
    """Seconds for a new Python process to import torch and the engine (what a new trial process pays first)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, genmodels.experiment"], check=True)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from genmodels.config import TrainConfig
    from genmodels.experiment import Experiment, prepare
    from genmodels.metrics.fid import FIDScorer
    from genmodels.registry import model_class, trial_config

    device = torch.device(args.device)
    model_name, params = bench_config(args.model, args.preset)
    preset = trial_preset(args.model, args.preset)
    epochs, batch = int(params["epochs"]), int(params["batch_size"])
    real_train, real_test = (CIFAR_TRAIN_IMAGES, CIFAR_TEST_IMAGES) if args.preset == "full" else SMOKE_IMAGES
    real_steps = int(params.get("steps_per_epoch") or real_train // batch)
    steps = min(args.steps or real_steps, real_steps)
    n_train = min(real_train, steps * batch)
    n_test = min(args.test_images or max(2, round(n_train * real_test / real_train)), real_test)
    # the images evaluation sees (the first eval_images of the test split), really and here
    real_eval, n_eval = (min(params.get("eval_images") or n, n) for n in (real_test, n_test))
    # Trainer's rule: a cheap evaluation only where the subset is smaller than the evaluated split; else a full one
    subset = TrainConfig().eval_subset
    real_subset = subset if 0 < subset < real_eval else 0
    n_subset = 0 if not real_subset else real_subset if real_subset < n_eval else max(1, n_eval // 2)
    params.update(steps_per_epoch=steps, eval_subset=n_subset)
    if not model_class(model_name).ranks_on_full_evaluation([preset.metric]) and any(
            k.endswith(".final_eval_k") for k in trial_config(params, model_name).flat()):
        params["final_eval_k"] = 0  # as sweeps/spec.py sets it: no end-of-trial bound unless the bound ranks
    scale = {"train": real_steps / steps, "eval_full": real_eval / n_eval, "eval_test": real_eval / n_eval,
             "eval_subset": real_subset / n_subset if n_subset else real_eval / n_eval, "grids": 1.0}

    train, test = bench_images(n_train), bench_images(n_test, seed=1)
    cfg = prepare(trial_config(params, model_name), train)  # the sweep's driver does this once, before any trial
    exp, startup = timed(lambda: Experiment(cfg, train, test, device), device)
    startup += timed_run(lambda: exp.train_epoch(1), device)
    ladder, final_n = args.ladder or preset.fid.ladder, args.final_n or preset.fid.final
    fractions = preset.fid.step_fractions
    grace = args.grace_period or preset.grace_period
    milestones = ASHASettings(epochs, min(grace, epochs), args.reduction_factor or preset.reduction_factor).milestones
    between = fractions[0]  # the grids' sampling budget between the end's (the first rung's)
    langevin_steps = getattr(cfg.model, "langevin_steps", 0) if args.one_step_sampling else 0

    def sampling(budget: float) -> tuple[float, float]:
        """The budget to sample at, and the factor to scale the time by: --one-step-sampling runs one Langevin
        step per level where the budget asks for round(T * budget), as NCSN.sample counts them."""
        if not langevin_steps:
            return budget, 1.0
        return 1 / langevin_steps, max(1, round(langevin_steps * budget))

    scale["grids"] = sampling(between)[1]

    def grids(folder: str, budget: float) -> float:
        return timed_run(lambda: exp.write_grids(out / folder, budget=sampling(budget)[0]), device)

    runs: dict[str, list[float]] = {k: [] for k in ("train", "eval_full", "eval_test", "eval_subset", "grids",
                                                    "checkpoint")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for _ in range(args.epochs):
            runs["train"].append(timed_run(exp.train_epoch, device))
            runs["eval_full"].append(timed_run(lambda: exp.evaluate(full=True), device))
            runs["eval_test"].append(timed_run(lambda: exp.evaluate(full=False, subset=False), device))
            runs["eval_subset"].append(timed_run(lambda: exp.evaluate(full=False), device))
            runs["grids"].append(grids("grids", between))
            runs["checkpoint"].append(timed_run(lambda: exp.save(out / "state.pt"), device))
        unit = {k: statistics.median(v) * scale.get(k, 1.0) for k, v in runs.items()}
        unit["startup"] = startup
        model = exp.eval_model

        # at the end: grids at the full sampling budget, and the model's own final grids
        final_images = torch.no_grad()(lambda: model.final_images(exp.test_images(n_eval), out / "final"))
        unit["grids_final"] = grids("final", 1.0) * sampling(1.0)[1] + timed_run(final_images, device)
        unit["final_eval"] = timed_run(exp.finish, device) * scale["eval_full"]  # metrics only: no out_dir

        # FID as trainables/evaluation.py runs it: the rung's samples at milestones when the sweep ranks by FID,
        # and at the end the final count with KID, and the reconstruction FID of the evaluated test images
        scorer = FIDScorer("inception" if args.fid_weights else "standin", args.fid_weights, device=device)
        ref = scorer.reference_from_features(scorer.features(exp.test_images(n_eval)), total=n_eval)
        seed = cfg.train.seed + 1
        fid_calls: list[dict[str, Any]] = []

        def sample_fid(n: int, budget: float, kid: bool) -> float:
            if not model.can_sample:
                return 0.0
            m = min(n, args.max_samples or n)
            scorer.kid_subsets = 100 if kid else 0
            at, factor = sampling(budget)
            s = timed_run(lambda: scorer.sample_fid(model, m, ref, seed=seed, budget=at), device) * factor * n / m
            fid_calls.append(dict(n=n, measured_n=m, budget=budget, kid=kid, seconds=s))
            return s

        unit["fid_rungs"] = [sample_fid(ladder[min(r, len(ladder) - 1)], fractions[min(r, len(fractions) - 1)],
                                        False) if preset.fid_ranked else 0.0
                             for r, epoch in enumerate(milestones) if epoch < epochs]
        unit["fid_final"] = sample_fid(final_n, 1.0, True)
        if model.can_reconstruct and not args.no_rfid:
            scorer.kid_subsets = 0
            rfid = timed_run(lambda: scorer.reconstruction_fid(model, exp.test_images(n_eval), ref), device)
            unit["fid_final"] += rfid * scale["eval_full"]

    milestone_eval = "eval_full" if exp.ranks_on_full_evaluation([preset.metric]) else "eval_test"
    plans = {}
    for plan in PLANS:
        seconds = plan_seconds(unit, epochs, milestones, plan, args.checkpoint_every_s, milestone_eval)
        total = sum(seconds.values())
        plans[plan] = {"total_s": total, "seconds": seconds, "shares": {k: v / total for k, v in seconds.items()}}
    notes = []
    if steps < real_steps or n_test < real_test:
        notes.append(f"measured {steps} of a real epoch's {real_steps} steps, on {n_train} synthetic training and "
                     f"{n_test} test images (the real {real_train} / {real_test}); per-epoch figures scaled to a "
                     f"real epoch")
    if n_subset != real_subset:
        notes.append(f"the subset evaluation measured on {n_subset} images, scaled to the real {real_subset}")
    if langevin_steps:
        notes.append(f"sampled at one Langevin step per level, scaled to the {langevin_steps} x budget steps (the "
                     f"denoising step and FID's features scaled with them: an overestimate)")
    if any(c["measured_n"] < c["n"] for c in fid_calls):
        notes.append(f"FID measured on at most {args.max_samples} samples, scaled by the sample count")
    return {"model": args.model, "model_name": model_name, "preset": args.preset, "epochs": epochs,
            "milestones": list(milestones), "metric": preset.metric, "fid_ranked": preset.fid_ranked,
            "milestone_evaluation": milestone_eval, "final_eval_k": params.get("final_eval_k"),
            "fid_network": scorer.name,
            "ladder": list(ladder), "final_n": final_n, "checkpoint_every_s": args.checkpoint_every_s,
            "batch_size": batch, "steps": steps, "real_steps": real_steps, "measured_epochs": args.epochs,
            "images": {"train": n_train, "test": n_test, "evaluated": n_eval, "subset": n_subset,
                       "real_train": real_train, "real_test": real_test, "real_evaluated": real_eval,
                       "real_subset": real_subset},
            "scale": scale, "measured": runs, "fid_calls": fid_calls, "per_epoch": unit, "plans": plans,
            "process_start_s": process_start_s(), "notes": notes}


def add_trial_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vae", choices=list(BENCH_MODELS))
    p.add_argument("--preset", default="full", choices=["full", "small"],
                   help="full: the sweeps' full-preset network, batch and epochs on CIFAR-10's sizes; small: smoke's")
    p.add_argument("--epochs", type=int, default=2, help="epochs measured (default 2); the trial has the preset's")
    p.add_argument("--steps", type=int, default=None, help="training steps per measured epoch (default: a real "
                                                           "epoch's; fewer on a CPU, e.g. 5)")
    p.add_argument("--test-images", type=int, default=None,
                   help="test images to evaluate on, scaled to the real split (default: the real train / test ratio "
                        "of the training images measured)")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA's (default: the model's sweep preset's)")
    p.add_argument("--reduction-factor", type=int, default=None, help="ASHA's (default: the model's sweep preset's)")
    p.add_argument("--checkpoint-every-s", type=float, default=300.0,
                   help="the milestones plan's checkpoint interval in between (the sweep's default 300)")
    p.add_argument("--ladder", type=lambda s: tuple(int(n) for n in s.split(",")), default=None,
                   help="FID samples per rung, comma-separated (default: the sweeps' ladder of the preset)")
    p.add_argument("--final-n", type=int, default=None, help="FID samples at the end (default: the preset's)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="draw at most this many samples per FID and scale the time by the count (default: all)")
    p.add_argument("--one-step-sampling", action="store_true",
                   help="NCSN on a CPU (a full Langevin chain costs minutes an image there): sample at one step per "
                        "level and scale each sampling call (grids, FID) by the steps its budget asks for")
    p.add_argument("--fid-weights", default=None, help="Inception weights file: FID with Inception, not the standin")
    p.add_argument("--no-rfid", action="store_true", help="no reconstruction FID at the end (run.py --no-rfid)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench trial", description=__doc__.split("\n\n")[0])
    add_run_arguments(p)
    add_trial_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    report = {"benchmark": "trial", **environment(torch.device(args.device)), **result}
    print(f"trial: {args.model} ({result['model_name']}) at {args.preset}, {result['epochs']} epochs of "
          f"{result['real_steps']} steps x {result['batch_size']}, milestones {result['milestones']}; "
          f"{report['device']}, {report['threads']} threads")
    for note in result["notes"]:
        print(f"note: {note}")
    print(format_table(unit_rows(result)))
    print(format_table(plan_rows(result)))
    print(f"a new trial process first spends {result['process_start_s']:.1f} s on its interpreter and imports "
          f"(not in the shares: Tune reuses a trial's process for the next)")
    append_rows([*unit_rows(result), *plan_rows(result)], "trial")  # to $GENSWEEP_BENCH_ROWS, where it is set
    write_json(args.json, report)
    return report


def unit_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-epoch table: each phase as measured, and scaled to the real epoch or call."""
    unit, runs, scale = result["per_epoch"], result["measured"], result["scale"]
    rows = [dict(phase="start-up (once)", measured_s=unit["startup"], scale=1.0, real_s=unit["startup"])]
    for key, what in (("train", "training epoch"), ("eval_full", "full evaluation"),
                      ("eval_test", "cheap evaluation, whole split"), ("eval_subset", "subset evaluation"),
                      ("grids", "grids"), ("checkpoint", "checkpoint")):
        rows.append(dict(phase=what, measured_s=statistics.median(runs[key]), scale=scale.get(key, 1.0),
                         real_s=unit[key]))
    rows.append(dict(phase="grids at the end", measured_s=None, scale=None, real_s=unit["grids_final"]))
    rows.append(dict(phase="final evaluation", measured_s=None, scale=scale["eval_full"], real_s=unit["final_eval"]))
    for rung, s in enumerate(unit["fid_rungs"] if result["fid_ranked"] else []):
        rows.append(dict(phase=f"FID at rung {rung}", measured_s=None, scale=None, real_s=s))
    rows.append(dict(phase="FID at the end", measured_s=None, scale=None, real_s=unit["fid_final"]))
    return rows


def plan_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole-trial table: each plan's seconds and its phases' shares of them (in %)."""
    rows = []
    for plan, p in result["plans"].items():
        rows.append({"plan": plan, "trial_s": p["total_s"],
                     **{f"{k}_%": round(100 * v, 1) for k, v in p["shares"].items()}})
    return rows
