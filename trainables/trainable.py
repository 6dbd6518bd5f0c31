"""The Ray Tune function trainable: the genmodels engine in a loop that reports, checkpoints and resumes."""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from genmodels.engine import (
    CHECKPOINT_FILE,
    Diverged,
    Trainer,
    load_checkpoint,
    make_trainer,
)
from trainables.evaluation import FIDPlan, fid_metrics, sample_kwargs_for_rung
from trainables.wandb_logging import IMAGES_DIR


@dataclasses.dataclass
class TrialSettings:
    """Per-sweep settings that are not hyperparameters (kept out of the trial config, so out of the search)."""
    space: str
    metric: str
    mode: str = "min"
    fid: FIDPlan | None = None
    # With a "checkpoint" in the config: the keys that override the checkpoint's model config (the searched ones).
    checkpoint_overrides: tuple[str, ...] = ()


def train_trial(config: dict[str, Any], data: dict[str, torch.Tensor], settings: TrialSettings) -> None:
    """Train one trial: report every epoch with a checkpoint; resume from Tune's checkpoint if there is one.

    The report is the last thing an epoch does: Tune may stop the trial (ASHA, or the final epoch) right after it.
    Every report says which epoch this run of the trial started from (0 = fresh; after a node failure or
    `run.py --resume`, the epoch of the checkpoint it restored) and on which Ray node it runs.
    """
    if config.get("checkpoint"):
        return evaluate_checkpoint(config, data, settings)
    trainer = make_trainer(config["model"], config, data["train"], data["test"])
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.load(Path(d) / CHECKPOINT_FILE)
    trainer.extra["resumed_from_epoch"] = trainer.epoch
    # Tune runs each trial in its own working directory, on whichever node it lands, and uploads that folder to the
    # trial's folder in storage (SyncConfig(sync_artifacts=True) in run.py); get_trial_dir() is the driver's staging
    # folder, which only exists on the driver's node.
    trial_dir = Path.cwd()
    while trainer.epoch < trainer.cfg.epochs:
        try:
            metrics = trainer.train_epoch()
        except Diverged as e:
            # No ranking metric in this report, and done=True: Tune stops the trial on it before ASHA or Optuna see
            # it (Optuna records the trial as pruned), and the sweep goes on (run.py relaxes Tune's metric check).
            tune.report({"diverged": 1, "epoch": trainer.epoch, "error": str(e), "done": True})
            return
        metrics.update(trainer.evaluate())
        final = trainer.epoch == trainer.cfg.epochs
        images_dir = trial_dir / IMAGES_DIR / f"epoch_{trainer.epoch:04d}"
        extra, final_images = evaluate_extra(trainer, settings, final, images_dir)
        report_with_checkpoint(trainer, {**metrics, **extra}, settings, images_dir, final, final_images)


def evaluate_extra(trainer: Trainer, settings: TrialSettings, final: bool,
                   images_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """FID on the ladder, and at the end the model's expensive once-per-trial metrics and grids."""
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    metrics: dict[str, Any] = {"epoch": trainer.epoch, "step": trainer.step, "diverged": 0, "node_id": node_id,
                               "resumed_from_epoch": trainer.extra.get("resumed_from_epoch", 0)}
    if settings.fid:
        metrics.update(fid_metrics(settings.fid, trainer, final))
    images: dict[str, Path] = {}
    if final:
        final_metrics, images = trainer.final_evaluate(images_dir)
        metrics.update(final_metrics)
    return metrics, images


def report_with_checkpoint(trainer: Trainer, metrics: dict[str, Any], settings: TrialSettings, images_dir: Path,
                           final: bool, final_images: dict[str, Path]) -> None:
    """Track the best ranking value, write this epoch's grids, and report with a checkpoint holding the trainer
    state and the grids (the W&B callback logs those from there)."""
    value, best = metrics.get(settings.metric), trainer.extra.get("best")
    if value is not None and (best is None or (value < best if settings.mode == "min" else value > best)):
        trainer.extra["best"] = best = value
    if best is not None:
        metrics[f"best_{settings.metric}"] = best
    # Sample grids between rungs at the first rung's sampler budget: a full Langevin chain every epoch costs minutes.
    kwargs = {} if final or not settings.fid else sample_kwargs_for_rung(settings.fid, trainer.eval_model, 0)
    images = {**trainer.write_grids(images_dir, **kwargs), **final_images}
    with tempfile.TemporaryDirectory() as d:
        trainer.save(Path(d) / CHECKPOINT_FILE)
        (Path(d) / IMAGES_DIR).mkdir()
        for name, path in images.items():
            shutil.copy(path, Path(d) / IMAGES_DIR / f"{name}.png")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def evaluate_checkpoint(config: dict[str, Any], data: dict[str, torch.Tensor], settings: TrialSettings) -> None:
    """No training: the model of a finished run, with the searched (e.g. sampling) settings overriding its config,
    scored once at the final FID budget. What the `ncsn-sampling` space sweeps."""
    state = load_checkpoint(config["checkpoint"])
    params = {**state["train_config"], **state["model_config"],
              **{k: config[k] for k in settings.checkpoint_overrides if k in config}, "epochs": 1}
    trainer = make_trainer(state["model_name"], params, data["train"], data["test"])
    trainer.model.load_state_dict(state["model"])
    if trainer.ema and state.get("ema") is not None:
        trainer.ema.model.load_state_dict(state["ema"])
    trainer.epoch = 1
    images_dir = Path.cwd() / IMAGES_DIR / "final"
    extra, final_images = evaluate_extra(trainer, settings, True, images_dir)
    report_with_checkpoint(trainer, {**trainer.evaluate(), **extra}, settings, images_dir, True, final_images)
