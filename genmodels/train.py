"""Train one model without Ray, as the seeds' scripts did:

    python -m genmodels.train --model vae --beta 4 --epochs 200
    python -m genmodels.train --model vae --dataset synthetic --arch conv-small --epochs 2 --out runs/try1
    python -m genmodels.train --model vae --dataset synthetic --arch conv-small --epochs 4 --out runs/try1 --resume

Every field of the data, training and model config sections is a flag, checked for type and range before anything
runs. Checkpoints, sample grids and a metrics log go to --out; `--resume` continues from the checkpoint there.
Progress lines come every 10 s of an epoch or an evaluation ($GENSWEEP_PROGRESS_S sets the seconds) and as each
other phase (loading, evaluation, grids, final evaluation) starts and ends.

Each epoch is evaluated as a sweep's milestone is when the expensive estimates rank nothing: the cheap test metrics
(test_bpd, ...) on the whole test split. The VAE family's importance-weighted bounds run only where a flag asks:
--eval-k K after every epoch (test_iwae_bpd), --final-eval-k K at the end (final_test_iwae_bpd); --eval-subset N
evaluates the epochs before the last on N test images. metrics.jsonl gets one line per epoch and, at the end, one
line {"final": true, ...} with the final metrics. A --resume goes on evaluating as the run was asked to (its
checkpoint records it) unless one of these flags is given again (0 turns it off).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from genmodels.config import SECTIONS, ConfigError, check_value, fields_of, section_classes
from genmodels.data import load_splits
from genmodels.engine import CHECKPOINT_FILE, PROGRESS_EVERY_S, Diverged, timed
from genmodels.errors import ResourceUnavailable
from genmodels.experiment import Experiment, prepare
from genmodels.io import load_checkpoint, writable_folder
from genmodels.registry import MODELS, model_class, trial_config

# The flags of the expensive estimates and of the cheap in-between evaluation, off here unless given (a sweep turns
# them off where they rank nothing, genmodels.experiment.EVALUATIONS), with the help that says what each costs. What
# a run's commands asked for is kept in its checkpoint (extra[ASKED]); a --resume goes on with it.
ASKED = "cli_evaluation"
EVALUATION_FLAGS = {
    "model.eval_k": "K: after every epoch also the importance-weighted bound test_iwae_bpd with K samples; off unless "
                    "given (0: off). K more decoder passes per test image: K=64 costs about twice an epoch's training "
                    "(conv-small, synthetic, CPU)",
    "model.final_eval_k": "K: at the end, the test NLL bound with K importance samples (final_test_iwae_bpd, on the "
                          "final line of metrics.jsonl); off unless given (0: off). K decoder passes per test image: "
                          "K=1000 costs about 30 epochs of training (conv-small, synthetic: 5 min on 2 idle CPU cores, "
                          "25 on busy ones)",
    "train.eval_subset": "N: evaluate the epochs before the last on the first N test images only (subset_ metrics), "
                         "as a sweep does between its milestones; off unless given (0: off): every epoch on the whole "
                         "test split",
}


def _add_fields(parser: argparse.ArgumentParser, model_name: str) -> None:
    """One flag per config field (`--batch-size` for train.batch_size); values stay strings until the config
    checks them, so a bad value gets the config's one-line message."""
    for section, cls in section_classes(model_class(model_name).Config).items():
        group = parser.add_argument_group(f"{section} settings" if section != "model" else f"model {model_name}")
        defaults = cls()
        for name, kind in fields_of(cls).items():
            choices = cls.choices.get(name)
            hint = f" (one of {', '.join(map(str, choices))})" if choices else ""
            text = EVALUATION_FLAGS.get(f"{section}.{name}") or f"default {getattr(defaults, name)!r}{hint}"
            group.add_argument(f"--{name.replace('_', '-')}", dest=f"{section}.{name}", default=None,
                               metavar=kind.__name__.upper(), help=text)


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


class Log:
    """Prints a line, whole and flushed (so `| tee` shows progress as it comes), and keeps when it last printed and
    which phase runs ("what ..." to "what: done in", as engine.timed reports one): what the heartbeat reads."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.phase: tuple[str, float] | None = None  # (what, when it started)
        self.lock = threading.Lock()  # the heartbeat prints from its own thread

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.last = time.monotonic()
            if line.endswith(" ..."):
                self.phase = line[:-4], self.last
            elif self.phase and line.startswith(f"{self.phase[0]}: done in "):
                self.phase = None


@contextmanager
def heartbeat(log: Log, every: float) -> Iterator[None]:
    """While the block runs, a line "PHASE: still running, N s so far" wherever 1.5 x `every` seconds (at least 1)
    pass without one (the engine's own lines come every `every` seconds and a step): a step whose own progress lines
    come minutes apart (a batch of the bound at k=1000 on a busy CPU, loading a dataset) never looks hung."""
    every, stop = max(1.5 * every, 1.0), threading.Event()

    def beat() -> None:
        while not stop.wait(max(0.1, log.last + every - time.monotonic())):
            now, phase = time.monotonic(), log.phase
            if now - log.last >= every:
                log(f"{phase[0]}: still running, {now - phase[1]:.0f} s so far" if phase else
                    f"still running, {now - log.last:.0f} s since the last line")

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, settings = parse_args(argv)
        every = progress_every()
    except ConfigError as e:
        return error(e)
    log = Log()
    with heartbeat(log, every):
        return run(args, settings, log, every)


def error(e: Exception) -> int:
    print(f"train: error: {e}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace, settings: dict[str, str], log: Log, every: float) -> int:
    """The run `main` parsed: exit status 0, 1 (diverged) or 2 (one-line error before training)."""
    try:
        out = Path(args.out or f"runs/{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        asked = {k: settings.pop(k) for k in list(settings) if k in EVALUATION_FLAGS}
        if args.resume:  # the run's own settings and evaluation, changed only where a flag says so
            saved, saved_asked = saved_run(out / CHECKPOINT_FILE, args.model)
            settings, asked = {**saved, **settings}, {**saved_asked, **asked}
        asked = checked_counts(asked, args.model)
        cfg = trial_config(evaluation_settings(settings, asked, args.model), args.model)
        prepare(cfg)  # checks that need no data (e.g. weights files) before loading any
        output_folder(out)
        with timed(log, f"loading {cfg.data.dataset} and building the model"):
            data = load_splits(cfg.data)
            exp = Experiment.setup(cfg, data["train"], data["test"], progress=log, progress_every=every)
            if args.resume:
                exp.restore(out / CHECKPOINT_FILE)
        exp.extra[ASKED] = asked  # saved with each epoch's checkpoint
    except (ConfigError, ResourceUnavailable, ValueError) as e:
        return error(e)
    log(f"training {args.model} on {cfg.data.dataset} ({len(data['train'])} train / {len(data['test'])} test images) "
        f"on {exp.device}; writing to {out}")
    plan = model_class(args.model).training_plan(exp.cfg)
    if plan:
        log(plan)
    log(evaluation_plan(asked, args.model, len(data["test"])))
    try:
        train_to_end(exp, out, log, epoch_evaluation(asked, exp.cfg.train.epochs))
    except Diverged as e:
        print(f"train: diverged: {e}; the last good checkpoint is {out / CHECKPOINT_FILE}", file=sys.stderr)
        return 1
    log(f"checkpoint: {out / CHECKPOINT_FILE}; images: {out / 'images'}")
    return 0


def train_to_end(exp: Experiment, out: Path, log: Callable[[str], None] = print,
                 evaluation: Callable[[int], str] | None = None) -> dict[str, float]:
    """Train to the configured epochs, each evaluated as `evaluation(epoch)` says (Experiment.run; None: "full");
    after each, write the grids, a checkpoint and a line of metrics to `out`; at the end, the final metrics and
    images, and the final metrics as a line {"final": true, "epoch", "step", ...} of metrics.jsonl. Returns the
    final metrics."""
    out.mkdir(parents=True, exist_ok=True)
    last = time.perf_counter()

    def on_epoch(metrics: dict[str, float]) -> None:
        nonlocal last
        seconds, last = time.perf_counter() - last, time.perf_counter()
        with timed(exp.progress, f"epoch {exp.epoch}: sampling grids"):
            exp.write_grids(out / "images" / f"epoch_{exp.epoch:04d}")
        exp.save(out / CHECKPOINT_FILE)
        append_metrics(out, metrics)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                          if k.startswith(("train_loss", "test_", "subset_test_")))
        log(f"epoch {exp.epoch}/{exp.cfg.train.epochs} ({seconds:.1f} s): {shown}")

    exp.run(on_epoch, evaluation)
    with timed(exp.progress, "final evaluation and images"):
        final, _ = exp.finish(out / "images" / "final")
    append_metrics(out, {"final": True, "epoch": exp.epoch, "step": exp.step, **final})
    if final:
        log("final: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return final


def append_metrics(out: Path, metrics: dict[str, object]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def config_keys(model_name: str) -> set[str]:
    """Every `section.field` key of the model's config."""
    return {f"{s}.{f}" for s, cls in section_classes(model_class(model_name).Config).items() for f in fields_of(cls)}


def checked_counts(asked: dict[str, object], model_name: str) -> dict[str, int]:
    """The EVALUATION_FLAGS values asked for, as checked integers; 0 (off) also for eval_k, whose range starts at 1."""
    classes = section_classes(model_class(model_name).Config)
    counts = {}
    for key, value in asked.items():
        section, name = key.split(".")
        counts[key] = 0 if str(value).strip() == "0" else check_value(classes[section], name, value, key)
    return counts


def evaluation_settings(settings: dict[str, object], asked: dict[str, int], model_name: str) -> dict[str, object]:
    """`settings` with the evaluation asked for: each count asked for (one asked off keeps its config value: the
    evaluation level turns it off), and final_eval_k 0 unless asked, where the model has one."""
    out = {**settings, **{k: v for k, v in asked.items() if v}}
    if "model.final_eval_k" in config_keys(model_name):
        out["model.final_eval_k"] = asked.get("model.final_eval_k", 0)
    return out


def epoch_evaluation(asked: dict[str, int], epochs: int) -> Callable[[int], str]:
    """Experiment.run's evaluation of each epoch: the cheap test metrics on the whole split, as a sweep's milestone
    where the expensive ones rank nothing; "full" (the bound at eval_k) where --eval-k asks; "subset" before the
    last epoch where --eval-subset asks."""
    level = "full" if asked.get("model.eval_k") else "test"
    subset = bool(asked.get("train.eval_subset"))
    return lambda epoch: "subset" if subset and epoch < epochs else level


def evaluation_plan(asked: dict[str, int], model_name: str, test_images: int) -> str:
    """One line on what each epoch and the end evaluate, and which flag adds what this run leaves out."""
    keys, subset = config_keys(model_name), asked.get("train.eval_subset")
    line = f"evaluation: the cheap test metrics on {test_images} test images every epoch" + \
        (f" (on the first {subset} before the last)" if subset else "")
    if "model.eval_k" in keys:
        k = asked.get("model.eval_k")
        line += f"; test_iwae_bpd at k={k} every epoch" if k else "; no per-epoch bound (--eval-k K adds it)"
    if "model.final_eval_k" in keys:
        k = asked.get("model.final_eval_k")
        line += f"; the final bound at k={k}" if k else "; no final bound (--final-eval-k K adds it)"
    return line


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


def saved_run(checkpoint: Path, model_name: str) -> tuple[dict[str, object], dict[str, object]]:
    """The flat config of the run saved at `checkpoint` and the evaluation its commands asked for (ASKED; none in a
    checkpoint written before it was recorded); a one-line ConfigError unless it loads and holds a run of
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
    return dict(state.get("config") or {}), dict((state.get("extra") or {}).get(ASKED) or {})


if __name__ == "__main__":
    sys.exit(main())
