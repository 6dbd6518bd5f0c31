"""One training loop for every model: seeding, bf16 autocast on CUDA, EMA, clipping, evaluation, checkpoints."""
from __future__ import annotations

import copy
import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from genmodels.base import GenerativeModel, config_from_dict
from genmodels.data import Batches
from genmodels.images import save_grid
from genmodels.registry import build_model

CHECKPOINT_FILE = "state.pt"


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max grad norm; 0 = off
    ema_decay: float = 0.0  # 0 = no EMA copy of the weights
    steps_per_epoch: int = 0  # 0 = one pass over the training split; otherwise a fixed report interval
    eval_images: int = 0  # test images per evaluation; 0 = the whole test split
    seed: int = 0
    flip: bool = True
    amp: bool = True  # bf16 autocast, on CUDA only


class Diverged(RuntimeError):
    """The loss became NaN or inf."""


class EMA:
    """Exponential moving average of a model's weights, kept as a full model copy used for eval and sampling.

    The decay warms up as min(decay, (1 + step) / (10 + step)): early on the average follows the weights instead of
    staying at the random initialisation for ~1/(1 - decay) steps, which short runs (and ASHA's first rungs) need.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Trains `model` on uint8 images; `train_epoch`, `evaluate`, `save` and `load` are the whole API."""

    def __init__(self, model: GenerativeModel, cfg: TrainConfig, train_images: torch.Tensor,
                 test_images: torch.Tensor, device: torch.device | str | None = None, model_name: str = ""):
        self.cfg, self.model_name = cfg, model_name
        self.device = torch.device(device) if device else default_device()
        self.model = model.to(self.device)
        self.train_batches = Batches(train_images, cfg.batch_size, self.device, shuffle=True, flip=cfg.flip,
                                     seed=cfg.seed)
        test = test_images[:cfg.eval_images] if cfg.eval_images else test_images
        self.test_batches = Batches(test, cfg.batch_size, self.device, shuffle=False, flip=False)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.epoch = 0
        self.extra: dict[str, Any] = {}  # small values a caller wants checkpointed with the run (e.g. best metric)

    @property
    def eval_model(self) -> GenerativeModel:
        """The weights used for evaluation and sampling: the EMA copy when there is one."""
        return self.ema.model if self.ema else self.model

    def _autocast(self):
        enabled = self.cfg.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_epoch(self) -> dict[str, float]:
        """One epoch (or `steps_per_epoch` steps); returns the mean of each logged value as `train_<name>`."""
        self.model.train()
        self.model.start_epoch(self.epoch)
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for x in self.train_batches.epoch(self.cfg.steps_per_epoch or None):
            with self._autocast():
                loss, logs = self.model.loss(x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            if self.ema:
                self.ema.update(self.model, self.step)
            self.step += 1
            self.model.extra_train_step(self.step)
            for k, v in {"loss": loss, **logs}.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
            n += 1
            if self.step % 50 == 0 and not torch.isfinite(loss):  # one sync every 50 steps, not every step
                raise Diverged(f"loss is {loss.item()} at step {self.step}")
        self.epoch += 1
        metrics = {f"train_{k}": (v / max(n, 1)).item() for k, v in sums.items()}
        if not all(map(_finite, metrics.values())):
            raise Diverged(f"non-finite training metrics at epoch {self.epoch}: {metrics}")
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test-split metrics of the eval model (EMA weights when used), in fp32."""
        return self.eval_model.eval().evaluate(self.test_batches.epoch())

    @torch.no_grad()
    def final_evaluate(self, out_dir: str | Path | None = None) -> tuple[dict[str, float], dict[str, Path]]:
        """The model's once-per-run metrics and image grids (see GenerativeModel.final_evaluate/final_images)."""
        model = self.eval_model.eval()
        metrics = model.final_evaluate(self.test_batches.epoch())
        images = model.final_images(self.test_images(len(self.test_batches.images)), Path(out_dir)) if out_dir else {}
        return metrics, images

    def test_images(self, n: int) -> torch.Tensor:
        return self.test_batches.images[:n]

    @torch.no_grad()
    def write_grids(self, out_dir: str | Path, n: int = 64, **sample_kwargs: Any) -> dict[str, Path]:
        """Sample and reconstruction grids as PNG, drawn with a fixed seed so epochs are comparable."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.eval_model.eval()
        paths = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            if model.can_sample:
                paths["samples"] = save_grid(model.sample(n, **sample_kwargs), out_dir / "samples.png")
            if model.can_reconstruct:
                x = self.test_images(min(n // 2, 32))
                pairs = torch.stack([x.float() / 255, model.reconstruct(x).float()], 1).flatten(0, 1)
                paths["reconstructions"] = save_grid(pairs, out_dir / "reconstructions.png", nrow=16)
        return paths

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "data": self.train_batches.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.model.state_dict() if self.ema else None,
                "step": self.step, "epoch": self.epoch, "rng": rng, "extra": dict(self.extra),
                "model_name": self.model_name, "train_config": dataclasses.asdict(self.cfg),
                "model_config": dataclasses.asdict(self.model.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema and state.get("ema") is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.extra = dict(state.get("extra", {}))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_python_state(rng["python"]))
        self.train_batches.generator.set_state(rng["data"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save(self, path: str | Path) -> Path:
        return save_atomic(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(load_checkpoint(path))

    def fit(self, on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train to `cfg.epochs`, evaluating after each epoch; returns the last metrics."""
        metrics: dict[str, float] = {}
        while self.epoch < self.cfg.epochs:
            metrics = {**self.train_epoch(), **self.evaluate(), "epoch": self.epoch, "step": self.step}
            if on_epoch:
                on_epoch(self.epoch, metrics)
        return metrics


def make_trainer(model_name: str, params: dict[str, Any], train_images: torch.Tensor, test_images: torch.Tensor,
                 device: torch.device | str | None = None) -> Trainer:
    """Seed, build the model and a Trainer from one flat dict holding TrainConfig and model-config keys."""
    cfg = config_from_dict(TrainConfig, params)
    seed_everything(cfg.seed)
    model = build_model(model_name, params, channels=train_images.shape[1])
    return Trainer(model, cfg, train_images, test_images, device=device, model_name=model_name)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _as_python_state(state: Any) -> tuple:
    # random.setstate needs tuples; a round trip through some serialisers yields lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
