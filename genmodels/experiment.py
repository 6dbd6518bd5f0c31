"""One experiment protocol, driven by the Ray trainable, `genmodels.train` and the benchmarks (bench/):

    exp = Experiment.setup(cfg, train_images, test_images)   # prepare (checks, derived values), then build
    exp.restore(path)                                          # optional: continue a checkpointed run
    exp.run(on_epoch)                                          # the epoch loop: train, evaluate, on_epoch(...)
    final_metrics, images = exp.finish(folder)                 # once-per-run metrics and image grids

`Experiment.from_checkpoint` rebuilds a finished run's model (optionally with some model settings changed, e.g.
the sampler's) for evaluation without training. Callers read the run's state here too (`device`, `epoch`, `step`,
`extra`, `test_images(n)`, ...), never through the Trainer behind it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from genmodels.config import ConfigError, TrialConfig
from genmodels.engine import PROGRESS_EVERY_S, Trainer, seed_everything
from genmodels.io import load_checkpoint
from genmodels.registry import model_class, trial_config


def prepare(cfg: TrialConfig, train_images: torch.Tensor | None = None) -> TrialConfig:
    """The model's one-off checks and derived values (e.g. NCSNv2's sigma_1 from the data) folded into the config.
    A sweep's driver calls this once for all its trials; `Experiment.setup` calls it for a run of its own."""
    derived = model_class(cfg.model_name).prepare(cfg, train_images)
    return cfg.replace("model", **derived) if derived else cfg


# How an epoch's test evaluation is run: "full" (the whole test split, every metric, the expensive estimates such as
# the VAE family's importance-weighted bound included), "test" (the whole split, the cheap metrics only), "subset"
# (the cheap metrics on the first `eval_subset` test images, named subset_...)
EVALUATIONS = ("full", "test", "subset")

class Experiment:
    """A model and its trainer, built from a TrialConfig, stepped one epoch at a time.

    `progress`, when given, gets a line every `progress_every` seconds of an epoch and as each phase (evaluation,
    grids, final evaluation) starts and ends; None (the default) keeps sweeps' trials quiet."""

    def __init__(self, cfg: TrialConfig, train_images: torch.Tensor, test_images: torch.Tensor,
                 device: torch.device | str | None = None, *, progress: Callable[[str], None] | None = None,
                 progress_every: float = PROGRESS_EVERY_S):
        self.cfg = cfg
        seed_everything(cfg.train.seed)
        model = model_class(cfg.model_name)(cfg.model, channels=train_images.shape[1])
        self.trainer = Trainer(model, cfg.train, train_images, test_images, device=device,
                               model_name=cfg.model_name, config_record=cfg.flat(), progress=progress,
                               progress_every=progress_every)

    @classmethod
    def setup(cls, cfg: TrialConfig, train_images: torch.Tensor, test_images: torch.Tensor,
              device: torch.device | str | None = None, *, progress: Callable[[str], None] | None = None,
              progress_every: float = PROGRESS_EVERY_S) -> Experiment:
        """Prepare (checks and values derived from the training data), then build."""
        return cls(prepare(cfg, train_images), train_images, test_images, device, progress=progress,
                   progress_every=progress_every)

    @classmethod
    def from_checkpoint(cls, path: str | Path, train_images: torch.Tensor, test_images: torch.Tensor,
                        overrides: dict[str, Any] | None = None,
                        device: torch.device | str | None = None) -> Experiment:
        """The finished run saved at `path`, its config updated by `overrides` (flat keys, e.g. `model.init`),
        ready to evaluate and sample (epoch = its last)."""
        state = load_checkpoint(path)
        flat = {**state["config"], **(overrides or {})}
        exp = cls(trial_config(flat), train_images, test_images, device)
        exp.trainer.load_weights(state)
        return exp

    # the Trainer's state, read through the facade (nothing outside this module reaches into exp.trainer)
    model = property(lambda self: self.trainer.model)
    eval_model = property(lambda self: self.trainer.eval_model)
    device = property(lambda self: self.trainer.device)
    epoch = property(lambda self: self.trainer.epoch)
    step = property(lambda self: self.trainer.step, doc="Optimizer steps so far.")
    extra = property(lambda self: self.trainer.extra,
                     doc="Small values saved in the run's checkpoint and restored with it (e.g. the best metric).")
    progress = property(lambda self: self.trainer.progress)
    graph_captured = property(lambda self: self.trainer.graph_captured,
                              doc="Whether the training step runs as a replayed CUDA graph.")

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs

    def test_images(self, n: int) -> torch.Tensor:
        """The first n images that evaluation sees (the first `eval_images` of the test split), on the device."""
        return self.trainer.test_images(n)

    def restore(self, path: str | Path) -> None:
        """Continue the run checkpointed at `path` (model, optimizer, EMA, RNG states, step, epoch)."""
        self.restore_state(load_checkpoint(path), str(path))

    def restore_state(self, state: dict[str, Any], where: str = "the checkpoint") -> None:
        """Continue from a loaded checkpoint. One of other model settings raises ConfigError naming the settings
        that differ."""
        try:
            self.trainer.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            saved = state.get("config", {}) if isinstance(state, dict) else {}
            differ = [f"{k}={saved[k]!r} (now {v!r})" for k, v in self.cfg.flat().items()
                      if k.startswith("model.") and k in saved and saved[k] != v]
            raise ConfigError(f"{where} does not fit this model ({type(e).__name__}); it was trained with "
                              f"{', '.join(differ) or 'another model'}") from None

    def save(self, path: str | Path) -> Path:
        return self.trainer.save(path)

    def train_epoch(self, steps: int | None = None) -> dict[str, float]:
        """Train one epoch (`steps` steps, else the config's) without evaluating: what the benchmarks time."""
        return self.trainer.train_epoch(steps)

    def run_epoch(self, evaluation: Callable[[int], str] | None = None) -> dict[str, float]:
        """Train one epoch, then evaluate on the test split as `evaluation(epoch)` says (EVALUATIONS; None: always
        "full"); the last epoch on the whole split ("subset" there means "full"). Raises engine.Diverged on a
        non-finite loss."""
        metrics = self.train_epoch()
        level = "full" if evaluation is None else evaluation(self.epoch)
        level = "full" if self.done and level == "subset" else level
        if level not in EVALUATIONS:
            raise ValueError(f"evaluation {level!r}: choose one of {', '.join(EVALUATIONS)}")
        metrics.update(self.evaluate(full=level == "full", subset=level == "subset"))
        return {**metrics, "epoch": self.epoch, "step": self.step}

    def run(self, on_epoch: Callable[[dict[str, float]], None],
            evaluation: Callable[[int], str] | None = None) -> None:
        """The epoch loop: until the configured epochs are done, one epoch of training and evaluation, then
        `on_epoch(metrics)` (write grids, save, report: `self.done` says whether it was the last). A sweep passes
        `evaluation` (epoch -> "full", "test" or "subset": by ASHA's milestones and what ranks the trials), so the
        expensive test metrics are computed where a decision reads them and at the end, the cheap ones in between.
        Raises engine.Diverged on a non-finite loss."""
        while not self.done:
            on_epoch(self.run_epoch(evaluation))

    def evaluate(self, full: bool = True, subset: bool | None = None) -> dict[str, float]:
        return self.trainer.evaluate(full, subset)

    def ranks_on_full_evaluation(self, ranked_on: Iterable[str]) -> bool:
        """Whether ranking on these metrics needs a full evaluation (GenerativeModel.ranks_on_full_evaluation)."""
        return self.trainer.model.ranks_on_full_evaluation(ranked_on)

    def write_grids(self, out_dir: str | Path, budget: float = 1.0) -> dict[str, Path]:
        return self.trainer.write_grids(out_dir, budget=budget)

    def finish(self, out_dir: str | Path | None = None) -> tuple[dict[str, float], dict[str, Path]]:
        """The model's once-per-run metrics, and its final image grids in `out_dir`."""
        return self.trainer.final_evaluate(out_dir)


def make_experiment(model_name: str, settings: dict[str, Any], train_images: torch.Tensor,
                    test_images: torch.Tensor, device: torch.device | str | None = None) -> Experiment:
    """`Experiment.setup` from flat settings (qualified keys, or bare names that are unique), strictly checked."""
    return Experiment.setup(trial_config(settings, model_name), train_images, test_images, device)
