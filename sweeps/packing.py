"""`--gpus-per-trial auto`: measure one trial's peak GPU memory and pack as many trials per GPU as fit.

The probe trains a few steps and evaluates two batches of the sweep's model at its preset config, once per
worst-case point of the search space (the largest value of every numeric choice, every value of every string
choice: width, latent size, k, arch), in a spawned process so the driver keeps no CUDA context. Trials per GPU =
floor(HEADROOM * GPU memory / (peak reserved + CUDA_CONTEXT_BYTES)), at most MAX_TRIALS_PER_GPU. Not probed: FID
feature networks and sampling batches at the end of a trial, which the headroom has to absorb (docs/PERFORMANCE.md).
An NCSN trial sizes its sampling batch to its own GPU fraction of the free memory (genmodels.models.ncsn's
chains_that_fit reads the fraction Ray gave it), so packed trials that sample at once share that room.

A probe whose CUDA graph capture fails (GraphCaptureFailed: that process's CUDA state is spoilt) is run again in a new
process with train.cuda_graphs off, as Tune's retry of such a trial runs; the sweep starts on that measurement.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from ray.tune.search.sample import Categorical, Domain, Float, Integer

from genmodels.cuda_graph import WARMUP_STEPS, GraphCaptureFailed

HEADROOM = 0.9  # share of the GPU's memory the packed trials may plan to use
CUDA_CONTEXT_BYTES = 1 << 30  # per process: CUDA context, cuBLAS/cuDNN workspaces (not in the allocator's stats)
MAX_TRIALS_PER_GPU = 8
MAX_PROBES = 8


def worst_case_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Concrete configs covering the memory-relevant corners of a param space: every searched number at its largest
    choice or bound, one config per combination of searched strings (at most MAX_PROBES)."""
    fixed, string_choices = {}, {}
    for key, value in config.items():
        if isinstance(value, Categorical):
            if all(isinstance(c, (int, float)) for c in value.categories):
                fixed[key] = max(value.categories)
            else:
                string_choices[key] = list(value.categories)
        elif isinstance(value, Integer):
            fixed[key] = value.upper - 1  # randint's upper bound is exclusive
        elif isinstance(value, Float):
            fixed[key] = value.lower  # learning rates, weights: no effect on memory
        elif isinstance(value, Domain):
            fixed[key] = value.sample()
        else:
            fixed[key] = value
    combos = list(itertools.product(*string_choices.values()))[:MAX_PROBES]
    return [{**fixed, **dict(zip(string_choices, combo))} for combo in combos]


def auto_gpus_per_trial(model_name: str, config: dict[str, Any], data: dict[str, torch.Tensor]) -> float:
    """The GPU fraction per trial that packs as many trials per GPU as the measured peak memory allows; 0 (and one
    line saying so) when no GPU is visible."""
    if not torch.cuda.is_available():
        print("gensweep: --gpus-per-trial auto measures a trial's GPU memory and needs a GPU; none is visible, so "
              "trials run on the CPU (--gpus-per-trial 0)")
        return 0.0
    probes = probe_memory(model_name, worst_case_configs(config), data)
    peak, total = max(p["peak_reserved"] for p in probes), probes[0]["total"]
    trials = max(1, min(MAX_TRIALS_PER_GPU, int(HEADROOM * total // (peak + CUDA_CONTEXT_BYTES))))
    fraction = math.floor(10_000 / trials) / 10_000  # Ray accepts four decimals; round down so n trials fit
    print(f"gensweep: --gpus-per-trial auto: a trial peaks at {peak / 2**30:.2f} GiB (worst of {len(probes)} "
          f"probe configs) + {CUDA_CONTEXT_BYTES / 2**30:.0f} GiB CUDA context; {trials} trials per "
          f"{total / 2**30:.0f} GiB GPU: --gpus-per-trial {fraction}")
    if trials > 1 and not mps_running():
        print("gensweep: note: packed trials time-slice the GPU; under CUDA MPS (`nvidia-cuda-mps-control -d`, where "
              "the machine allows it) their kernels can overlap: `python -m bench pack --mps` measures "
              "whether that pays for this model")
    return fraction


def probe_memory(model_name: str, configs: list[dict[str, Any]], data: dict[str, torch.Tensor]) -> list[dict[str, int]]:
    """`trial_memory` of each config, one after another in a spawned process; a probe whose graph capture fails is
    run again with CUDA graphs off, in a new process (the failed capture spoilt the CUDA state of the one it ran in)."""
    probes = []
    pool = _probe_process()
    try:
        for params in configs:
            try:
                probes.append(pool.submit(trial_memory, model_name, params, data["train"], data["test"]).result())
            except GraphCaptureFailed as e:
                print(f"gensweep: --gpus-per-trial auto: a probe's CUDA graph capture failed "
                      f"({str(e).splitlines()[0][:200]}); probing that config again with CUDA graphs off, as Tune's "
                      f"retry of such a trial runs")
                pool.shutdown(wait=True)
                pool = _probe_process()
                eager = {**{k: v for k, v in params.items() if k.rsplit(".", 1)[-1] != "cuda_graphs"},
                         "train.cuda_graphs": False}
                probes.append(pool.submit(trial_memory, model_name, eager, data["train"], data["test"]).result())
    finally:
        pool.shutdown(wait=True)
    return probes


def _probe_process() -> ProcessPoolExecutor:
    """One spawned process for the probes: the driver itself keeps no CUDA context."""
    return ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))


def mps_running(environ: dict[str, str] | None = None) -> bool:
    """Whether a CUDA MPS control daemon is listening where CUDA clients of this environment would look."""
    environ = os.environ if environ is None else environ
    return (Path(environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").exists()


def trial_memory(model_name: str, params: dict[str, Any], train_images: torch.Tensor, test_images: torch.Tensor,
                 steps: int = WARMUP_STEPS + 2) -> dict[str, int]:
    """Peak CUDA memory of one trial at `params`: the dataset resident on the GPU, `steps` training steps (past the
    CUDA graph's capture, whose memory pool a trial keeps) and an evaluation of two batches. For sweeps/run.py
    --gpus-per-trial auto; run it in a fresh process so the peak is this trial's alone."""
    from genmodels.experiment import make_experiment
    from genmodels.registry import trial_config

    device = torch.device("cuda")
    torch.cuda.empty_cache()  # a previous probe's cached blocks would count as this one's peak
    torch.cuda.reset_peak_memory_stats(device)
    bs = trial_config(params, model_name).train.batch_size
    make_experiment(model_name, {**params, "train.steps_per_epoch": steps, "train.eval_images": 2 * bs},
                    train_images, test_images, device=device).run_epoch()
    torch.cuda.synchronize(device)
    return {"peak_allocated": torch.cuda.max_memory_allocated(device),
            "peak_reserved": torch.cuda.max_memory_reserved(device),
            "total": torch.cuda.get_device_properties(device).total_memory}
