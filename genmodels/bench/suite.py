"""Benchmarks, one subcommand each, printed as a table and optionally written as JSON.

    python -m genmodels.bench train --json train.json              # every model, fast path against the seeds' way
    python -m genmodels.bench train --models vae,ncsn --size small --device cpu --steps 10
    python -m genmodels.bench pack --model vae --trials 1,2,4,8    # concurrent trials on one GPU
    python -m genmodels.bench flops --size full                     # work per image; images/s at a target MFU
    python -m genmodels.bench fid --device cpu --n 64 --fid-weights PATH --json fid-cpu.json
    python -m genmodels.bench all --budget-s 420 --json all.json      # the whole suite, one budget, one JSON

Adding a benchmark: a function `bench_NAME(args)` returning a list of row dicts (or rows and a dict of run-wide
facts), a function adding its arguments to a subparser, and one entry in BENCHMARKS. Row values that are dicts
(raw measurements) go to the JSON only, not to the printed table.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


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
# train: training images/s of the engine's fast path against the seeds' way of training, measured in the same run

# name: (registry model, `full` config, `small` config). The full configs are the `full` presets of sweeps/spaces.py
# (which imports ray, so genmodels cannot read them; tests/test_bench.py checks that they agree), with the model's
# defaults where a sweep searches the value; the small ones are the smoke presets' CI-sized networks. `epochs` and
# `steps_per_epoch` give a trial's length (for compile's payback); the benchmark sets its own steps.
BENCH_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "vae": ("vae", dict(arch="conv", batch_size=128, epochs=150),
            dict(arch="conv-small", width=8, batch_size=64, epochs=4, steps_per_epoch=8)),
    "resnet_vae": ("vae", dict(arch="resnet", norm="group", width=32, batch_size=128, epochs=100),
                   dict(arch="resnet", norm="group", width=8, batch_size=32, epochs=3, steps_per_epoch=8)),
    "iwae": ("iwae", dict(arch="conv", norm="group", batch_size=64, epochs=100),
             dict(arch="conv-small", width=8, batch_size=32, epochs=3, steps_per_epoch=6)),
    # random VGG weights: the same FLOPs as ImageNet's, and nothing to download
    "dfc": ("dfc", dict(arch="resnet", norm="group", batch_size=128, lr=1e-3, epochs=50, vgg_weights="random"),
            dict(arch="resnet", norm="group", width=8, batch_size=16, epochs=3, steps_per_epoch=4,
                 vgg_weights="random")),
    "vqvae": ("vqvae", dict(width=128, res_blocks=2, prior_width=128, prior_layers=6, restart_window=100,
                            batch_size=128, stage1_epochs=60, epochs=90),
              dict(width=32, res_blocks=1, prior_width=16, prior_layers=4, restart_window=20, codebook_size=64,
                   batch_size=32, stage1_epochs=6, epochs=10, steps_per_epoch=25)),
    # the VQ-VAE's second stage: the PixelCNN prior on the codes of the frozen autoencoder
    "vqvae_prior": ("vqvae", dict(width=128, res_blocks=2, prior_width=128, prior_layers=6, batch_size=128,
                                  stage1_epochs=0, epochs=30),
                    dict(width=32, res_blocks=1, prior_width=16, prior_layers=4, codebook_size=64, batch_size=32,
                         stage1_epochs=0, epochs=4, steps_per_epoch=25)),
    "ncsn": ("ncsn", dict(arch="unet", width=128, ema_decay=0.999, batch_size=128, epochs=100, steps_per_epoch=2000),
             dict(arch="unet", width=8, unet_blocks=1, num_levels=3, ema_decay=0.999, batch_size=64, epochs=4,
                  steps_per_epoch=8)),
    "ncsn_refinenet": ("ncsn", dict(arch="refinenet", width=128, ema_decay=0.999, batch_size=128, epochs=100,
                                    steps_per_epoch=2000),
                       dict(arch="refinenet", width=8, num_levels=3, ema_decay=0.999, batch_size=16, epochs=4,
                            steps_per_epoch=8)),
}
CIFAR_TRAIN_IMAGES = 50_000  # a full trial's epoch, for its length in steps

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), matched against torch.cuda.get_device_name.
GPU_PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))


def bench_config(name: str, size: str, batch_size: int | None = None) -> tuple[str, dict[str, Any]]:
    """The registry model and flat config that benchmark `name` trains at `size` (small | full)."""
    if name not in BENCH_MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(BENCH_MODELS)}")
    model, full, small = BENCH_MODELS[name]
    params = dict(full if size == "full" else small)
    if batch_size:
        params["batch_size"] = batch_size
    return model, params


def trial_steps(params: dict[str, Any]) -> int:
    """Optimizer steps of a whole trial at this config on CIFAR-10 (the full presets' length)."""
    per_epoch = params.get("steps_per_epoch") or CIFAR_TRAIN_IMAGES // params["batch_size"]
    return int(params.get("epochs", 1)) * per_epoch


def bench_images(n: int, seed: int = 0) -> torch.Tensor:
    """n uint8 CIFAR-sized images: the procedural set, tiled (throughput does not depend on the content)."""
    from genmodels.data import synthetic_images

    base = synthetic_images(min(n, 2048), seed=seed)
    return base.repeat(math.ceil(n / len(base)), 1, 1, 1)[:n].contiguous()


def peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    """The FLOP/s that MFU is measured against, and where the number comes from."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name}: {key} datasheet dense bf16 peak ({tflops} TFLOP/s)"
        return None, f"{name}: not in GPU_PEAK_TFLOPS; pass --peak-tflops for MFU"
    n, threads = 1024, torch.get_num_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, device) for _ in range(5))
    return 2 * n ** 3 / best, f"measured on this CPU: best of 5 fp32 {n}x{n} matmuls, {threads} threads"


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def flops_per_image(model_name: str, params: dict[str, Any], device: torch.device, batch: int = 8) -> float:
    """FLOPs of one forward and backward of `model.loss` per image (torch.utils.flop_counter: matmuls and
    convolutions, the tensor-core work; elementwise ops are not counted), on a fresh copy of the model."""
    from torch.utils.flop_counter import FlopCounterMode

    from genmodels.registry import build_model

    model = build_model(model_name, params, channels=3).to(device).train()
    model.start_epoch(0)
    x = bench_images(batch).to(device)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(x)
        loss.backward()
    return counter.get_total_flops() / batch


class CIFARLike(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's item path on in-memory images: an (N, 32, 32, 3) uint8 array, a PIL image per
    item, then the transform (RandomHorizontalFlip, ToTensor): floats made on the host, one image at a time."""

    def __init__(self, images: torch.Tensor, flip: bool):
        from torchvision import transforms

        self.data = images.permute(0, 2, 3, 1).numpy()  # CIFAR10.data's layout
        self.transform = transforms.Compose([transforms.RandomHorizontalFlip()] * flip + [transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i]))


def baseline_training(model_name: str, params: dict[str, Any], images: torch.Tensor, device: torch.device,
                      steps: int, warmup: int, repeats: int, workers: int) -> dict[str, Any]:
    """Train the way the seeds did: fp32, NCHW, a DataLoader with worker processes making float tensors on the host,
    a pageable host-to-device copy per step, torch's default (unfused) Adam, a per-parameter EMA loop and a
    `loss.item()` per step. Same model, config and per-step work as the engine; `steps` images/s after `warmup`."""
    from genmodels.engine import seed_everything
    from genmodels.registry import build_model, trial_config

    cfg = trial_config(params, model_name).train
    _reset_memory(device)
    torch.backends.cudnn.benchmark = False  # torch's default, which the seeds kept
    seed_everything(cfg.seed)
    model = build_model(model_name, params, channels=images.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    loader = torch.utils.data.DataLoader(CIFARLike(images, cfg.flip), batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True)
    batches = iter(loader)  # sized by the caller to last the whole run: no epoch restart inside a timed window
    model.train()
    model.start_epoch(0)
    done = 0

    def run(n: int) -> None:
        nonlocal done
        running_loss = 0.0
        for _ in range(n):
            x = next(batches).to(device)  # float32: four times the bytes of the uint8 images
            x = (x * 255).round().to(torch.uint8)  # exact inverse of ToTensor: the engine's models take uint8
            loss, _ = model.loss(x)
            optimizer.zero_grad()
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), model.parameters()):
                        p_ema.mul_(cfg.ema_decay).add_(p, alpha=1 - cfg.ema_decay)
            done += 1
            model.extra_train_step(done)
            running_loss += loss.item()

    warmup_s = _timed(lambda: run(warmup), device)
    seconds = [_timed(lambda: run(steps), device) for _ in range(repeats)]
    batches = None  # stops the workers
    return _measurement(cfg.batch_size, steps, seconds, warmup_s, _peak_memory(device))


def fast_training(model_name: str, params: dict[str, Any], images: torch.Tensor, device: torch.device,
                  steps: int, warmup: int, repeats: int, count_syncs: bool = True) -> dict[str, Any]:
    """Train through the engine (Trainer.train_epoch with steps_per_epoch), as every trial does; images/s of
    `steps`-step epochs after a `warmup`-step epoch (allocator, cuDNN autotuning, compilation)."""
    from genmodels.experiment import make_experiment

    _reset_memory(device)
    batch_size = int(params["batch_size"])
    trainer = make_experiment(model_name, {**params, "steps_per_epoch": warmup, "eval_images": batch_size},
                           images, images[:batch_size], device=device).trainer
    warmup_s = _timed(trainer.train_epoch, device)
    trainer.cfg.steps_per_epoch = steps
    seconds = [_timed(trainer.train_epoch, device) for _ in range(repeats)]
    result = _measurement(batch_size, steps, seconds, warmup_s, _peak_memory(device))
    result["host_syncs_per_epoch"] = _count_host_syncs(trainer.train_epoch) if count_syncs and \
        device.type == "cuda" else None
    return result


def _measurement(batch_size: int, steps: int, seconds: list[float], warmup_s: float,
                 peak_memory: int | None) -> dict[str, Any]:
    step_s = statistics.median(seconds) / steps
    return dict(images_per_s=batch_size / step_s, step_ms=1000 * step_s, batch_size=batch_size, steps=steps,
                seconds=seconds, warmup_s=warmup_s, peak_memory_bytes=peak_memory)


def _count_host_syncs(fn: Callable[[], Any]) -> int:
    """Host-device synchronisations that torch.cuda's sync debug mode flags while `fn` runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sampling_rate(model: nn.Module, device: torch.device, batch: int, steps_per_level: int, repeats: int,
                  autocast: bool = False) -> dict[str, Any]:
    """Annealed Langevin steps per second of `model.sample` (NCSN) on `batch` chains; one step is one score
    evaluation of the whole batch (the final denoising step included)."""
    steps = len(model.sigmas) * steps_per_level + int(model.cfg.denoise)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model.sample(batch, steps_per_level=steps_per_level, batch_size=batch)

    warmup_s = _timed(run, device)
    seconds = [_timed(run, device) for _ in range(repeats)]
    step_s = statistics.median(seconds) / steps
    return dict(steps_per_s=1 / step_s, step_ms=1000 * step_s, batch_size=batch, steps=steps, seconds=seconds,
                warmup_s=warmup_s)


def score_flops_per_image(model: nn.Module, device: torch.device, batch: int = 8) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(batch, model.channels, 32, 32, device=device)
    levels = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.score(x, levels)
    return counter.get_total_flops() / batch


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(BENCH_MODELS), help=f"comma-separated: {', '.join(BENCH_MODELS)}")
    p.add_argument("--size", choices=["small", "full"], default=None,
                   help="full: the sweeps' full-preset networks; small: CI-sized (default: full on cuda, else small)")
    p.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default: 50 on cuda, 5 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on cuda, 2 on cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per mode; the median is reported")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="baseline DataLoader worker processes (default: min(4, CPUs))")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--baseline", action="store_true", help="measure only the baseline (the seeds' way)")
    mode.add_argument("--fast", action="store_true", help="measure only the engine's fast path")
    p.add_argument("--compile", action="store_true",
                   help="also train with compile=True, reporting compile time and the steps it takes to pay back")
    p.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default=None,
                   help="the fast path's memory_format (default: the engine's, auto = channels_last on cuda)")
    p.add_argument("--sampling-steps", type=int, default=2, help="Langevin steps per noise level timed (ncsn)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: known GPUs' "
                                                                    "bf16 peak; a measured matmul on cpu)")


def bench_train(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("full" if cuda else "small")
    steps = args.steps or (50 if cuda else 5)
    warmup = args.warmup or (10 if cuda else 2)
    run_baseline, run_fast = not args.fast, not args.baseline
    peak, peak_source = peak_flops(device, args.peak_tflops)
    names = [m for m in args.models.split(",") if m]
    rows = []
    for name in names:
        model_name, params = bench_config(name, size, args.batch_size)
        if args.memory_format:
            params["memory_format"] = args.memory_format  # read by the engine only: the baseline stays NCHW
        bs = int(params["batch_size"])
        # Enough images that the baseline's DataLoader never starts a new epoch inside the run; a full CIFAR-10
        # train split on the GPU for the fast path's memory figure.
        needed = (warmup + steps * args.repeats + 1) * bs
        images = bench_images(max(needed, CIFAR_TRAIN_IMAGES if size == "full" else 0))
        gflops = flops_per_image(model_name, params, device) / 1e9
        base = baseline_training(model_name, params, images, device, steps, warmup, args.repeats, args.workers) \
            if run_baseline else None
        fast = fast_training(model_name, params, images, device, steps, warmup, args.repeats) if run_fast else None
        rows.append(_train_row(name, "training", params, gflops, peak, base, fast))
        if args.compile and run_fast:
            compiled = fast_training(model_name, {**params, "compile": True}, images, device, steps, warmup,
                                     args.repeats, count_syncs=False)
            row = _train_row(name, "training, compile=True", params, gflops, peak, base, compiled)
            row["compile"] = _compile_payback(fast, compiled, warmup, trial_steps(params))
            rows.append(row)
        if model_name == "ncsn":
            rows += _sampling_rows(name, params, images, device, bs, args, peak, run_baseline, run_fast)
        del images
    meta = {"size": size, "peak_flops": peak, "peak_source": peak_source, "baseline_workers": args.workers}
    return rows, meta


def _train_row(name: str, what: str, params: dict[str, Any], gflops: float, peak: float | None,
               base: dict[str, Any] | None, fast: dict[str, Any] | None) -> dict[str, Any]:
    def mib(m: dict[str, Any] | None) -> float | None:
        return m["peak_memory_bytes"] / 2 ** 20 if m and m["peak_memory_bytes"] is not None else None

    def mfu(m: dict[str, Any] | None) -> float | None:
        return gflops * 1e9 * m["images_per_s"] / peak if m and peak else None

    b, f = (m["images_per_s"] if m else None for m in (base, fast))
    return dict(model=name, what=what, batch_size=int(params["batch_size"]), unit="images/s", baseline=b, fast=f,
                speedup=f / b if b and f else None, mem_baseline_mib=mib(base), mem_fast_mib=mib(fast),
                gflops_per_image=gflops, mfu_baseline=mfu(base), mfu_fast=mfu(fast), baseline_run=base,
                fast_run=fast)


def _compile_payback(eager: dict[str, Any], compiled: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    """Compile time (the warm-up epoch's excess over its steps at the compiled speed) against a full trial."""
    compile_s = compiled["warmup_s"] - warmup * compiled["step_ms"] / 1000
    saved_per_step = (eager["step_ms"] - compiled["step_ms"]) / 1000
    return dict(compile_s=compile_s, saved_ms_per_step=1000 * saved_per_step,
                break_even_steps=compile_s / saved_per_step if saved_per_step > 0 else None,
                trial_steps=steps, trial_saving_s=steps * saved_per_step - compile_s)


def _sampling_rows(name: str, params: dict[str, Any], images: torch.Tensor, device: torch.device, batch: int,
                   args: argparse.Namespace, peak: float | None, run_baseline: bool,
                   run_fast: bool) -> list[dict[str, Any]]:
    """NCSN sampling: the seeds' way (fp32, NCHW model) against the model a trial samples from (the Trainer's EMA
    copy: channels_last on CUDA); on CUDA also a bf16-autocast run, which sample() does not use yet."""
    from genmodels.engine import seed_everything
    from genmodels.experiment import make_experiment
    from genmodels.registry import build_model

    T, reps = args.sampling_steps, args.repeats
    gflops = None
    base = fast = None
    if run_baseline:
        _reset_memory(device)
        torch.backends.cudnn.benchmark = False  # torch's default; a Trainer built earlier in this run turned it on
        seed_everything(0)
        model = build_model("ncsn", params, channels=3).to(device).eval()
        gflops = score_flops_per_image(model, device) / 1e9
        base = {**sampling_rate(model, device, batch, T, reps), "peak_memory_bytes": _peak_memory(device)}
        del model
    if run_fast:
        _reset_memory(device)
        model = make_experiment("ncsn", params, images[:batch], images[:batch], device=device).trainer.eval_model.eval()
        gflops = gflops or score_flops_per_image(model, device) / 1e9
        fast = {**sampling_rate(model, device, batch, T, reps), "peak_memory_bytes": _peak_memory(device)}
    rows = [_sampling_row(name, "sampling (Langevin steps)", batch, gflops, peak, base, fast)]
    if run_fast and device.type == "cuda":
        bf16 = {**sampling_rate(model, device, batch, T, reps, autocast=True), "peak_memory_bytes": None}
        rows.append(_sampling_row(name, "sampling, bf16 autocast (not used by sample() yet)", batch, gflops, peak,
                                  base, bf16))
    return rows


def _sampling_row(name: str, what: str, batch: int, gflops: float, peak: float | None,
                  base: dict[str, Any] | None, fast: dict[str, Any] | None) -> dict[str, Any]:
    def mib(m: dict[str, Any] | None) -> float | None:
        return m["peak_memory_bytes"] / 2 ** 20 if m and m["peak_memory_bytes"] is not None else None

    def mfu(m: dict[str, Any] | None) -> float | None:
        return gflops * 1e9 * batch * m["steps_per_s"] / peak if m and peak else None

    b, f = (m["steps_per_s"] if m else None for m in (base, fast))
    return dict(model=name, what=what, batch_size=batch, unit="steps/s", baseline=b, fast=f,
                speedup=f / b if b and f else None, mem_baseline_mib=mib(base), mem_fast_mib=mib(fast),
                gflops_per_image=gflops, mfu_baseline=mfu(base), mfu_fast=mfu(fast), baseline_run=base,
                fast_run=fast)


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


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
    return rows, {"size": args.size, "target": f"{args.mfu:.0%} of {args.peak_tflops} TFLOP/s"}


# ----------------------------------------------------------------------------------------------------------------
# pack: several trials training at once on one device, against one alone


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vae", choices=list(BENCH_MODELS))
    p.add_argument("--trials", default="1,2,4", help="comma-separated numbers of concurrent trials (1 is added)")
    p.add_argument("--size", choices=["small", "full"], default=None, help="default: full on cuda, else small")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per trial (default: 200 on cuda, 5 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 20 on cuda, 2 on cpu)")


def bench_pack(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Aggregate images/s of N trial processes on one device, each on the engine's fast path, started together
    behind a barrier; aggregate = all images / (last end - first start)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("full" if cuda else "small")
    steps, warmup = args.steps or (200 if cuda else 5), args.warmup or (20 if cuda else 2)
    model_name, params = bench_config(args.model, size, args.batch_size)
    counts = sorted({1, *(int(n) for n in args.trials.split(",") if n)})
    threads = torch.get_num_threads()
    rows, single = [], None
    for n in counts:
        # On a CPU the trials split the cores; on a GPU each keeps the default threads for its host work.
        per_trial_threads = threads if cuda else max(1, threads // n)
        results = run_concurrent_trials(n, model_name, params, str(device), steps, warmup, per_trial_threads)
        errors = [r["error"] for r in results if "error" in r]
        row = dict(model=args.model, trials=n, batch_size=int(params["batch_size"]), aggregate_images_per_s=None,
                   per_trial_images_per_s=None, speedup_vs_one=None, peak_mem_per_trial_mib=None, error=None)
        if errors:
            row["error"] = errors[0].strip().splitlines()[-1]
        else:
            window = max(r["end"] for r in results) - min(r["start"] for r in results)
            row["aggregate_images_per_s"] = sum(r["images"] for r in results) / window
            row["per_trial_images_per_s"] = statistics.mean(r["images"] / (r["end"] - r["start"]) for r in results)
            if results[0]["peak_memory_bytes"] is not None:
                row["peak_mem_per_trial_mib"] = max(r["peak_memory_bytes"] for r in results) / 2 ** 20
            if n == 1:
                single = row["aggregate_images_per_s"]
            row["speedup_vs_one"] = row["aggregate_images_per_s"] / single if single else None
        row["runs"] = results
        rows.append(row)
    note = None if cuda else "CPU run: trials share the CPU cores; says nothing about packing trials on a GPU"
    if note:
        print(f"note: {note}")
    meta = {"size": size, "steps": steps, "warmup": warmup, "note": note}
    if cuda:
        meta["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return rows, meta


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
        trainer = make_experiment(model_name, {**params, "steps_per_epoch": warmup, "seed": rank}, images,
                               images[:bs], device=dev).trainer
        trainer.train_epoch()
        trainer.cfg.steps_per_epoch = steps
        _sync(dev)
        barrier.wait(timeout=600)
        start = time.time()  # wall clock: comparable across processes
        trainer.train_epoch()
        _sync(dev)
        queue.put(dict(rank=rank, start=start, end=time.time(), images=steps * bs,
                       peak_memory_bytes=torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None))
    except BaseException:  # noqa: BLE001 - every failure (OOM included) goes back to the parent as a row
        barrier.abort()
        queue.put(dict(rank=rank, error=traceback.format_exc()))


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
    from genmodels.metrics.fid import FIDScorer

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

BENCHMARKS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]] = {
    "train": (add_train_arguments, bench_train),
    "pack": (add_pack_arguments, bench_pack),
    "flops": (add_flops_arguments, bench_flops),
    "fid": (add_fid_arguments, bench_fid),
}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned columns; nested values (raw measurements) and columns empty in every row are left out."""
    columns = [c for c in (rows[0] if rows else {})
               if not all(row.get(c) is None or isinstance(row.get(c), (dict, list)) for row in rows)]
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
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
           "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "load_average": _load_average()}  # at the end of the run: 1, 5 and 15 minute means
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    result = BENCHMARKS[args.benchmark][1](args)
    rows, meta = result if isinstance(result, tuple) else (result, {})
    env = environment(torch.device(args.device))
    print(", ".join(f"{k}={v}" for k, v in {**env, **meta}.items() if v is not None))
    print(format_table(rows))
    report = {"benchmark": args.benchmark, **env, **meta, "rows": rows}
    write_json(args.json, report)
    return report


def write_json(path: Path | None, report: dict) -> None:
    """The raw measurements, when --json asked for them."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
