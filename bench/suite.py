"""Benchmarks, one subcommand each, printed as a table and optionally written as JSON: train
(bench/training.py), pack (pack.py), sampling (sampling.py), profile (profile.py), flops and fid (here),
and `all` of them (run_all.py).

    python -m bench train --json train.json              # every model, fast path against the seeds' way
    python -m bench train --models vae,ncsn --size small --device cpu --steps 10
    python -m bench pack --model vae --trials 1,2,4,8    # concurrent trials on one GPU
    python -m bench flops --size full                     # work per image; images/s at a target MFU
    python -m bench fid --device cpu --n 64 --fid-weights PATH --json fid-cpu.json
    python -m bench sampling --checkpoint runs/ncsn/state.pt  # bf16 sampling: FID change, time saved
    python -m bench profile --model ncsn --cuda-graphs off  # a step's time by op
    python -m bench all --budget-s 420 --json all.json      # the whole suite, one budget, one JSON

Adding a benchmark: a function `bench_NAME(args)` returning a list of row dicts (or rows and a dict of run-wide
facts), a function adding its arguments to a subparser, and one entry in BENCHMARKS. Row values that are dicts
(raw measurements) go to the JSON only, not to the printed table.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from bench.common import (
    BENCH_MODELS,
    add_run_arguments,
    bench_config,
    environment,
    flops_per_image,
    format_table,
    start_rows,
    timed_run,
    trial_steps,
    write_json,
)
from bench.pack import add_pack_arguments, bench_pack
from bench.processes import exit_on_signals
from bench.profile import add_profile_arguments, bench_profile
from bench.sampling import add_sampling_arguments, bench_sampling
from bench.training import add_train_arguments, bench_train

# ----------------------------------------------------------------------------------------------------------------
# flops: the work per training image of each model, and what a target MFU means in images/s (no training)


def add_flops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(BENCH_MODELS), help=f"comma-separated: {', '.join(BENCH_MODELS)}")
    p.add_argument("--size", choices=["small", "full"], default="full")
    p.add_argument("--mfu", type=float, default=0.3, help="target MFU for the images/s column (default 0.3)")
    p.add_argument("--peak-tflops", type=float, default=989.4,
                   help="peak the target is measured against (default: H100 SXM / H200 dense bf16, 989.4)")


def bench_flops(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from genmodels.registry import build_model

    device = torch.device(args.device)
    rows = []
    for name in (m for m in args.models.split(",") if m):
        model_name, params = bench_config(name, args.size)
        flops = flops_per_image(model_name, params, device)
        parameters = sum(p.numel() for p in build_model(model_name, params, channels=3).parameters())
        rows.append(dict(model=name, batch_size=int(params["batch_size"]), params_m=parameters / 1e6,
                         gflops_per_image=flops / 1e9, trial_steps=trial_steps(params),
                         trial_pflops=flops * int(params["batch_size"]) * trial_steps(params) / 1e15,
                         target_images_per_s=args.mfu * args.peak_tflops * 1e12 / flops))
        write_partial(args, "flops", rows)
    return rows, {"size": args.size, "target": f"{args.mfu:.0%} of {args.peak_tflops} TFLOP/s"}

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
    """Each network's rows; a network that fails (Inception without weights on an offline machine) leaves one
    row saying why, and the others are still measured."""
    from genmodels.data import synthetic_images

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (5000 if cuda else 64)
    batch_size = args.batch_size or (250 if cuda else 32)
    kid_subsets = args.kid_subsets if args.kid_subsets is not None else (100 if cuda else 5)
    images = synthetic_images(n)
    rows: list[dict[str, Any]] = []
    for network in [name for name in args.networks.split(",") if name]:
        try:
            _fid_rows(network, args, images, n, batch_size, kid_subsets, device, rows)
        except Exception as error:  # noqa: BLE001 - one network's failure (no weights offline) keeps the others' rows
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            rows.append(dict(what="failed", network=network, batch_size=batch_size, n=n, value=None, unit=None,
                             error=f"{type(error).__name__}: {message}"))
            print(f"fid: {network} failed ({rows[-1]['error']}); the other networks still run")
        write_partial(args, "fid", rows)
    return rows


def _fid_rows(network: str, args: argparse.Namespace, images: torch.Tensor, n: int, batch_size: int,
              kid_subsets: int, device: torch.device, rows: list[dict[str, Any]]) -> None:
    """One network's rows, appended to `rows` as each is measured."""
    from genmodels.metrics.fid import FIDScorer

    scorer = FIDScorer(network, weights_path=args.fid_weights, device=device, batch_size=batch_size,
                       kid_subsets=kid_subsets)
    list(scorer.features(images[:batch_size]))  # warm-up: allocator, cuDNN autotuning, lazy inits
    seconds = timed_run(lambda: [f.sum().item() for f in scorer.features(images)], device)
    rows.append(dict(what="feature extraction", network=network, batch_size=batch_size, n=n,
                     value=n / seconds, unit="images/s"))

    # The distances themselves depend only on the feature dimension: time them on random features.
    d = scorer.num_features
    real, fake = torch.randn(2000, d) * 0.5, torch.randn(2000, d) * 0.5 + 0.1
    ref = scorer.reference_from_features([real.to(device)], total=len(real))
    scorer.kid_subsets = 0
    fid_seconds = timed_run(lambda: scorer.score_features([fake.to(device)], ref), device)
    rows.append(dict(what=f"FID from stats (D={d})", network=network, batch_size=None, n=len(fake),
                     value=fid_seconds, unit="s"))
    if kid_subsets > 0:
        scorer.kid_subsets = kid_subsets
        kid = scorer._kid_metric(d)
        kid.real_features = [ref.kid_features.to(device)]
        kid.update(fake.to(device), real=False)
        rows.append(dict(what=f"KID, subsets of 1000 (D={d})", network=network, batch_size=None,
                         n=kid_subsets, value=timed_run(kid.compute, device) / kid_subsets, unit="s/subset"))

# ----------------------------------------------------------------------------------------------------------------


def write_partial(args: argparse.Namespace, benchmark: str, rows: list[dict[str, Any]]) -> None:
    """The rows measured so far, to --json and the rows file: a run stopped for time (bench all, the GPU check)
    keeps what it measured."""
    write_json(args.json, {"benchmark": benchmark, "partial": True, "rows": rows})


BENCHMARKS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]] = {
    "train": (add_train_arguments, bench_train),
    "pack": (add_pack_arguments, bench_pack),
    "flops": (add_flops_arguments, bench_flops),
    "fid": (add_fid_arguments, bench_fid),
    "sampling": (add_sampling_arguments, bench_sampling),
    "profile": (add_profile_arguments, bench_profile),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="benchmark", required=True)
    for name, (add_arguments, _) in BENCHMARKS.items():
        one = sub.add_parser(name)
        add_run_arguments(one)
        add_arguments(one)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if argv is None:  # a process of its own (bench all's steps): stopped with SIGTERM, its `finally` blocks run
        exit_on_signals()
    if args.threads:
        torch.set_num_threads(args.threads)
    start_rows()
    result = BENCHMARKS[args.benchmark][1](args)
    rows, meta = result if isinstance(result, tuple) else (result, {})
    env = environment(torch.device(args.device))
    print(", ".join(f"{k}={v}" for k, v in {**env, **meta}.items() if v is not None))
    print(format_table(rows))
    report = {"benchmark": args.benchmark, **env, **meta, "rows": rows}
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
