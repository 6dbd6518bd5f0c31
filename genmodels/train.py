"""Train one model without Ray, as the seeds' scripts did:

    python -m genmodels.train --model vae --beta 4 --epochs 200
    python -m genmodels.train --model vae --dataset synthetic --arch conv-small --epochs 2 --out runs/try1
    python -m genmodels.train --model vae --dataset synthetic --arch conv-small --epochs 4 --out runs/try1 --resume

Every field of the data, training and model config sections is a flag, checked for type and range before anything
runs. Checkpoints, sample grids and a metrics log go to --out; `--resume` continues from the checkpoint there.
Progress lines come every 10 s of an epoch ($GENSWEEP_PROGRESS_S sets the seconds) and as each other phase
(loading, evaluation, grids, final evaluation) starts and ends.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from genmodels.config import SECTIONS, ConfigError, fields_of, section_classes
from genmodels.data import load_splits
from genmodels.engine import CHECKPOINT_FILE, PROGRESS_EVERY_S, Diverged, timed
from genmodels.errors import ResourceUnavailable
from genmodels.experiment import Experiment, prepare
from genmodels.io import load_checkpoint, writable_folder
from genmodels.registry import MODELS, model_class, trial_config


def _add_fields(parser: argparse.ArgumentParser, model_name: str) -> None:
    """One flag per config field (`--batch-size` for train.batch_size); values stay strings until the config
    checks them, so a bad value gets the config's one-line message."""
    for section, cls in section_classes(model_class(model_name).Config).items():
        group = parser.add_argument_group(f"{section} settings" if section != "model" else f"model {model_name}")
        defaults = cls()
        for name, kind in fields_of(cls).items():
            choices = cls.choices.get(name)
            hint = f" (one of {', '.join(map(str, choices))})" if choices else ""
            group.add_argument(f"--{name.replace('_', '-')}", dest=f"{section}.{name}", default=None,
                               metavar=kind.__name__.upper(), help=f"default {getattr(defaults, name)!r}{hint}")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="vae")
    model_name = pre.parse_known_args(argv)[0].model
    if model_name not in MODELS:
        raise ConfigError(f"unknown model {model_name!r}; choose one of {', '.join(MODELS)}")
    p = argparse.ArgumentParser(prog="python -m genmodels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vae", choices=sorted(MODELS))
    p.add_argument("--out", default=None, help="output folder (default runs/MODEL-TIME)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    _add_fields(p, model_name)
    args = p.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if "." in k and k.split(".")[0] in SECTIONS and v is not None}
    return args, settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log = lambda line: print(line, flush=True)  # noqa: E731 - flushed, so `| tee` shows progress as it comes
    try:
        args, settings = parse_args(argv)
        every = progress_every()
        out = Path(args.out or f"runs/{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        if args.resume:  # the run's own settings, changed only where a flag says so
            settings = {**saved_settings(out / CHECKPOINT_FILE, args.model), **settings}
        cfg = trial_config(settings, args.model)
        prepare(cfg)  # checks that need no data (e.g. weights files) before loading any
        output_folder(out)
        with timed(log, f"loading {cfg.data.dataset} and building the model"):
            data = load_splits(cfg.data)
            exp = Experiment.setup(cfg, data["train"], data["test"], progress=log, progress_every=every)
            if args.resume:
                exp.restore(out / CHECKPOINT_FILE)
    except (ConfigError, ResourceUnavailable, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(f"training {args.model} on {cfg.data.dataset} ({len(data['train'])} train / {len(data['test'])} test "
          f"images) on {exp.device}; writing to {out}", flush=True)
    plan = model_class(args.model).training_plan(exp.cfg)
    if plan:
        print(plan, flush=True)
    try:
        train_to_end(exp, out, log)
    except Diverged as e:
        print(f"train: diverged: {e}; the last good checkpoint is {out / CHECKPOINT_FILE}", file=sys.stderr)
        return 1
    print(f"checkpoint: {out / CHECKPOINT_FILE}; images: {out / 'images'}", flush=True)
    return 0


def train_to_end(exp: Experiment, out: Path, log: Callable[[str], None] = print) -> dict[str, float]:
    """Train to the configured epochs; after each, write the grids, a checkpoint and a line of metrics to `out`;
    at the end, the final metrics and images. Returns the final metrics."""
    out.mkdir(parents=True, exist_ok=True)
    last = time.perf_counter()

    def on_epoch(metrics: dict[str, float]) -> None:
        nonlocal last
        seconds, last = time.perf_counter() - last, time.perf_counter()
        with timed(exp.progress, f"epoch {exp.epoch}: sampling grids"):
            exp.write_grids(out / "images" / f"epoch_{exp.epoch:04d}")
        exp.save(out / CHECKPOINT_FILE)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train_loss", "test_")))
        log(f"epoch {exp.epoch}/{exp.cfg.train.epochs} ({seconds:.1f} s): {shown}")

    exp.run(on_epoch)
    with timed(exp.progress, "final evaluation and images"):
        final, _ = exp.finish(out / "images" / "final")
    if final:
        log("final: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return final


def progress_every() -> float:
    """Seconds between progress lines within an epoch: $GENSWEEP_PROGRESS_S, else the engine's default."""
    value = os.environ.get("GENSWEEP_PROGRESS_S", "")
    try:
        seconds = float(value) if value else PROGRESS_EVERY_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise ConfigError(f"GENSWEEP_PROGRESS_S must be a number of seconds >= 0, got {value!r}")
    return seconds


def output_folder(out: Path) -> None:
    """Create `out` if need be; a one-line ConfigError unless it is a folder this process can write to."""
    try:
        writable_folder(out, "--out")
    except OSError as e:
        raise ConfigError(str(e)) from None


def saved_settings(checkpoint: Path, model_name: str) -> dict[str, object]:
    """The flat config of the run saved at `checkpoint`; a one-line ConfigError unless it loads and holds a run of
    `model_name`."""
    if not checkpoint.exists():
        raise ConfigError(f"no checkpoint at {checkpoint} to resume from; leave out --resume to start a new run")
    try:
        state = load_checkpoint(checkpoint)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so in one line
        raise ConfigError(f"cannot load {checkpoint} ({type(e).__name__}); it is truncated or not a gensweep "
                          f"checkpoint: start a new run with another --out") from None
    if not isinstance(state, dict):  # e.g. a tensor or list saved with torch.save
        raise ConfigError(f"{checkpoint} holds a {type(state).__name__}, not a gensweep checkpoint: start a new run "
                          f"with another --out")
    if state.get("model_name") != model_name:
        raise ConfigError(f"{checkpoint} holds a {state.get('model_name')!r} run, not {model_name!r}; pass "
                          f"--model {state.get('model_name')} or another --out")
    return dict(state.get("config") or {})


if __name__ == "__main__":
    sys.exit(main())
