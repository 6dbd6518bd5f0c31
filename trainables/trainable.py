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

from genmodels.engine import CHECKPOINT_FILE, Diverged, Trainer, make_trainer
from trainables.wandb_logging import IMAGES_DIR


@dataclasses.dataclass
class TrialSettings:
    """Per-sweep settings that are not hyperparameters (kept out of the trial config, so out of the search)."""
    space: str
    metric: str
    mode: str = "min"


def train_trial(config: dict[str, Any], data: dict[str, torch.Tensor], settings: TrialSettings) -> None:
    """Train one trial: report every epoch with a checkpoint; resume from Tune's checkpoint if there is one.

    The report is the last thing an epoch does: Tune may stop the trial (ASHA, or the final epoch) right after it.
    Every report says which epoch this run of the trial started from (0 = fresh; after a node failure or
    `run.py --resume`, the epoch of the checkpoint it restored) and on which Ray node it runs.
    """
    trainer = make_trainer(config["model"], config, data["train"], data["test"])
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.load(Path(d) / CHECKPOINT_FILE)
    resumed_from_epoch = trainer.epoch
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
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
        metrics.update(epoch=trainer.epoch, step=trainer.step, diverged=0, resumed_from_epoch=resumed_from_epoch,
                       node_id=node_id)
        value, best = metrics[settings.metric], trainer.extra.get("best")
        if best is None or (value < best if settings.mode == "min" else value > best):
            trainer.extra["best"] = best = value
        metrics[f"best_{settings.metric}"] = best
        grids = trainer.write_grids(trial_dir / IMAGES_DIR / f"epoch_{trainer.epoch:04d}")
        report_with_checkpoint(trainer, metrics, grids)


def report_with_checkpoint(trainer: Trainer, metrics: dict[str, Any], images: dict[str, Path]) -> None:
    """Report with a checkpoint holding the trainer state and this epoch's grids (the W&B callback logs those)."""
    with tempfile.TemporaryDirectory() as d:
        trainer.save(Path(d) / CHECKPOINT_FILE)
        (Path(d) / IMAGES_DIR).mkdir()
        for name, path in images.items():
            shutil.copy(path, Path(d) / IMAGES_DIR / f"{name}.png")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
