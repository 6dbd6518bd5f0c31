"""pack: several trials training at once on one device, against one alone."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch

from bench.common import BENCH_MODELS, bench_config, bench_images, sync, write_json
from bench.processes import MPS_CONTROL, MPS_DIR_ENV, mps_dirs


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vae", choices=list(BENCH_MODELS))
    p.add_argument("--trials", default="1,2,4", help="comma-separated numbers of concurrent trials (1 is added)")
    p.add_argument("--size", choices=["small", "full"], default=None, help="default: full on cuda, else small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per trial (default: 200 on cuda, 5 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 20 on cuda, 2 on cpu)")
    p.add_argument("--cuda-graphs", default="on", help="comma-separated: on, off (the trials' train.cuda_graphs; "
                                                       "both measures what graphs buy packed trials)")
    p.add_argument("--mps", action="store_true",
                   help=f"also run every count with graphs under CUDA MPS: starts a private {MPS_CONTROL} daemon for "
                        f"the run and quits it after (a row says why where the machine does not allow it)")


def bench_pack(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Aggregate images/s of N trial processes on one device, each on the engine's fast path, started together
    behind a barrier; aggregate = all images / (last end - first start). One series per variant (CUDA graphs on or
    off, MPS), each with its own one-trial reference."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("full" if cuda else "small")
    steps, warmup = args.steps or (200 if cuda else 5), args.warmup or (20 if cuda else 2)
    model_name, params = bench_config(args.model, size, args.batch_size)
    counts = sorted({1, *(int(n) for n in args.trials.split(",") if n)})
    graphs = [g.strip() == "on" for g in args.cuda_graphs.split(",") if g.strip()]
    variants = [(g, False) for g in graphs] + ([(True, True)] if args.mps else [])
    rows = []
    for graphed, mps in variants:
        with mps_daemon() if mps else nullcontext(None) as mps_error:
            for n in counts:
                row = dict(model=args.model, cuda_graphs=graphed and cuda, mps=mps, trials=n,
                           batch_size=int(params["batch_size"]), aggregate_images_per_s=None,
                           per_trial_images_per_s=None, speedup_vs_one=None, peak_mem_per_trial_mib=None, error=None)
                if mps_error:
                    rows.append({**row, "error": mps_error})
                else:
                    threads = torch.get_num_threads() if cuda else max(1, torch.get_num_threads() // n)  # CPU
                    results = run_concurrent_trials(n, model_name, {**params, "cuda_graphs": graphed}, str(device),
                                                    steps, warmup, threads)
                    rows.append(_pack_row(row, results, rows))
                # each row as it is measured: a run stopped for time (bench all) keeps the rows before the stop
                write_json(args.json, {"benchmark": "pack", "partial": True, "rows": rows})
    note = None if cuda else "CPU run: trials share the CPU cores; says nothing about packing trials on a GPU"
    if note:
        print(f"note: {note}")
    meta = {"size": size, "steps": steps, "warmup": warmup, "note": note}
    if cuda:
        meta["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return rows, meta


def _pack_row(row: dict[str, Any], results: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {**row, "error": errors[0].strip().splitlines()[-1], "runs": results}
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    row["aggregate_images_per_s"] = sum(r["images"] for r in results) / window
    row["per_trial_images_per_s"] = statistics.mean(r["images"] / (r["end"] - r["start"]) for r in results)
    if results[0]["peak_memory_bytes"] is not None:
        row["peak_mem_per_trial_mib"] = max(r["peak_memory_bytes"] for r in results) / 2 ** 20
    single = [r["aggregate_images_per_s"] for r in earlier if r["trials"] == 1 and r["mps"] == row["mps"] and
              r["cuda_graphs"] == row["cuda_graphs"] and r["aggregate_images_per_s"]]
    one = row["aggregate_images_per_s"] if row["trials"] == 1 else (single[0] if single else None)
    row["speedup_vs_one"] = row["aggregate_images_per_s"] / one if one else None
    row["graph_captured"] = all(r.get("graph_captured") for r in results)
    return {**row, "runs": results}


@contextmanager
def mps_daemon() -> Iterator[str | None]:
    """A CUDA MPS control daemon of this run's own (pipe and log folders in a temporary directory, or under
    $GENSWEEP_MPS_DIR where the runner named one, so it can stop the daemon if this process is killed first;
    exported to the trial processes spawned inside), quit on exit. Yields None when it runs, else one line saying
    why not."""
    control = shutil.which(MPS_CONTROL)
    if control is None:
        yield f"CUDA MPS not available: {MPS_CONTROL} is not on PATH"
        return
    saved = {k: os.environ.get(k) for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")}
    base = os.environ.get(MPS_DIR_ENV)
    with nullcontext(base) if base else tempfile.TemporaryDirectory(prefix="gensweep-mps-") as tmp:
        pipe, log = mps_dirs(tmp)
        os.environ["CUDA_MPS_PIPE_DIRECTORY"], os.environ["CUDA_MPS_LOG_DIRECTORY"] = str(pipe), str(log)
        pipe.mkdir(parents=True, exist_ok=True), log.mkdir(parents=True, exist_ok=True)
        try:
            started = subprocess.run([control, "-d"], capture_output=True, text=True, timeout=30)
            if started.returncode != 0:
                yield f"CUDA MPS did not start: {(started.stderr or started.stdout).strip() or started.returncode}"
                return
            yield None
        finally:
            subprocess.run([control], input="quit\n", capture_output=True, text=True, timeout=30)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_concurrent_trials(n: int, model_name: str, params: dict[str, Any], device: str, steps: int, warmup: int,
                          threads: int, timeout_s: float = 900) -> list[dict[str, Any]]:
    """Start n training processes (spawned: CUDA cannot be forked), wait for all to warm up, time them together."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_pack_worker, args=(rank, model_name, params, device, steps, warmup, threads,
                                                    barrier, queue)) for rank in range(n)]
    for proc in procs:
        proc.start()
    results = []
    try:
        for _ in range(n):
            results.append(queue.get(timeout=timeout_s))
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
    return sorted(results, key=lambda r: r.get("rank", 0))


def _pack_worker(rank: int, model_name: str, params: dict[str, Any], device: str, steps: int, warmup: int,
                 threads: int, barrier, queue) -> None:
    try:
        from genmodels.experiment import make_experiment

        torch.set_num_threads(threads)
        dev = torch.device(device)
        bs = int(params["batch_size"])
        images = bench_images((warmup + steps + 1) * bs, seed=rank)
        exp = make_experiment(model_name, {**params, "steps_per_epoch": steps, "seed": rank}, images, images[:bs],
                              device=dev)
        exp.train_epoch(warmup)
        sync(dev)
        barrier.wait(timeout=600)
        start = time.time()  # wall clock: comparable across processes
        exp.train_epoch()
        sync(dev)
        peak = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None
        queue.put(dict(rank=rank, start=start, end=time.time(), images=steps * bs,
                       graph_captured=exp.graph_captured, peak_memory_bytes=peak))
    except BaseException:  # noqa: BLE001 - every failure (OOM included) goes back to the parent as a row
        barrier.abort()
        queue.put(dict(rank=rank, error=traceback.format_exc()))


