"""sampling: what bf16 sampling costs an NCSN checkpoint in FID, against what it saves in time.

    python -m bench sampling --checkpoint runs/ncsn/state.pt --n 2000 --fid-weights PATH

Samples n images from the checkpoint's EMA weights three times, each in `sampling_batch` chains (as the FID ladder
does): fp32 with seed 0, fp32 with seed 1, bf16 with seed 0. The bf16 run uses the same seed and N as the first,
so their FID difference is what bf16 changes; the two fp32 seeds give the difference that noise alone makes, to
read it against. Reference statistics: the checkpoint's dataset, test split, first n images.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import timed_run


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an NCSN run's state.pt")
    p.add_argument("--n", type=int, default=None, help="samples per run (default: 2000 on cuda, 32 on cpu)")
    p.add_argument("--steps-per-level", type=int, default=None, help="T (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=None, help="chains at once (default: the model's)")
    p.add_argument("--network", choices=["inception", "standin"], default="inception")
    p.add_argument("--fid-weights", default=None, help="Inception weights file (python -m genmodels.fid_weights)")
    p.add_argument("--data-dir", default=None, help="where the checkpoint's dataset is (default: its own)")


def bench_sampling(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from genmodels.data import load_images
    from genmodels.experiment import Experiment
    from genmodels.io import load_checkpoint
    from genmodels.metrics.fid import FIDScorer

    device = torch.device(args.device)
    n = args.n or (2000 if device.type == "cuda" else 32)
    config = load_checkpoint(args.checkpoint)["config"]
    if config.get("model_name") != "ncsn":
        raise SystemExit(f"bench sampling: {args.checkpoint} is a {config.get('model_name')} run; it needs an NCSN")
    data_dir = args.data_dir or config.get("data.data_dir") or None
    real = load_images(config["data.dataset"], "test", data_dir=data_dir, limit=n)

    def sampler(precision: str) -> torch.nn.Module:
        """The checkpoint's EMA model built for this precision: a config is never changed once checked."""
        overrides = {"model.sampling_precision": precision}
        return Experiment.from_checkpoint(args.checkpoint, real, real, overrides, device).eval_model.eval()

    models = {precision: sampler(precision) for precision in ("fp32", "bf16")}
    model = models["fp32"]
    scorer = FIDScorer(args.network, weights_path=args.fid_weights, device=device, kid_subsets=0)
    ref = scorer.reference(real, key=f"{config['data.dataset']}-test")
    T = args.steps_per_level or model.cfg.langevin_steps
    batch = args.batch_size or model.sampling_batch()
    steps = model.schedule.L * T + int(model.cfg.denoise)
    rows = []
    for precision, seed in (("fp32", 0), ("fp32", 1), ("bf16", 0)):
        model = models[precision]
        torch.manual_seed(seed)
        samples: list[torch.Tensor] = []
        seconds = timed_run(lambda: samples.append(model.sample(n, T=T, batch_size=batch)), device)
        fid = scorer.score(samples[0], ref)["fid"]
        rows.append(dict(precision=precision, seed=seed, n=n, chains_per_batch=min(batch, n), steps_per_level=T,
                         seconds=seconds, chain_steps_per_s=n * steps / seconds, fid=fid))
    fp32, other_seed, bf16 = (r["fid"] for r in rows)
    meta = {"checkpoint": str(args.checkpoint), "network": scorer.name, "fid_bf16_minus_fp32": bf16 - fp32,
            "fid_seed_noise": abs(other_seed - fp32), "bf16_speedup": rows[0]["seconds"] / rows[2]["seconds"]}
    return rows, meta
