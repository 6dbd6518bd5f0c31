"""train: training images/s of the engine's fast path against the seeds' way of training, measured in the same run;
for NCSN also annealed Langevin sampling steps/s."""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import warnings
from typing import Any, Callable

import torch
from torch import nn

from bench.common import (
    BENCH_MODELS,
    CIFAR_TRAIN_IMAGES,
    bench_config,
    bench_images,
    flops_per_image,
    peak_flops,
    peak_memory,
    reset_memory,
    timed_run,
    trial_steps,
    write_json,
)


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
    reset_memory(device)
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

    warmup_s = timed_run(lambda: run(warmup), device)
    seconds = [timed_run(lambda: run(steps), device) for _ in range(repeats)]
    batches = None  # stops the workers
    return _measurement(cfg.batch_size, steps, seconds, warmup_s, peak_memory(device))


def fast_training(model_name: str, params: dict[str, Any], images: torch.Tensor, device: torch.device,
                  steps: int, warmup: int, repeats: int, count_syncs: bool = True) -> dict[str, Any]:
    """Train through the engine (Experiment.train_epoch with steps_per_epoch), as every trial does; images/s of
    `steps`-step epochs after a `warmup`-step epoch (allocator, cuDNN autotuning, compilation)."""
    from genmodels.experiment import make_experiment

    reset_memory(device)
    batch_size = int(params["batch_size"])
    exp = make_experiment(model_name, {**params, "steps_per_epoch": steps, "eval_images": batch_size},
                          images, images[:batch_size], device=device)
    warmup_s = timed_run(lambda: exp.train_epoch(warmup), device)
    seconds = [timed_run(exp.train_epoch, device) for _ in range(repeats)]
    result = _measurement(batch_size, steps, seconds, warmup_s, peak_memory(device))
    result["graph_captured"] = exp.graph_captured
    result["host_syncs_per_epoch"] = _count_host_syncs(exp.train_epoch) if count_syncs and \
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
                  autocast: bool = False, graphed: bool | None = None) -> dict[str, Any]:
    """Annealed Langevin steps per second of `model.sample` (NCSN) on `batch` chains; one step is one score
    evaluation of the whole batch (the final denoising step included). `graphed`: as NCSN.sample takes it.
    `autocast`: bf16 autocast around the sampler, which the default sampling_precision fp32 leaves on (NCSN.sample
    opens no autocast of its own then), so the score network runs in bf16 as under sampling_precision=bf16."""
    steps = model.schedule.L * steps_per_level + int(model.cfg.denoise)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model.sample(batch, T=steps_per_level, batch_size=batch, graphed=graphed)

    warmup_s = timed_run(run, device)
    seconds = [timed_run(run, device) for _ in range(repeats)]
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
    p.add_argument("--compile-modes", default="default",
                   help="with --compile: comma-separated torch.compile modes to measure (default, "
                        "max-autotune-no-cudagraphs, max-autotune, reduce-overhead); the last two use Inductor's "
                        "CUDA graphs instead of the engine's. Run twice with one TORCHINDUCTOR_CACHE_DIR for a warm "
                        "cache's compile time")
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
        write_partial(args, rows)
        if cuda and run_fast and params.get("cuda_graphs", False):  # what the graphs alone buy
            eager = fast_training(model_name, {**params, "cuda_graphs": False}, images, device, steps, warmup,
                                  args.repeats, count_syncs=False)
            rows.append(_train_row(name, "training, cuda_graphs=False", params, gflops, peak, base, eager))
            write_partial(args, rows)
        if model_name == "ncsn":
            rows += _sampling_rows(name, params, images, device, bs, args, peak, run_baseline, run_fast)
            write_partial(args, rows)
        for mode in [m for m in args.compile_modes.split(",") if m] if args.compile and run_fast else []:
            compiled = fast_training(model_name, {**params, "compile": True, "compile_mode": mode}, images, device,
                                     steps, warmup, args.repeats, count_syncs=False)
            row = _train_row(name, f"training, compile=True, mode {mode}", params, gflops, peak, base, compiled)
            row["compile"] = _compile_payback(fast, compiled, warmup, trial_steps(params))
            rows.append(row)
            write_partial(args, rows)
        del images
    meta = {"size": size, "peak_flops": peak, "peak_source": peak_source, "baseline_workers": args.workers}
    return rows, meta


def write_partial(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The rows measured so far, to --json: a run stopped for time (bench all) keeps what it measured."""
    write_json(args.json, {"benchmark": "train", "partial": True, "rows": rows})


def _train_row(name: str, what: str, params: dict[str, Any], gflops: float, peak: float | None,
               base: dict[str, Any] | None, fast: dict[str, Any] | None) -> dict[str, Any]:
    return _row(name, what, int(params["batch_size"]), "images/s", "images_per_s", gflops, peak, base, fast)


def _row(name: str, what: str, batch_size: int, unit: str, rate: str, gflops: float | None, peak: float | None,
         base: dict[str, Any] | None, fast: dict[str, Any] | None, images_per_unit: int = 1) -> dict[str, Any]:
    """The baseline's run against the fast one's: `rate` (the key of each run's figure, in `unit`), peak memory, and
    MFU (one `unit` is `images_per_unit` images' worth of `gflops`). Every row of bench train is one of these."""
    b, f = (m[rate] if m else None for m in (base, fast))
    return dict(model=name, what=what, batch_size=batch_size, unit=unit, baseline=b, fast=f,
                speedup=f / b if b and f else None, mem_baseline_mib=_mib(base), mem_fast_mib=_mib(fast),
                gflops_per_image=gflops, mfu_baseline=_mfu(b, images_per_unit, gflops, peak),
                mfu_fast=_mfu(f, images_per_unit, gflops, peak), baseline_run=base, fast_run=fast)


def _mib(run: dict[str, Any] | None) -> float | None:
    return run["peak_memory_bytes"] / 2 ** 20 if run and run.get("peak_memory_bytes") is not None else None


def _mfu(rate: float | None, images_per_unit: int, gflops: float | None, peak: float | None) -> float | None:
    return gflops * 1e9 * images_per_unit * rate / peak if rate and gflops and peak else None


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
    copy: channels_last on CUDA); on CUDA also a bf16-autocast run (sampling_precision=bf16, off by default) and
    chain-steps/s at the sampler's own batch."""
    from genmodels.engine import seed_everything
    from genmodels.experiment import make_experiment
    from genmodels.registry import build_model

    T, reps = args.sampling_steps, args.repeats
    gflops = None
    base = fast = None
    if run_baseline:
        reset_memory(device)
        torch.backends.cudnn.benchmark = False  # torch's default; a Trainer built earlier in this run turned it on
        seed_everything(0)
        model = build_model("ncsn", params, channels=3).to(device).eval()
        gflops = score_flops_per_image(model, device) / 1e9
        base = {**sampling_rate(model, device, batch, T, reps, graphed=False),
                "peak_memory_bytes": peak_memory(device)}
        del model
    if run_fast:
        reset_memory(device)
        model = make_experiment("ncsn", params, images[:batch], images[:batch], device=device).eval_model.eval()
        gflops = gflops or score_flops_per_image(model, device) / 1e9
        fast = {**sampling_rate(model, device, batch, T, reps), "peak_memory_bytes": peak_memory(device)}
    rows = [_sampling_row(name, "sampling (Langevin steps)", batch, gflops, peak, base, fast)]
    if run_fast and device.type == "cuda":
        bf16 = {**sampling_rate(model, device, batch, T, reps, autocast=True), "peak_memory_bytes": None}
        rows.append(_sampling_row(name, "sampling, bf16 autocast (sampling_precision=bf16, off by default)", batch,
                                  gflops, peak, base, bf16))
        rows.append(_sampler_batch_row(name, model, device, 1, 1, gflops, peak))  # thousands of chains: T=1, once
    return rows


TODAYS_CHAINS = 1000  # the chains per batch NCSN.sample used on a GPU before it sized them to the GPU's memory


def _sampler_batch_row(name: str, model: nn.Module, device: torch.device, T: int, reps: int, gflops: float,
                       peak: float | None) -> dict[str, Any]:
    """Chain-steps/s at the batch each sampler really uses: the eager sampler at TODAYS_CHAINS chains against
    graphed steps at `chains_that_fit` chains (what a trial's FID ladder now samples with)."""
    chains = model.chains_that_fit()
    runs = {}
    for key, batch, graphed in (("baseline", TODAYS_CHAINS, False), ("fast", chains, True)):
        run = sampling_rate(model, device, batch, T, reps, graphed=graphed)
        runs[key] = {**run, "chain_steps_per_s": run["steps_per_s"] * batch}
    return _row(name, f"sampling chain-steps/s: eager at {TODAYS_CHAINS} chains vs graphed at {chains}", chains,
                "chain-steps/s", "chain_steps_per_s", gflops, peak, runs["baseline"], runs["fast"])


def _sampling_row(name: str, what: str, batch: int, gflops: float, peak: float | None,
                  base: dict[str, Any] | None, fast: dict[str, Any] | None) -> dict[str, Any]:
    return _row(name, what, batch, "steps/s", "steps_per_s", gflops, peak, base, fast, images_per_unit=batch)


