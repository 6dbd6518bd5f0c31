"""One W&B run per trial: flat config, per-epoch metrics, sample grids, best/final summary, checkpoint artifact."""
from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from genmodels.engine import Trainer
    from trainables.trainable import TrialSettings


def is_logged_in() -> bool:
    """True when W&B credentials exist (an API key in the environment, or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def start_run(config: dict[str, Any], settings: TrialSettings):
    """Start (or resume, after a trial restart) the W&B run of the current Tune trial."""
    from ray.air.integrations.wandb import setup_wandb

    run = setup_wandb(
        config={**config, "space": settings.space, "ranking_metric": settings.metric},
        project=settings.wandb_project, entity=settings.wandb_entity, tags=list(settings.tags),
        job_type="trial", resume="allow", settings=_quiet_settings())
    run.define_metric("epoch")
    run.define_metric("*", step_metric="epoch")
    return run


def _quiet_settings():
    import wandb

    return wandb.Settings(silent=True, console="off")


def log(run, metrics: dict[str, Any], images: dict[str, Path] | None = None) -> None:
    if run is None:
        return
    import wandb

    payload = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for name, path in (images or {}).items():
        payload[name] = wandb.Image(str(path), caption=f"epoch {metrics.get('epoch')}")
    run.log(payload)
    for k, v in payload.items():
        if k.startswith("best_"):
            run.summary[k] = v


def log_checkpoint(run, trainer: Trainer, metrics: dict[str, Any]) -> None:
    """The final checkpoint of a completed trial as a `model` artifact, with its metrics as metadata."""
    import tempfile

    import wandb

    from genmodels.engine import CHECKPOINT_FILE

    name = re.sub(r"[^A-Za-z0-9._-]", "-", f"{run.name or run.id}-model")[:120]
    meta = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    artifact = wandb.Artifact(name, type="model", metadata=meta)
    with tempfile.TemporaryDirectory() as d:
        artifact.add_file(str(trainer.save(Path(d) / CHECKPOINT_FILE)))  # staged (copied) by W&B right here
        run.log_artifact(artifact, aliases=["final"])


def finish(run, exit_code: int = 0) -> None:
    if run is not None:
        run.finish(exit_code=exit_code)
