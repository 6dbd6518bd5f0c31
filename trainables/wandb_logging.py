"""One W&B run per trial, logged from the driver by Ray Tune's WandbLoggerCallback.

Driver-side logging survives what in-trial logging does not: ASHA stops a trial by killing its actor right after a
report, so a run opened inside the trial would never be finished. Here Ray ends each run on every trial end. On top
of Ray's callback: the sample/reconstruction grids that the trainable puts in each checkpoint are logged as images,
and the final checkpoint of each completed trial is logged as a `model` artifact.
"""
from __future__ import annotations

import io
import netrc
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.air.integrations.wandb import (
    WandbLoggerCallback,
    _QueueItem,
    _WandbLoggingActor,
)

IMAGES_DIR = "images"  # inside each checkpoint: <name>.png grids written by the trainable


def is_logged_in() -> bool:
    """True when W&B credentials exist (an API key in the environment, or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def artifact_name(trial_name: str) -> str:
    # W&B artifact names allow letters, digits, '-', '_' and '.'; trial names carry '=' and ','.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", trial_name)[:100] + "-model"


class _ModelArtifactActor(_WandbLoggingActor):
    def run(self):
        super().run()
        self._wandb.teardown()  # close the W&B service now, not in an atexit hook after Ray has cut its socket

    def _handle_checkpoint(self, checkpoint_path: str) -> None:
        artifact = self._wandb.Artifact(artifact_name(self._trial_name), type="model")
        artifact.add_dir(checkpoint_path)
        self._wandb.log_artifact(artifact, aliases=["final"])


class GensweepWandbCallback(WandbLoggerCallback):
    """Ray's W&B callback, plus per-epoch image grids and a final-checkpoint artifact per completed trial."""

    _logger_actor_cls = _ModelArtifactActor

    def __init__(self, *, max_epochs: int, log_artifacts: bool = True, **kwargs: Any):
        # resume="allow": a trial restarted after a node failure continues its run instead of clashing with it.
        super().__init__(log_config=False, upload_checkpoints=False, resume="allow", **kwargs)
        self.max_epochs, self.log_artifacts = max_epochs, log_artifacts

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs) -> None:
        # W&B files straight into the trial's folder in local storage: the driver's staging copy is synced for the
        # last time before the last runs have finished writing.
        import pyarrow.fs

        if isinstance(trial.storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            os.makedirs(trial.path, exist_ok=True)
            wandb_init_kwargs.setdefault("dir", trial.path)
        super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

    def log_trial_save(self, trial) -> None:
        images = read_checkpoint_images(trial.checkpoint)
        if images and trial in self._trial_queues:
            step = (trial.last_result or {}).get("training_iteration")
            self._trial_queues[trial].put((_QueueItem.RESULT, {**images, "training_iteration": step}))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        last = trial.last_result or {}
        completed = not failed and not last.get("diverged") and last.get("epoch", 0) >= self.max_epochs
        if completed and self.log_artifacts and trial.checkpoint and trial in self._trial_queues:
            self._trial_queues[trial].put((_QueueItem.CHECKPOINT, local_checkpoint_dir(trial)))
        super().log_trial_end(trial, failed=failed)


def read_checkpoint_images(checkpoint) -> dict[str, Any]:
    """The PNG grids stored in a Tune checkpoint (local or cloud storage) as wandb.Image objects."""
    import pyarrow.fs
    import wandb
    from PIL import Image

    if checkpoint is None:
        return {}
    fs, root = checkpoint.filesystem, f"{checkpoint.path}/{IMAGES_DIR}"
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root))
    except (FileNotFoundError, OSError):
        return {}
    images = {}
    for info in infos:
        if info.is_file and info.path.endswith(".png"):
            with fs.open_input_file(info.path) as f:
                images[Path(info.path).stem] = wandb.Image(Image.open(io.BytesIO(f.read())).convert("RGB"))
    return images


def local_checkpoint_dir(trial) -> str:
    """A local folder holding the trial's latest checkpoint (downloaded next to the trial's logs if remote)."""
    import pyarrow.fs

    checkpoint = trial.checkpoint
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(os.path.join(trial.local_path, "final_model"))
