"""Train one model without Ray, as the seeds' scripts did:

    python -m genmodels.train --model vae --beta 4 --epochs 200
    python -m genmodels.train --model vae --dataset synthetic --arch conv-small --epochs 2 --out runs/try1

Every field of TrainConfig and of the model's Config is a flag. Checkpoints, sample grids and a metrics log go to
--out; `--resume` continues from the checkpoint there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from genmodels.base import ResourceUnavailable
from genmodels.data import DATASETS, load_images
from genmodels.engine import CHECKPOINT_FILE, Diverged, TrainConfig, make_trainer
from genmodels.registry import MODELS, model_class


def _add_fields(parser: argparse.ArgumentParser, cls, title: str, seen: set[str]) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in seen:
            continue
        seen.add(f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                               type=lambda s: s.lower() in ("1", "true", "yes", "on"), metavar="BOOL",
                               help=f"default {f.default}")
        else:
            conv = {"int": int, "float": float}.get(kind, str)
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=conv, default=None,
                               help=f"default {f.default}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="vae")
    model_name = pre.parse_known_args(argv)[0].model
    if model_name not in MODELS:
        print(f"train: error: unknown model {model_name!r}; choose one of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m genmodels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vae", choices=sorted(MODELS))
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--data-dir", help="folder holding (or to download) the dataset")
    p.add_argument("--train-size", type=int, default=0, help="use only the first N training images (0 = all)")
    p.add_argument("--test-size", type=int, default=0, help="use only the first N test images (0 = all)")
    p.add_argument("--out", default=None, help="output folder (default runs/MODEL-TIME)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    seen: set[str] = set()
    _add_fields(p, TrainConfig, "training", seen)
    _add_fields(p, model_class(model_name).Config, f"model {model_name}", seen)
    args = p.parse_args(argv)
    params = {k: v for k, v in vars(args).items() if v is not None}
    out = Path(args.out or f"runs/{model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        train = load_images(args.dataset, "train", args.data_dir, limit=args.train_size or None)
        test = load_images(args.dataset, "test", args.data_dir, limit=args.test_size or None)
        trainer = make_trainer(model_name, params, train, test)
    except (ResourceUnavailable, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    if args.resume:
        if not (out / CHECKPOINT_FILE).exists():
            print(f"train: error: no checkpoint at {out / CHECKPOINT_FILE} to resume from", file=sys.stderr)
            return 2
        trainer.load(out / CHECKPOINT_FILE)
    out.mkdir(parents=True, exist_ok=True)
    print(f"training {model_name} on {args.dataset} ({len(train)} train / {len(test)} test images) "
          f"on {trainer.device}; writing to {out}")

    def on_epoch(epoch: int, metrics: dict) -> None:
        trainer.write_grids(out / "images" / f"epoch_{epoch:04d}")
        trainer.save(out / CHECKPOINT_FILE)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train_loss", "test_")))
        print(f"epoch {epoch}/{trainer.cfg.epochs}: {shown}", flush=True)

    try:
        trainer.fit(on_epoch)
    except Diverged as e:
        print(f"train: diverged: {e}; the last good checkpoint is {out / CHECKPOINT_FILE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
