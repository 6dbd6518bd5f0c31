"""Whole training steps captured in a CUDA graph and replayed: one launch instead of hundreds.

A VAE step launches ~280 kernels and an NCSN U-Net step ~2,000; at the batch sizes trials use, the host takes as
long to launch them as the GPU takes to run them (docs/PERFORMANCE.md). `GraphedStep` runs a step function eagerly
for a few steps on a side stream (cuDNN autotuning, lazy optimizer state, torch.compile), captures the next call
with `torch.cuda.graph`, and from then on copies each batch into the captured input and replays the graph.

What a step function must do to be captured (Trainer._step does all of it):
- keep every shape fixed and read nothing back to the host (no `.item()`, no data-dependent shapes);
- draw its random numbers from the default CUDA generator, which `torch.cuda.graph` advances at each replay, so a
  replay draws what the eager step would have drawn;
- keep its state in tensors updated in place (the optimizer with `capturable=True`, the EMA's step count on the
  device); Python values read inside the step are frozen at capture;
- run autocast with `cache_enabled=False`: a weight cast cached before the capture would be read by every replay,
  stale once the weight changes, and freed when the autocast region ends.
Its outputs are the same tensors at every replay, overwritten by each one: read or copy them before the next call.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

WARMUP_STEPS = 3  # eager steps before capture, as torch.cuda.graph's documentation recommends


class GraphedStep:
    """`step(x)` run eagerly for `warmup` calls, then captured once and replayed for every later call.

    If capture fails (a step that syncs with the host, or an op CUDA graphs cannot record), the failure is warned
    about once, kept in `capture_error`, and every later call runs the step eagerly: slower, never wrong."""

    def __init__(self, step: Callable[[torch.Tensor], Any], warmup: int = WARMUP_STEPS, name: str = "step"):
        self.step, self.warmup, self.name = step, warmup, name
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input: torch.Tensor | None = None
        self.outputs: Any = None
        self.capture_error: str | None = None
        self.side_stream = torch.cuda.Stream()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor) -> Any:
        if self.capture_error is not None:
            return self.step(x)
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                return self._on_side_stream(x)
            if not self._capture(x):
                return self.step(x)
        self.static_input.copy_(x)
        self.graph.replay()
        return self.outputs

    def _on_side_stream(self, x: torch.Tensor) -> Any:
        # Warm-up off the default stream, as capture itself runs: workspaces and autotuned kernels are then made
        # for a side stream before the capture needs them.
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            outputs = self.step(x)
        main.wait_stream(self.side_stream)
        return outputs

    def _capture(self, x: torch.Tensor) -> bool:
        self.static_input = x.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a CUDA call from another thread of the process (a logger, a checkpoint upload) must not
            # invalidate this capture, and is not recorded into it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.step(self.static_input)
        except RuntimeError as error:
            self.capture_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.static_input = self.outputs = None
            warnings.warn(f"CUDA graph capture of the {self.name} failed ({self.capture_error}); training on "
                          f"without CUDA graphs (set train.cuda_graphs=false to skip the attempt)", stacklevel=3)
            return False
        self.graph = graph
        return True
