"""Benchmarks, one subcommand each, printed as a table and optionally written as JSON.

    python -m genmodels.bench fid --device cpu --n 64 --fid-weights PATH --json fid-cpu.json

Adding a benchmark: a function `bench_NAME(args) -> list[row dict]`, a function adding its arguments to a
subparser, and one entry in BENCHMARKS.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# fid: feature extraction throughput, and the cost of the FID and KID computations themselves


def add_fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=None, help="images per network (default: 64 on cpu, 5000 on cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on cpu, 250 on cuda")
    p.add_argument("--networks", default="inception,standin", help="comma-separated: inception, standin")
    p.add_argument("--fid-weights", default=None, help="Inception weights (torch-fidelity layout); "
                                                         "default: torch-fidelity's download")
    p.add_argument("--kid-subsets", type=int, default=None,
                   help="KID subsets of 1000 to time (default: 5 on cpu, 100 on cuda)")


def bench_fid(args: argparse.Namespace) -> list[dict[str, Any]]:
    from genmodels.data import synthetic_images
    from genmodels.fid import FIDScorer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (5000 if cuda else 64)
    batch_size = args.batch_size or (250 if cuda else 32)
    kid_subsets = args.kid_subsets if args.kid_subsets is not None else (100 if cuda else 5)
    images = synthetic_images(n)
    rows = []
    for network in args.networks.split(","):
        scorer = FIDScorer(network, weights_path=args.fid_weights, device=device, batch_size=batch_size,
                           kid_subsets=kid_subsets)
        list(scorer.features(images[:batch_size]))  # warm-up: allocator, cuDNN autotuning, lazy inits
        seconds = _timed(lambda: [f.sum().item() for f in scorer.features(images)], device)
        rows.append(dict(what="feature extraction", network=network, batch_size=batch_size, n=n,
                         value=n / seconds, unit="images/s"))

        # The distances themselves depend only on the feature dimension: time them on random features.
        d = scorer.num_features
        real, fake = torch.randn(2000, d) * 0.5, torch.randn(2000, d) * 0.5 + 0.1
        ref = scorer.reference_from_features([real.to(device)], total=len(real))
        scorer.kid_subsets = 0
        fid_seconds = _timed(lambda: scorer.score_features([fake.to(device)], ref), device)
        rows.append(dict(what=f"FID from stats (D={d})", network=network, batch_size=None, n=len(fake),
                         value=fid_seconds, unit="s"))
        if kid_subsets > 0:
            scorer.kid_subsets = kid_subsets
            kid = scorer._kid_metric(d)
            kid.real_features = [ref.kid_features.to(device)]
            kid.update(fake.to(device), real=False)
            rows.append(dict(what=f"KID, subsets of 1000 (D={d})", network=network, batch_size=None,
                             n=kid_subsets, value=_timed(kid.compute, device) / kid_subsets, unit="s/subset"))
    return rows


# ----------------------------------------------------------------------------------------------------------------

BENCHMARKS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], list]]] = {
    "fid": (add_fid_arguments, bench_fid),
}


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []
    cells = [[_fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_arguments, _) in BENCHMARKS.items():
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--json", type=Path, default=None, help="also write the results here")
        add_arguments(p)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = BENCHMARKS[args.benchmark][1](args)
    env = environment(torch.device(args.device))
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": args.benchmark, **env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
