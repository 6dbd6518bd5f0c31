"""`python -m genmodels.bench all`: the whole suite inside one time budget, written as one JSON, so a GPU box is
characterised in one call:

    python -m genmodels.bench all --budget-s 420 --json all.json

Train (fast path against the seeds' way, with NCSN sampling and compile payback) for each model, then pack, fid,
flops and, on a GPU, a VAE trial's wall time by phase (trial), each in a process of its own with a share of the
budget (time a step leaves unused passes to the next). A step that runs over its share is stopped and recorded
as `timed out`, with the rows it wrote before the stop (train writes each as it is measured); one that fails is
recorded with the end of its error; the rest still run. What a step measured is its own benchmark's JSON, kept
whole under `runs`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from genmodels.bench.common import BENCH_MODELS, environment, write_json

# Shares of the budget; train's is split over models. On a GPU, pack measures three variants (graphs on and off, MPS),
# and trial a full-preset VAE trial (on a CPU that takes minutes: run `bench trial` with --steps there).
SHARES = {"train": 0.6, "pack": 0.15, "fid": 0.15, "flops": 0.1}
CUDA_SHARES = {"train": 0.55, "pack": 0.2, "fid": 0.1, "flops": 0.07, "trial": 0.08}
TRAIN_WEIGHTS = {"ncsn": 4.0, "ncsn_refinenet": 2.5}  # of train's share, against 1 for each other model (GPU)
MIN_STEP_S = 5.0  # a step given less time than this is skipped, not started


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], float]]:
    """(benchmark, its arguments, its share of the budget in seconds), in the order they run."""
    models = [m for m in args.models.split(",") if m]
    cuda = args.device.startswith("cuda")
    shares = CUDA_SHARES if cuda else SHARES
    # On a GPU the NCSN networks cost several times a VAE's step, and ncsn's compile (a minute, cold) is measured:
    # compile pays back only there (docs/PERFORMANCE.md). Fewer steps than train's default, to fit every model.
    weights = {m: (TRAIN_WEIGHTS.get(m, 1.0) if cuda else 1.0) for m in models}
    steps = [("train", ["--models", m, *(["--steps", "30", "--repeats", "2"] if cuda else []),
                        *(["--compile"] if cuda and m == "ncsn" else [])],
              shares["train"] * weights[m] / sum(weights.values())) for m in models]
    pack = ["--trials", "1,4,8", "--steps", "100", "--cuda-graphs", "on,off", "--mps"] if cuda else ["--trials", "1,2"]
    steps.append(("pack", pack, shares["pack"]))
    fid = ["--networks", "inception,standin" if args.fid_weights or cuda else "standin"]
    steps.append(("fid", [*fid, *(["--fid-weights", args.fid_weights] if args.fid_weights else [])], shares["fid"]))
    steps.append(("flops", ["--models", ",".join(models)], shares["flops"]))
    if "trial" in shares and "vae" in models:
        # a quarter epoch and a fifth of the test split (scaled to the real ones): the end's 1000-sample bound fits
        weights = ["--fid-weights", args.fid_weights] if args.fid_weights else []
        steps.append(("trial", ["--model", "vae", "--preset", "full", "--steps", "100", "--test-images", "2000",
                                *weights], shares["trial"]))
    return [(name, extra, share * args.budget_s) for name, extra, share in steps]


def run_step(name: str, extra: list[str], device: str, timeout_s: float) -> dict[str, Any]:
    """One benchmark in its own process, stopped after `timeout_s`: its status, seconds and JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "genmodels.bench", name, "--device", device, "--json", str(out), *extra]
        start = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stopped = {"status": "timed out", "seconds": round(time.monotonic() - start, 1)}
            if out.exists():  # what it measured before the stop (train writes its rows as it goes)
                stopped["report"] = json.loads(out.read_text())
            return stopped
        seconds = round(time.monotonic() - start, 1)
        if done.returncode != 0 or not out.exists():
            return {"status": "failed", "seconds": seconds, "error": done.stderr.strip().splitlines()[-5:]}
        return {"status": "ok", "seconds": seconds, "report": json.loads(out.read_text())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m genmodels.bench all", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=420.0, help="wall seconds for the whole suite (default 420)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(BENCH_MODELS), help=f"comma-separated: {', '.join(BENCH_MODELS)}")
    p.add_argument("--fid-weights", default=None, help="Inception weights file (python -m genmodels.fid_weights)")
    p.add_argument("--json", type=Path, default=None, help="write the whole report here")
    args = p.parse_args(argv)
    start, carry, runs = time.monotonic(), 0.0, []
    for name, extra, share in plan(args):
        left = args.budget_s - (time.monotonic() - start)
        allowed = min(left, share + carry)
        if allowed < MIN_STEP_S:
            result = {"status": "skipped", "seconds": 0.0}
        else:
            result = run_step(name, extra, args.device, allowed)
        carry = max(0.0, share + carry - result["seconds"])
        runs.append({"benchmark": name, "args": extra, "allowed_s": round(allowed, 1), **result})
        print(f"{name} {' '.join(extra)}: {result['status']} in {result['seconds']:.1f} s "
              f"(allowed {allowed:.0f} s)", flush=True)
    report = {"benchmark": "all", "budget_s": args.budget_s, "elapsed_s": round(time.monotonic() - start, 1),
              **environment(torch.device(args.device)), "runs": runs}
    write_json(args.json, report)
    return report
