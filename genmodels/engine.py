"""One training loop for every model: seeding, bf16 autocast on CUDA, EMA, clipping, evaluation, checkpoints.

The inner loop never waits for the GPU: batches come from a uint8 tensor resident on the device (genmodels.data),
logged values are summed on the device and read once per epoch, and the divergence check reads a loss copied to
the host one check interval earlier; progress lines (off unless `Trainer.progress` is set) use the host's step
count and clock only. On CUDA the model runs in channels_last (faster bf16 convolutions), Adam is fused, the whole
step (forward, backward, clipping, Adam, EMA) can be captured once as a CUDA graph, checked against an eager step and
replayed (genmodels.cuda_graph; opt-in with `cuda_graphs=True` until a GPU run proves it for every model; each
epoch's `graph_status` says how it ran),
and `compile=True` compiles the loss (forward and backward) with torch.compile; docs/PERFORMANCE.md says what each
of these buys and when compiling pays for itself.
"""
from __future__ import annotations

import copy
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from genmodels.config import TrainConfig
from genmodels.cuda_graph import GraphedStep, StepCheck
from genmodels.data import Batches
from genmodels.images import save_grid
from genmodels.io import load_checkpoint, save_atomic
from genmodels.models.base import GenerativeModel

CHECKPOINT_FILE = "state.pt"


MEMORY_FORMATS = TrainConfig.choices["memory_format"]
DIVERGENCE_CHECK_EVERY = 50  # steps between divergence checks (each reads a loss copied one interval earlier)
PROGRESS_EVERY_S = 10.0  # default seconds between progress lines within an epoch
INDUCTOR_GRAPHS = ("max-autotune", "reduce-overhead")  # torch.compile modes that make CUDA graphs of their own


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
    def update(self, model: nn.Module, step: torch.Tensor | int) -> None:
        """One averaging step; `step` may be a tensor on the device, so the update reads nothing back to the host
        and can be captured in a CUDA graph."""
        step = torch.as_tensor(step, dtype=torch.float32, device=self.model_device)
        weight = 1 - torch.clamp((1 + step) / (10 + step), max=self.decay)
        averages = list(self.model.parameters())
        # ema = ema * decay + p * weight with the weight a device tensor: foreach lerp takes only a host number (read
        # once under a graph) or a tensor per parameter (one kernel each); the Tensor forms of mul are one kernel.
        torch._foreach_mul_(averages, 1 - weight)
        torch._foreach_add_(averages, torch._foreach_mul(list(model.parameters()), weight))
        buffers = list(model.buffers())
        if buffers:  # one multi-tensor copy instead of a kernel launch per BatchNorm statistic
            torch._foreach_copy_(list(self.model.buffers()), buffers)

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_channels_last(memory_format: str, device: torch.device) -> bool:
    """Whether a model trains in channels_last: `auto` means on CUDA, where bf16 convolutions run in NHWC natively;
    on CPU the NCHW kernels are as fast or faster."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory_format {memory_format!r}; choose one of {', '.join(MEMORY_FORMATS)}")
    return memory_format == "channels_last" or (memory_format == "auto" and device.type == "cuda")


@contextmanager
def timed(progress: Callable[[str], None] | None, what: str) -> Iterator[None]:
    """Report `what` as it starts and, with its seconds, as it ends; nothing when `progress` is None."""
    if progress is None:
        yield
        return
    progress(f"{what} ...")
    start = time.perf_counter()
    yield
    progress(f"{what}: done in {time.perf_counter() - start:.1f} s")


class Trainer:
    """Trains `model` on uint8 images; `train_epoch`, `evaluate`, `save` and `load` are the whole API.

    `progress`, when set, gets a line every `progress_every` seconds of an epoch and as evaluation starts and ends;
    None (the default) keeps sweeps' trials quiet."""

    def __init__(self, model: GenerativeModel, cfg: TrainConfig, train_images: torch.Tensor,
                 test_images: torch.Tensor, device: torch.device | str | None = None, model_name: str = "",
                 config_record: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
                 progress_every: float = PROGRESS_EVERY_S):
        # config_record: the run's whole flat config, stored in every checkpoint (what from_checkpoint rebuilds)
        self.cfg, self.model_name, self.config_record = cfg, model_name, dict(config_record or {})
        self.progress, self.progress_every = progress, progress_every
        self.device = torch.device(device) if device else default_device()
        self.channels_last = use_channels_last(cfg.memory_format, self.device)
        # Only 4-d weights change layout; values, parameter names and state_dict keys stay the same. Batches stay
        # NCHW: the first convolution's output is channels_last anyway, and rand_like on an NCHW batch draws the
        # same dequantisation noise per pixel as without channels_last.
        self.model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else None)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: autotuning each conv once pays back at once
        self.train_batches = Batches(train_images, cfg.batch_size, self.device, shuffle=True, flip=cfg.flip,
                                     seed=cfg.seed)
        test = test_images[:cfg.eval_images] if cfg.eval_images else test_images
        self.test_batches = Batches(test, cfg.batch_size, self.device, shuffle=False, flip=False)
        self.subset_batches = Batches(test[:cfg.eval_subset], cfg.batch_size, self.device, shuffle=False,
                                      flip=False) if 0 < cfg.eval_subset < len(test) else None
        cuda = self.device.type == "cuda"
        # Inductor's CUDA graphs (reduce-overhead, max-autotune) would be captured inside ours: one or the other.
        self.cuda_graphs = cuda and cfg.cuda_graphs and not (cfg.compile and cfg.compile_mode in INDUCTOR_GRAPHS)
        # Fused Adam keeps its step count on the device; capturable lets a CUDA graph record the whole update.
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda,
                                          capturable=self.cuda_graphs)
        # The sampler's graphs follow the setting, not Inductor's (which compile training only); before the EMA copy
        model.cuda_graphs = cfg.cuda_graphs
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # Compile the bound method, not the module: self.model stays the original nn.Module, so state_dict keys,
        # checkpoints, EMA and evaluation are the same with or without compile (no `_orig_mod.` prefix).
        self.compiled_loss = torch.compile(self.model.loss, mode=cfg.compile_mode) if cfg.compile else None
        self._loss_on_host: torch.Tensor | None = None  # pinned buffer of the divergence check (CUDA)
        self._loss_copied: torch.cuda.Event | None = None
        self.step = 0
        self._step_on_device = torch.zeros((), device=self.device)  # the EMA's warm-up reads it inside the graph
        self._graphed: GraphedStep | None = None
        self._graph_key: tuple | None = None
        self.epoch = 0
        self.extra: dict[str, Any] = {}  # small values a caller wants checkpointed with the run (e.g. best metric)

    @property
    def eval_model(self) -> GenerativeModel:
        """The weights used for evaluation and sampling: the EMA copy when there is one."""
        return self.ema.model if self.ema else self.model

    def _autocast(self):
        enabled = self.cfg.amp and self.device.type == "cuda"
        # No cast cache under CUDA graphs: cached bf16 weights would be made once at capture and never refreshed.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled,
                              cache_enabled=not self.cuda_graphs)

    @property
    def graph_captured(self) -> bool:
        """Whether the training step now runs as a replayed CUDA graph."""
        return self._graphed is not None and self._graphed.captured

    @property
    def graph_status(self) -> str | None:
        """How the training step runs on CUDA (None on a CPU): "off: why", "warming up", "graphed: self-check
        passed (...)" or "eager: why" (not capturable, or the self-check failed)."""
        if self.device.type != "cuda":
            return None
        if not self.cuda_graphs:
            return "off: " + (f"compile_mode={self.cfg.compile_mode} makes its own CUDA graphs" if self.cfg.cuda_graphs
                              else "train.cuda_graphs=false")
        return self._graphed.status if self._graphed else "warming up"

    def _step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Forward, backward, clipping, the optimizer and the EMA on one batch, with no host sync: the body a
        CUDA graph captures. Returns the loss, every logged value stacked, and their names."""
        with self._autocast():
            loss, logs = (self.compiled_loss or self.model.loss)(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.model, self._step_on_device)
        self._step_on_device.add_(1)
        values = {"loss": loss, **logs}
        return loss.detach(), torch.stack([v.detach().float() for v in values.values()]), list(values)

    # What the self-check at capture (genmodels.cuda_graph.first_replay) saves and compares of `_step`.
    def _step_state(self) -> list[torch.Tensor]:
        modules = [self.model, *([self.ema.model] if self.ema else [])]
        optimizer = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return [*(t for m in modules for t in (*m.parameters(), *m.buffers())), *optimizer, self._step_on_device]

    def _step_values(self, outputs: tuple[torch.Tensor, torch.Tensor, list[str]]) -> dict[str, torch.Tensor]:
        # The logged values (the loss first). The weights are compared by their update (`_step_moved`), not their
        # norms: one Adam step moves a norm by ~lr / |w| (1e-5 of it at width 128, lr 2e-4), which no tolerance sees.
        _, stacked, names = outputs
        return {f"train_{name}": value for name, value in zip(names, stacked)}

    def _step_moved(self) -> dict[str, list[torch.Tensor]]:
        # Whose update (after - before, a norm per tensor) the self-check compares: the model's and the EMA's weights.
        return {"model update": list(self.model.parameters()),
                **({"EMA update": list(self.ema.model.parameters())} if self.ema else {})}

    def _step_counters(self) -> dict[str, torch.Tensor]:
        steps = [state["step"] for state in self.optimizer.state.values() if torch.is_tensor(state.get("step"))]
        return {"step count": self._step_on_device, **({"Adam step counts": torch.stack(steps)} if steps else {})}

    def _step_function(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """The eager step, or (CUDA, cuda_graphs) the graphed one. A new graph is captured whenever what the step
        trains changes (e.g. VQ-VAE's stage 2 freezes the autoencoder): which parameters need gradients and which
        modules are in training mode are the graph's key."""
        if not self.cuda_graphs:
            return self._step
        key = (tuple(p.requires_grad for p in self.model.parameters()), tuple(m.training for m in self.model.modules()))
        if self._graphed is None or key != self._graph_key:
            self._graphed, self._graph_key = None, key  # frees the old graph's memory pool before the new capture
            self._graphed = GraphedStep(self._step, name=f"{self.model_name or 'model'} training step",
                                        check=StepCheck(self._step_state, self._step_values, self._step_counters,
                                                        moved=self._step_moved),
                                        off_switch="train.cuda_graphs=false")
        return self._graphed

    def train_epoch(self, steps: int | None = None) -> dict[str, Any]:
        """One epoch: `steps` steps, else `steps_per_epoch`, else one pass over the training split. Returns the mean
        of each logged value as `train_<name>`, and on CUDA `graph_status` and `graph_captured` (0 or 1)."""
        self.model.train()
        self.model.start_epoch(self.epoch)
        step = self._step_function()
        names: list[str] | None = None
        sums: torch.Tensor | None = None  # every logged value, summed on the device: no host sync per step
        n = 0
        pending: int | None = None  # step of the loss last sent to the host for the divergence check
        steps = steps or self.cfg.steps_per_epoch or len(self.train_batches)
        start = time.perf_counter()
        next_report = start + self.progress_every
        for x in self.train_batches.epoch(steps):
            loss, stacked, step_names = step(x)
            self.step += 1
            self.model.extra_train_step(self.step)
            if names is None:
                names = step_names
            elif step_names != names:
                raise RuntimeError(f"{self.model_name or 'model'}.loss logged {step_names} after {names} in one "
                                   f"epoch; the logged names may change only between epochs")
            sums = torch.zeros_like(stacked) if sums is None else sums
            sums.add_(stacked)  # before the next step: a graph's outputs are overwritten by each replay
            n += 1
            if self.step % DIVERGENCE_CHECK_EVERY == 0:
                if pending is not None:
                    self._check_finite(pending)
                self._send_loss_to_host(loss)
                pending = self.step
            if self.progress and (now := time.perf_counter()) >= next_report:
                next_report = now + self.progress_every
                self._report_steps(n, steps, now - start)
        if pending is not None:
            self._check_finite(pending)
        self.epoch += 1
        means = (sums / max(n, 1)).tolist() if sums is not None else []  # the epoch's one sync
        metrics = {f"train_{k}": v for k, v in zip(names or [], means)}
        if not all(map(_finite, metrics.values())):
            raise Diverged(f"non-finite training metrics at epoch {self.epoch}: {metrics}")
        if self.graph_status is not None:
            metrics.update(graph_status=self.graph_status, graph_captured=int(self.graph_captured))
        return metrics

    def _report_steps(self, done: int, steps: int, seconds: float) -> None:
        # Steps the host has queued: on CUDA it runs ahead of the device by a bounded queue, close enough for an ETA.
        rate = done / seconds
        self.progress(f"epoch {self.epoch + 1}: step {done}/{steps} ({done / steps:.0%}), {rate:.1f} steps/s, "
                      f"{(steps - done) / rate:.1f} s left")

    def _send_loss_to_host(self, loss: torch.Tensor) -> None:
        """Start copying the loss to the host without waiting for it (CUDA); `_check_finite` reads it later."""
        value = loss.detach().float().reshape(1)
        if self.device.type != "cuda":
            self._loss_on_host = value
            return
        if self._loss_on_host is None:
            self._loss_on_host = torch.empty(1, pin_memory=True)
            self._loss_copied = torch.cuda.Event()
        self._loss_on_host.copy_(value, non_blocking=True)
        self._loss_copied.record()

    def _check_finite(self, step: int) -> None:
        """Raise Diverged if the loss sent at `step` was NaN or inf. The copy was queued a check interval ago,
        so it has long finished: waiting on its event does not stall the GPU's queue."""
        if self._loss_copied is not None:
            self._loss_copied.synchronize()
        value = float(self._loss_on_host[0])
        if not _finite(value):
            raise Diverged(f"loss is {value} at step {step}")

    @torch.no_grad()
    def evaluate(self, full: bool = True, subset: bool | None = None) -> dict[str, float]:
        """Test-split metrics of the eval model (EMA weights when used), in fp32. `full=False`: only the model's cheap
        metrics (GenerativeModel.evaluate), by default on the first `eval_subset` test images and named
        `subset_...`, so that no reader takes them for the full test split's; `subset=False`: on the whole split,
        under their own names (what a milestone needs when nothing ranks on the expensive ones)."""
        subset = not full if subset is None else subset
        if not subset or self.subset_batches is None:
            with timed(self.progress, f"epoch {self.epoch}: evaluating on {len(self.test_batches.images)} test images"):
                return self.eval_model.eval().evaluate(self._reported(self.test_batches, f"epoch {self.epoch}: "
                                                                                         f"evaluating"), full=full)
        metrics = self.eval_model.eval().evaluate(self.subset_batches.epoch(), full=False)
        return {**{f"subset_{k}": v for k, v in metrics.items()}, "subset_images": len(self.subset_batches.images)}

    def _reported(self, batches: Batches, what: str) -> Iterator[torch.Tensor]:
        """One pass over `batches`, with a progress line every `progress_every` seconds (none after the last batch:
        the phase's own "done" line follows): an evaluation with many importance samples takes minutes on a CPU."""
        if self.progress is None:
            yield from batches.epoch()
            return
        total, start = len(batches), time.perf_counter()
        next_report = start + self.progress_every
        for done, x in enumerate(batches.epoch(), 1):
            yield x  # the caller evaluates the batch before asking for the next one
            if done < total and (now := time.perf_counter()) >= next_report:
                next_report, rate = now + self.progress_every, done / (now - start)
                self.progress(f"{what}: batch {done}/{total} ({done / total:.0%}), {(total - done) / rate:.1f} s left")

    @torch.no_grad()
    def final_evaluate(self, out_dir: str | Path | None = None) -> tuple[dict[str, float], dict[str, Path]]:
        """The model's once-per-run metrics and image grids (see GenerativeModel.final_evaluate/final_images)."""
        model = self.eval_model.eval()
        metrics = model.final_evaluate(self._reported(self.test_batches, "final evaluation"))
        images = model.final_images(self.test_images(len(self.test_batches.images)), Path(out_dir)) if out_dir else {}
        return metrics, images

    def test_images(self, n: int) -> torch.Tensor:
        return self.test_batches.images[:n]

    @torch.no_grad()
    def write_grids(self, out_dir: str | Path, n: int = 64, budget: float = 1.0) -> dict[str, Path]:
        """Sample and reconstruction grids as PNG, drawn with a fixed seed so epochs are comparable."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = self.eval_model.eval()
        paths = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed)
            if model.can_sample:
                paths["samples"] = save_grid(model.sample(n, budget=budget), out_dir / "samples.png")
            if model.can_reconstruct:
                x = self.test_images(min(n // 2, 32))
                pairs = torch.stack([x.float() / 255, model.reconstruct(x).float()], 1).flatten(0, 1)
                paths["reconstructions"] = save_grid(
                    pairs, out_dir / "reconstructions.png", nrow=16, column_labels=["in", "rec"] * 8,
                    title="columns alternate: a test image (in), then its reconstruction (rec)")
        return paths

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "data": self.train_batches.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.model.state_dict() if self.ema else None,
                "step": self.step, "epoch": self.epoch, "rng": rng, "extra": dict(self.extra),
                "model_name": self.model_name, "config": self.config_record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])  # copies into the parameters: their layout is kept
        self.optimizer.load_state_dict(state["optimizer"])
        _fit_optimizer_state(self.optimizer, fused=self.device.type == "cuda", capturable=self.cuda_graphs)
        self._graphed = None  # the loaded optimizer state is new tensors: a graph captured before would miss them
        if self.ema and state.get("ema") is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.step, self.epoch = state["step"], state["epoch"]
        self._step_on_device.fill_(self.step)
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

    def load_weights(self, state: dict[str, Any]) -> None:
        """The weights (and EMA weights) of a checkpoint, as a finished run: no optimizer, no RNG, no step."""
        self.model.load_state_dict(state["model"])
        if self.ema and state.get("ema") is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.epoch = self.cfg.epochs
        self._graphed = None


def _fit_optimizer_state(optimizer: torch.optim.Optimizer, fused: bool, capturable: bool) -> None:
    """Make loaded optimizer state fit this run's device: a checkpoint written on CUDA (fused, capturable, step
    counts and channels_last moments on the GPU) may resume on a CPU, and one written on a CPU may resume on CUDA.
    Adam's load_state_dict takes `fused` and `capturable` from the checkpoint; this run's own settings win, step
    counts go where those settings want them, and moments get their parameter's memory layout (the fused and
    foreach kernels expect matching strides)."""
    for group in optimizer.param_groups:
        group["fused"], group["capturable"] = fused, capturable
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key == "step":
                    device = p.device if fused or capturable else "cpu"
                    optimizer.state[p][key] = torch.as_tensor(value, dtype=torch.float32).to(device).clone()
                elif torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _as_python_state(state: Any) -> tuple:
    # random.setstate needs tuples; a round trip through some serialisers yields lists.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
