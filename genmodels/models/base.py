"""The interface every model implements, so one engine trains them all."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from genmodels.config import ModelConfig

if TYPE_CHECKING:
    from genmodels.config import TrialConfig


class GenerativeModel(nn.Module):
    """A generative model over uint8 images (N, C, 32, 32).

    Subclasses set `Config` and implement `loss`; `evaluate`, `sample` and `reconstruct` where they apply.
    """

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # Test metrics that only `evaluate(full=True)` computes: a sweep ranking on one evaluates fully at its milestones
    full_only_metrics: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def ranks_on_full_evaluation(cls, ranked_on: Iterable[str]) -> bool:
        """Whether a sweep ranked on these metrics needs what only a full evaluation computes: then its milestones
        evaluate fully, and its trials end with the bound at final_eval_k (the VAE family's importance-weighted
        bound, eval_k or final_eval_k more decoder passes per test image, runs only where it ranks)."""
        return bool(set(ranked_on) & set(cls.full_only_metrics))

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        self.cfg, self.channels = cfg, channels
        # Whether sampling may replay CUDA graphs (NCSN's Langevin steps): the engine sets it from
        # train.cuda_graphs (off unless asked for), so the retry of a trial whose capture failed samples eagerly.
        self.cuda_graphs = False

    @classmethod
    def prepare(cls, cfg: TrialConfig, train_images: torch.Tensor | None = None) -> dict[str, Any]:
        """Run once before any training (by a sweep's driver, or by genmodels.train): fetch or check external
        weights (raise ResourceUnavailable with one line naming the flag), and derive values from the training data
        that every trial needs (returned as model-config fields, e.g. NCSNv2's sigma_1), so no trial repeats the
        work. Without `train_images`, only the checks."""
        return {}

    @classmethod
    def training_plan(cls, cfg: TrialConfig) -> str:
        """One line on what a run of `cfg` trains, where that is not obvious from the config (e.g. stages that the
        epochs do not reach); "" otherwise."""
        return ""

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss on a uint8 batch, and named scalar tensors to log (no host syncs).

        On CUDA the engine captures the whole training step, this loss included, as a CUDA graph and replays it
        (genmodels.cuda_graph): shapes must stay fixed, random numbers come from torch's default generator, and a
        value that changes during training (a warm-up weight, a stage) must live in a tensor updated in place, since
        a Python number is read once, at capture. The graph is captured again only when which parameters need
        gradients, or which modules train, changes (VQ-VAE's stages)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor], full: bool = True) -> dict[str, float]:
        """Metrics on the test split, averaged per image, with sums kept on the device and read to the host once,
        not per batch.

        `full=False` is the cheap evaluation the engine runs between ASHA's milestones, on a small fixed test subset:
        only what the training curves need, under the same names as in the full evaluation (its keys are a subset
        of the full one's), and never the expensive estimates (e.g. the VAE family's importance-weighted bound)."""
        return {}

    @torch.no_grad()
    def sample(self, n: int, budget: float = 1.0) -> torch.Tensor:
        """n images in [0, 1], float (n, C, 32, 32). `budget` in (0, 1] is the share of the model's full sampling
        cost to spend (e.g. of the Langevin steps): the FID ladder's cheap rungs ask for less. Samplers without a
        step count ignore it."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample")

    def sampling_batch(self) -> int | None:
        """Images per `sample` call when many are wanted (the FID ladder): as many as run well at once on this
        device, or None for the caller's batch size."""
        return None

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions in [0, 1] of a uint8 batch."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct")

    @property
    def can_sample(self) -> bool:
        """Whether `sample` gives samples of the trained model (not, e.g., of a prior that was never trained)."""
        return type(self).sample is not GenerativeModel.sample

    @property
    def can_reconstruct(self) -> bool:
        return type(self).reconstruct is not GenerativeModel.reconstruct

    @torch.no_grad()
    def final_evaluate(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Expensive metrics computed once, at the end of a trial (e.g. a bound with many importance samples)."""
        return {}

    @torch.no_grad()
    def final_images(self, test_images: torch.Tensor, out_dir: Path) -> dict[str, Path]:
        """PNG grids written once at the end of a trial (e.g. latent interpolations); name -> path."""
        return {}

    def start_epoch(self, epoch: int) -> None:
        """Hook before each training epoch (0-based), e.g. to switch training stages; most models need none."""

    def extra_train_step(self, step: int) -> None:
        """Hook after each optimizer step (e.g. codebook restarts), run eagerly between graph replays; most models
        need none."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
