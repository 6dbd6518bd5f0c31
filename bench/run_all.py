"""`python -m bench all`: the whole suite inside one time budget, written as one JSON, so a GPU box is
characterised in one call:

    python -m bench all --budget-s 420 --json all.json --rows rows.jsonl

Train (fast path against the seeds' way, with NCSN sampling and, where its share allows, compile payback) for each
model, then pack, fid, flops and, on a GPU, a VAE trial's wall time by phase (trial), each in a process group of
its own with a share of the budget (time a step leaves unused passes to the next). A step that runs over its share
is stopped, its whole process group with it (spawned workers too), and recorded as `timed out` with the rows it
wrote before the stop: every benchmark writes each row as it is measured, to its JSON and, as a JSON line, to the
rows file (--rows or $GENSWEEP_BENCH_ROWS). One that fails is recorded with the end of its error; the rest still
run. pack's MPS daemon is stopped after the step whatever happened to it. What a step measured is its own
benchmark's JSON, kept whole under `runs`; the report is rewritten after every step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import BENCH_MODELS, environment, write_json
from bench.processes import (
    MPS_DIR_ENV,
    ROWS_ENV,
    STEP_ENV,
    append_rows,
    exit_on_signals,
    run_group,
    stop_mps,
    tail,
)

# Shares of the budget; train's is split over models. On a GPU, pack measures three variants (graphs on and off, MPS),
# and trial a full-preset VAE trial (on a CPU that takes minutes: run `bench trial` with --steps there).
SHARES = {"train": 0.6, "pack": 0.15, "fid": 0.15, "flops": 0.1}
CUDA_SHARES = {"train": 0.5, "pack": 0.3, "fid": 0.06, "flops": 0.05, "trial": 0.09}
TRAIN_WEIGHTS = {"ncsn": 4.0, "ncsn_refinenet": 2.5}  # of train's share, against 1 for each other model (GPU)
MIN_STEP_S = 5.0  # a step given less time than this is skipped, not started
COMPILE_MIN_S = 150.0  # ncsn's train share that fits its cold compile (~70 s on an H200) besides the rest
PACK_EIGHT_MIN_S = 120.0  # pack's share that fits 8 trials as well as 4 in each of its three variants (GPU)


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], float]]:
    """(benchmark, its arguments, its share of the budget in seconds), in the order they run."""
    models = [m for m in args.models.split(",") if m]
    cuda = args.device.startswith("cuda")
    shares = CUDA_SHARES if cuda else SHARES
    budget = args.budget_s
    # On a GPU the NCSN networks cost several times a VAE's step, and ncsn's compile (a minute, cold) is measured
    # where its share fits it: compile pays back only there (docs/PERFORMANCE.md). Fewer steps than train's
    # default, to fit every model.
    weights = {m: (TRAIN_WEIGHTS.get(m, 1.0) if cuda else 1.0) for m in models}
    train_s = {m: shares["train"] * budget * weights[m] / sum(weights.values()) for m in models}
    steps = [("train", ["--models", m, *(["--steps", "30", "--repeats", "2"] if cuda else []),
                        *(["--compile"] if cuda and m == "ncsn" and train_s[m] >= COMPILE_MIN_S else [])],
              train_s[m]) for m in models]
    mps = args.mps == "on" or (args.mps == "auto" and cuda)
    if cuda:
        trials = "4,8" if shares["pack"] * budget >= PACK_EIGHT_MIN_S else "4"  # one trial alone is always added
        pack = ["--trials", args.pack_trials or trials, "--steps", "100", "--cuda-graphs", "on,off"]
    else:
        pack = ["--trials", args.pack_trials or "1,2"]
    steps.append(("pack", [*pack, *(["--mps"] if mps else [])], shares["pack"] * budget))
    # Inception only with weights (the GPU machine cannot download them); the standin first, so its row is
    # measured whatever Inception does
    fid = ["--networks", "standin,inception" if args.fid_weights else "standin"]
    steps.append(("fid", [*fid, *(["--fid-weights", args.fid_weights] if args.fid_weights else [])],
                  shares["fid"] * budget))
    steps.append(("flops", ["--models", ",".join(models)], shares["flops"] * budget))
    if "trial" in shares and "vae" in models:
        # a quarter epoch and a fifth of the test split (scaled to the real ones): the end's 1000-sample bound fits
        weights = ["--fid-weights", args.fid_weights] if args.fid_weights else []
        steps.append(("trial", ["--model", "vae", "--preset", "full", "--steps", "100", "--test-images", "2000",
                                *weights], shares["trial"] * budget))
    return steps


def run_step(name: str, extra: list[str], device: str, timeout_s: float, rows: str | None = None,
             log: str | Path | None = None, work: str | Path | None = None) -> dict[str, Any]:
    """One benchmark in a process group of its own, ended (every process in it) after `timeout_s`: its status,
    seconds and JSON report (what it wrote before a stop, when it was stopped). `rows`: the rows file its rows go
    to as they are measured; `log`: its output (else kept in a temporary file, and the end of it goes into the
    record when it fails); `work`: where pack's MPS daemon keeps its folders (stopped after the step)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        log = Path(log) if log else Path(tmp) / "output.txt"
        command = [sys.executable, "-m", "bench", name, "--device", device, "--json", str(out), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", STEP_ENV: " ".join([name, *extra])}
        if rows:
            env[ROWS_ENV] = str(rows)
        mps = Path(work or tmp) / "mps"
        env[MPS_DIR_ENV] = str(mps)
        try:
            ended = run_group(command, timeout_s, log=log, env=env)
        finally:
            mps_notes = stop_mps(mps) if (mps / "pipe").exists() else []  # pack's daemon, if it started one
        result: dict[str, Any] = {"status": ended["status"], "seconds": ended["seconds"]}
        if ended["left_behind"]:
            result["left_behind"] = ended["left_behind"]
        if mps_notes:
            result["mps"] = mps_notes
        if out.exists():  # what it measured (before the stop, if it was stopped: each row is written as measured)
            result["report"] = json.loads(out.read_text())
        if ended["status"] == "failed" or (ended["status"] == "ok" and not out.exists()):
            result["status"] = "failed"
            result["error"] = tail(log, 5)
        return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench all", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=420.0, help="wall seconds for the whole suite (default 420)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(BENCH_MODELS), help=f"comma-separated: {', '.join(BENCH_MODELS)}")
    p.add_argument("--fid-weights", default=None, help="Inception weights file (python -m genmodels.fid_weights); "
                                                       "without it the fid and trial rows use the standin network")
    p.add_argument("--mps", choices=["auto", "on", "off"], default="auto",
                   help="pack's MPS variant: auto = on a GPU (on elsewhere rehearses it, with a stand-in daemon)")
    p.add_argument("--pack-trials", default=None, help="pack's counts of concurrent trials (default: 4 on a GPU, "
                                                       "4,8 where pack's share is 120 s or more; 1,2 on a CPU)")
    p.add_argument("--json", type=Path, default=None, help="write the whole report here (rewritten after each step)")
    p.add_argument("--rows", default=None, help="append every row here as a JSON line as it is measured "
                                                "(default: $GENSWEEP_BENCH_ROWS)")
    p.add_argument("--logs", type=Path, default=None, help="keep each step's output here, one file per step")
    p.add_argument("--work", type=Path, default=None, help="pack's MPS folders go under here (default: temporary)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if argv is None:
        exit_on_signals()
    rows = args.rows or os.environ.get(ROWS_ENV)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    start, carry, runs = time.monotonic(), 0.0, []
    report: dict[str, Any] = {"benchmark": "all", "budget_s": args.budget_s, "runs": runs}
    for i, (name, extra, share) in enumerate(plan(args)):
        left = args.budget_s - (time.monotonic() - start)
        allowed = min(left, share + carry)
        if allowed < MIN_STEP_S:
            result = {"status": "skipped", "seconds": 0.0}
        else:
            log = args.logs / f"{i:02d}-{name}-{'-'.join(extra[1:2])}.txt" if args.logs else None
            result = run_step(name, extra, args.device, allowed, rows=rows, log=log, work=args.work)
        carry = max(0.0, share + carry - result["seconds"])
        record = {"benchmark": name, "args": extra, "allowed_s": round(allowed, 1), **result}
        runs.append(record)
        append_rows([{k: v for k, v in record.items() if k not in ("report", "benchmark")} | {"kind": "step"}],
                    f"all: {name}", path=rows)
        print(f"{name} {' '.join(extra)}: {result['status']} in {result['seconds']:.1f} s "
              f"(allowed {allowed:.0f} s)", flush=True)
        for note in result.get("mps", []):
            print(f"  mps: {note}", flush=True)
        write_json(args.json, {**report, "elapsed_s": round(time.monotonic() - start, 1), "partial": True})
    report = {"benchmark": "all", "budget_s": args.budget_s, "elapsed_s": round(time.monotonic() - start, 1),
              **environment(torch.device(args.device)), "runs": runs}
    write_json(args.json, report)
    return report
