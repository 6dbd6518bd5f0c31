"""profile: where a training step's time goes, op by op, with torch.profiler.

    python -m bench profile --model ncsn --cuda-graphs off --json prof-ncsn.json

Trains `--warmup` steps, then profiles `--steps` more of the engine's real step (`Experiment.train_epoch`), and
reports the ops with the most self time on the device (on a CPU: on the host), their share of it, and their calls
per step; meta gives the kernels launched per step. With CUDA graphs on, the replayed kernels show up as the graph's
launch, so a breakdown by op wants `--cuda-graphs off` (the same kernels, launched one by one).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import BENCH_MODELS, bench_config, bench_images, sync


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="ncsn", choices=list(BENCH_MODELS))
    p.add_argument("--size", choices=["small", "full"], default=None, help="default: full on cuda, else small")
    p.add_argument("--steps", type=int, default=10, help="profiled steps (default 10)")
    p.add_argument("--warmup", type=int, default=5, help="steps before the profile (default 5)")
    p.add_argument("--cuda-graphs", choices=["on", "off"], default="off")
    p.add_argument("--top", type=int, default=15, help="ops listed (default 15)")


def bench_profile(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    from genmodels.experiment import make_experiment

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model_name, params = bench_config(args.model, args.size or ("full" if cuda else "small"))
    bs = int(params["batch_size"])
    images = bench_images((args.warmup + args.steps + 1) * bs)
    exp = make_experiment(model_name, {**params, "steps_per_epoch": args.steps, "eval_images": bs,
                                       "cuda_graphs": args.cuda_graphs == "on"},
                          images, images[:bs], device=device)
    exp.train_epoch(args.warmup)
    sync(device)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        exp.train_epoch()
        sync(device)
    events = [e for e in prof.key_averages() if _self_time(e, cuda) > 0]
    total = sum(_self_time(e, cuda) for e in events)
    rows = [dict(op=e.key, self_ms_per_step=_self_time(e, cuda) / 1000 / args.steps,
                 share=_self_time(e, cuda) / total, calls_per_step=e.count / args.steps)
            for e in sorted(events, key=lambda e: -_self_time(e, cuda))[:args.top]]
    kernels = sum(e.count for e in prof.events() if _is_kernel(e)) if cuda else None
    meta = {"model": args.model, "batch_size": bs, "cuda_graphs": exp.graph_captured, "steps": args.steps,
            "time": "device" if cuda else "host", "total_ms_per_step": total / 1000 / args.steps,
            "kernels_per_step": kernels / args.steps if kernels is not None else None}
    return rows, meta


def _self_time(event: Any, cuda: bool) -> float:
    """Self time in microseconds: on the device where there is one, else on the host."""
    return event.self_device_time_total if cuda else event.self_cpu_time_total


def _is_kernel(event: Any) -> bool:
    return event.device_type == torch.autograd.DeviceType.CUDA
