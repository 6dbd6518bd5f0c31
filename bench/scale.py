"""Sweeps of any size: does the driver's cost per trial stay flat from 8 trials to thousands?

    python -m bench scale --num-samples 8 100 1000 --json scale.json
    python -m bench scale --num-samples 100 --repo ../gensweep-old     # the same sweep, another checkout's driver

Each size runs the real CLI (sweeps/run.py of --repo) on the shortest trials a preset allows (--space's smoke preset,
one epoch: trials of a second or two on a CPU), W&B off unless --wandb offline, into a temporary folder, and prints:
- wall time against the ideal: the trials' own time (time_total_s) divided by the slots (CPUs / CPUs per trial),
  and the span from the first trial's start to the last one's end over that ideal (Ray Tune's own release test
  allows 1.28 at 10,000 one-second trials);
- trials finished per minute in each tenth of the sweep (the trials in order of their end), the last tenth's rate
  over the first's, and each tenth's busy fraction (a rate that falls while the slots stay busy is the trials
  getting slower, e.g. other work on the machine, not the driver);
- the driver's own time in each of gensweep's callbacks and in the searcher, from the sweep's driver.json
  (trainables/driver_clock.py; a checkout without it says n/a), as a share of the span;
- a linear estimate for --estimate trials (default 10,000) from the per-trial costs measured at the largest size:
  an estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.overhead import busy_figures, trial_spans

ROOT = Path(__file__).resolve().parents[1]
TRIAL_FLAGS = ["--preset", "smoke", "--fixed", "epochs=1", "--seed", "0"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, nargs="+", default=[8, 100], help="sweep sizes, run one after another")
    p.add_argument("--space", default="vae")
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose sweeps/run.py runs (default: this)")
    p.add_argument("--wandb", choices=["off", "offline"], default="off", help="W&B as a user without a login has it")
    p.add_argument("--slots", type=int, default=os.cpu_count(), help="trials at once: CPUs / CPUs per trial")
    p.add_argument("--estimate", type=int, default=10_000, help="trials of the linear estimate")
    p.add_argument("--keep", type=Path, default=None, help="keep the sweeps' folders here (default: deleted)")
    p.add_argument("--json", type=Path, default=None)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def tenths(spans: list[dict[str, Any]], slots: int) -> tuple[list[float], list[float]]:
    """Trials finished per minute in each tenth of the sweep (the trials in order of their end, ten groups, each
    group's count over the time from the previous group's last end, the first's from the first start), and each
    tenth's busy fraction: its trials' own time over slots x that time. A rate that falls while the busy fraction
    holds is the trials' own time growing (other work on the machine), not the driver."""
    ordered = sorted(spans, key=lambda s: s["end"])
    rates, busy, previous = [], [], min(s["start"] for s in spans)
    for k in range(10):
        group = ordered[len(ordered) * k // 10:len(ordered) * (k + 1) // 10]
        if not group:
            continue
        elapsed = max(group[-1]["end"] - previous, 1.0)  # Tune's timestamps are whole seconds
        rates.append(60.0 * len(group) / elapsed)
        busy.append(sum(s["own_s"] for s in group) / (slots * elapsed))
        previous = group[-1]["end"]
    return rates, busy


def run_size(n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    name = f"scale-{n}"
    command = [sys.executable, str(args.repo / "sweeps" / "run.py"), "--space", args.space, *TRIAL_FLAGS,
               "--num-samples", str(n), "--storage-path", str(root), "--name", name,
               *(["--no-wandb"] if args.wandb == "off" else [])]
    # the checkout's own packages first, in the driver and in Ray's workers (which inherit the environment), ahead of
    # whichever gensweep this Python has installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.repo), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), **({"WANDB_MODE": "offline"} if args.wandb == "offline" else {})}
    print(f"scale: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=args.repo, env=env)
    wall_s = time.perf_counter() - start
    folder = root / name
    (root / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise SystemExit(f"the {n}-trial sweep failed (exit {done.returncode}):\n{tail}")
    spans = trial_spans(folder)
    busy = busy_figures(spans, args.slots)
    ideal = busy["trial_s"] / args.slots
    driver = json.loads((folder / "driver.json").read_text()) if (folder / "driver.json").exists() else None
    rates, busy_by_tenth = tenths(spans, args.slots)
    row = {"trials": n, "cli_wall_s": wall_s, "span_s": busy["span_s"], "trial_s": busy["trial_s"],
           "mean_trial_s": busy["trial_s"] / len(spans), "ideal_s": ideal, "span_over_ideal": busy["span_s"] / ideal,
           "busy_fraction": busy["busy_fraction"], "per_minute_by_tenth": rates, "busy_by_tenth": busy_by_tenth,
           "last_tenth_over_first": rates[-1] / rates[0], "driver": driver,
           "gensweep_share": driver["gensweep_s"] / busy["span_s"] if driver else None}
    hooks = "n/a (no driver.json)" if driver is None else ", ".join(
        f"{k} {v['s']:.1f} s/{v['calls']}" for k, v in driver["hooks"].items())
    print(f"scale: {n} trials: CLI {wall_s:.0f} s, span {busy['span_s']:.0f} s against an ideal {ideal:.0f} s "
          f"({row['span_over_ideal']:.2f}x; trials {row['mean_trial_s']:.2f} s each on {args.slots} slots); per "
          f"minute by tenth {' '.join(f'{r:.0f}' for r in rates)} (last/first {row['last_tenth_over_first']:.2f}), "
          f"busy by tenth {' '.join(f'{b:.2f}' for b in busy_by_tenth)}; "
          f"gensweep's callbacks and searcher "
          f"{'n/a' if driver is None else format(row['gensweep_share'], '.1%')} of the span: {hooks}", flush=True)
    return row


def estimate(row: dict[str, Any], trials: int, slots: int) -> dict[str, Any]:
    """A linear estimate from one measured size: the trials' time and the driver's excess over the ideal, each per
    trial, times `trials`. It holds only where both are flat in the number of trials (compare the sizes)."""
    per_trial_excess = (row["span_s"] - row["ideal_s"]) / row["trials"]
    ideal = row["mean_trial_s"] * trials / slots
    span = ideal + per_trial_excess * trials
    return {"trials": trials, "from": row["trials"], "ideal_s": ideal, "span_s": span, "span_over_ideal": span / ideal}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.repo = args.repo.resolve()
    with tempfile.TemporaryDirectory(prefix="gsscale") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = [run_size(n, args, root) for n in args.num_samples]
    guess = estimate(rows[-1], args.estimate, args.slots)
    print(f"scale: an estimate, not a measurement: {guess['trials']} such trials on {args.slots} slots would span "
          f"{guess['span_s'] / 3600:.1f} h against an ideal {guess['ideal_s'] / 3600:.1f} h "
          f"({guess['span_over_ideal']:.2f}x), from the per-trial costs at {guess['from']} trials")
    report = {"space": args.space, "repo": str(args.repo), "wandb": args.wandb, "slots": args.slots, "sizes": rows,
              "estimate": guess}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
