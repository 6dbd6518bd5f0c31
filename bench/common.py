"""What every benchmark shares: the models and sizes benchmarked, synthetic images, timing with device syncs,
peak FLOP/s and memory, the environment record, the table and the JSON."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from bench.processes import ROWS_ENV, append_rows
from genmodels.io import write_text_atomic
from sweeps.budgets import FIDSettings
from sweeps.domains import is_searched
from sweeps.spaces import FID_SETTINGS, FULL_DATA, SMOKE_DATA, SPACES, Preset, Space


def add_run_arguments(p) -> None:
    """The flags every benchmark takes: where it runs, on how many CPU threads, and where its JSON goes."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# name: (the space of sweeps/spaces.py it trains, overrides by size). Size `full` is the space's `full` preset and
# `small` its `smoke` preset (its CI-sized network), every value the sweep searches at the model's default, then the
# overrides of that size (a callable one is computed from the preset's config). `epochs` and `steps_per_epoch` give a
# trial's length (for compile's payback); the benchmark sets its own steps.
_PRIOR_ONLY = {"stage1_epochs": 0, "epochs": lambda preset: preset["epochs"] - preset["stage1_epochs"]}
_NCSN_FULL = {"arch": "unet", "width": 128, "ema_decay": 0.999, "num_levels": 10}  # the seed's network, NCSN's L
BENCH_MODELS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "vae": ("vae", {}),
    "resnet_vae": ("resnet_vae", {"full": {"width": 32}}),
    "iwae": ("iwae", {}),
    "dfc": ("dfc", {"full": {"vgg_weights": "random"}}),  # random VGG weights: ImageNet's FLOPs, nothing to download
    "vqvae": ("vqvae", {"small": {"codebook_size": 64}}),
    # the VQ-VAE's second stage: the PixelCNN prior on the codes of the frozen autoencoder
    "vqvae_prior": ("vqvae", {"full": _PRIOR_ONLY, "small": {**_PRIOR_ONLY, "codebook_size": 64}}),
    "ncsn": ("ncsn", {"full": _NCSN_FULL, "small": {"gamma": 0.1}}),
    "ncsn_refinenet": ("ncsn", {"full": {**_NCSN_FULL, "arch": "refinenet"},
                                "small": {"arch": "refinenet", "gamma": 0.1, "batch_size": 16}}),
}
CIFAR_TRAIN_IMAGES = 50_000  # a full trial's epoch, for its length in steps
CIFAR_TEST_IMAGES = 10_000
SMOKE_IMAGES = (SMOKE_DATA["train_size"], SMOKE_DATA["test_size"])  # the smoke presets' synthetic splits


class TrialPreset(NamedTuple):
    """What a whole trial adds to a BENCH_MODELS network at one preset: ASHA's schedule, the metric the sweep ranks
    by (FID: the FID ladder runs at every milestone; a full-only metric: a full evaluation there; a likelihood: the
    end-of-trial bound runs), and the preset's FID budgets."""
    grace_period: int
    reduction_factor: int
    metric: str
    fid: FIDSettings

    @property
    def fid_ranked(self) -> bool:
        return self.metric == "fid"


def _space_preset(name: str, size: str) -> tuple[Space, Preset]:
    """The sweeps.spaces Space and Preset that benchmark `name` trains at `size` (small | full)."""
    if name not in BENCH_MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(BENCH_MODELS)}")
    space = SPACES[BENCH_MODELS[name][0]]
    return space, space.presets["full" if size == "full" else "smoke"]


def bench_config(name: str, size: str, batch_size: int | None = None) -> tuple[str, dict[str, Any]]:
    """The registry model and flat config that benchmark `name` trains at `size` (small | full)."""
    space, preset = _space_preset(name, size)
    config = {**space.params, **preset.config}
    params = {k: v for k, v in config.items() if not is_searched(v) and k not in {*SMOKE_DATA, *FULL_DATA}}
    for key, value in BENCH_MODELS[name][1].get(size, {}).items():
        params[key] = value(config) if callable(value) else value
    if batch_size:
        params["batch_size"] = batch_size
    return space.model, params


def trial_preset(name: str, size: str) -> TrialPreset:
    """ASHA's schedule, the ranking metric and the FID budgets of the sweep preset benchmark `name` trains at
    `size`."""
    space, preset = _space_preset(name, size)
    fid = preset.fid or FID_SETTINGS["full" if size == "full" else "smoke"]
    return TrialPreset(preset.grace_period, preset.reduction_factor, space.metric, fid)


# Dense bf16 tensor-core peaks from the datasheets (no sparsity), matched against torch.cuda.get_device_name.
GPU_PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))


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
    best = min(timed_run(lambda: a @ b, device) for _ in range(5))
    return 2 * n ** 3 / best, f"measured on this CPU: best of 5 fp32 {n}x{n} matmuls, {threads} threads"


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
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


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "load_average": _load_average()}  # at the end of the run: 1, 5 and 15 minute means
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


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


_rows_sent: dict[str, int] = {}  # per benchmark: rows of its reports already appended to $GENSWEEP_BENCH_ROWS


def start_rows() -> None:
    """A new run of a benchmark in this process: its reports' rows are appended to the rows file from the first."""
    _rows_sent.clear()


def write_json(path: Path | None, report: dict) -> None:
    """The raw measurements, when --json asked for them, written whole or not at all (a temporary file renamed:
    a run stopped mid-write leaves the last report). Every call also appends the report's rows not yet appended to
    the rows file named by $GENSWEEP_BENCH_ROWS (bench/processes.py), so a benchmark that writes its
    report as it goes (partial rows, e.g. train's and pack's) has each row there as soon as it is measured."""
    rows = report.get("rows")
    if isinstance(rows, list) and os.environ.get(ROWS_ENV):
        key = str(report.get("benchmark"))
        sent = _rows_sent.get(key, 0)
        append_rows(rows[sent:], key)
        _rows_sent[key] = max(sent, len(rows))
    if path:
        write_text_atomic(path, json.dumps(report, indent=1, default=str))

