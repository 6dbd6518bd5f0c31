"""The Ray Tune function trainable: the genmodels engine in a loop that reports, checkpoints and resumes."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from genmodels.engine import CHECKPOINT_FILE, Diverged, Trainer, make_trainer
from trainables import wandb_logging


@dataclasses.dataclass
class TrialSettings:
    """Per-sweep settings that are not hyperparameters (kept out of the trial config, so out of the search)."""
    space: str
    metric: str
    mode: str = "min"
    wandb: bool = True
    wandb_project: str = "gensweep"
    wandb_entity: str | None = None
    log_artifacts: bool = True
    tags: tuple[str, ...] = ()


def train_trial(config: dict[str, Any], data: dict[str, torch.Tensor], settings: TrialSettings) -> None:
    """Train one trial: report every epoch with a checkpoint; resume from Tune's checkpoint if there is one."""
    trainer = make_trainer(config["model"], config, data["train"], data["test"])
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.load(Path(d) / CHECKPOINT_FILE)
    trial_dir = Path(tune.get_context().get_trial_dir())
    run = wandb_logging.start_run(config, settings) if settings.wandb else None
    while trainer.epoch < trainer.cfg.epochs:
        try:
            metrics = trainer.train_epoch()
        except Diverged as e:
            # No ranking metric in this report: ASHA ignores it, Optuna records the trial as failed, others go on.
            result = {"diverged": 1, "epoch": trainer.epoch, "error": str(e)}
            wandb_logging.log(run, result)
            wandb_logging.finish(run, exit_code=1)
            tune.report(result)
            return
        metrics.update(trainer.evaluate())
        metrics.update(epoch=trainer.epoch, step=trainer.step, diverged=0)
        value, best = metrics[settings.metric], trainer.extra.get("best")
        if best is None or (value < best if settings.mode == "min" else value > best):
            trainer.extra["best"] = best = value
        metrics[f"best_{settings.metric}"] = best
        grids = trainer.write_grids(trial_dir / "images" / f"epoch_{trainer.epoch:04d}")
        wandb_logging.log(run, metrics, images=grids)
        _report_with_checkpoint(trainer, metrics)
    if run and settings.log_artifacts:
        wandb_logging.log_checkpoint(run, trainer, metrics)
    wandb_logging.finish(run)


def _report_with_checkpoint(trainer: Trainer, metrics: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        trainer.save(Path(d) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
