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

Safety, in the order it acts (`first_replay`):
1. Before any capture, the step's last eager run is probed for host syncs; a step that syncs runs eagerly from then
   on. The probe exists because a capture that fails cannot be undone on torch 2.11: `torch.cuda.graph` raises
   before it restores the stream, the default generator stays flagged as capturing (the next random op, or replay
   of any other graph, fails) and the allocator keeps a stale capture. So a capture that still fails raises
   `GraphCaptureFailed`, which ends the process's run instead of training on in a broken CUDA state.
2. The capture is checked: the same batch from the same state and RNG state, run eagerly, then captured and
   replayed, must give the same outputs and the same update (after - before, per tensor) within a tolerance, and the
   same counters exactly. A replay that differs is dropped and the step runs eagerly; a replay that matches is that
   step's update. A step with no state of its own (the Langevin step, whose graph is captured anew for each chunk of
   chains) is compared once per model, shape and precision in a process: a later capture of it is still probed, but
   its outputs are not copied to the host and compared again.
Under a low-precision autocast (bf16 sampling) the comparison allows bf16's rounding (AUTOCAST_RTOL, AUTOCAST_ATOL).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Any, Callable, ContextManager, Hashable, NamedTuple

import torch

WARMUP_STEPS = 3  # eager steps before capture, as torch.cuda.graph's documentation recommends
# The least tolerance of a step called under bf16 or fp16 autocast: a cuDNN kernel that is not deterministic (split-K)
# may round one bf16 value the other way (a relative 2**-8 = 4e-3 of it), which moves a Langevin chain's pixel near 0
# by far more than 1e-5 of the chains' RMS.
AUTOCAST_RTOL, AUTOCAST_ATOL = 1e-2, 1e-3


class GraphCaptureFailed(RuntimeError):
    """A CUDA graph capture failed inside torch.cuda.graph; the process's CUDA state is no longer usable (see the
    module's docstring), so the run stops. Not Diverged: the trainable lets it through, and Tune ends the trial's
    process and retries the trial in a new one."""


def _outputs(outputs: Any) -> dict[str, torch.Tensor]:
    # The default comparison: each tensor output in units of its RMS, so a value near 0 (a chain's pixel) is held
    # to the tolerance of the tensor's scale, not of itself.
    outputs = [outputs] if torch.is_tensor(outputs) else outputs if isinstance(outputs, (list, tuple)) else []
    tensors = [t for t in outputs if torch.is_tensor(t)]
    return {f"output {i} / RMS": t / t.float().pow(2).mean().sqrt().clamp_min(1e-12) for i, t in enumerate(tensors)}


class StepCheck(NamedTuple):
    """What the self-check at capture needs to know of a step. The default fits a step with no state of its own
    (the Langevin step): its outputs are compared."""
    state: Callable[[], list[torch.Tensor]] = list  # every tensor the step updates in place: saved and restored
    compared: Callable[[Any], dict[str, torch.Tensor]] = _outputs  # outputs -> values equal within the tolerance
    exact: Callable[[], dict[str, torch.Tensor]] = dict  # values equal exactly after the step (step counts)
    # |replayed - eager| <= atol + rtol |eager|, for the small differences of bf16 rounding and of float atomics
    # (cuDNN's algorithms, index_add_) between two runs of one step; the verdict says how much of it was used. Noise
    # drawn twice moves a loss by far more; a step left out shows in the exact counters.
    rtol: float = 1e-3
    atol: float = 1e-5
    # Named groups of `state` tensors (a model's parameters) whose update is compared: the norm of (after - before)
    # per tensor, in units of the RMS of the group's eager update norms. One Adam step moves a parameter's norm by
    # ~1e-5 of it at width 128 and lr 2e-4, far below any tolerance on the norms themselves; the update is compared
    # at update_rtol, which bf16 gradients allow (their rounding moves an update's norm by ~1e-4 of it), and a wrong,
    # skipped or partial update moves it by far more.
    moved: Callable[[], dict[str, list[torch.Tensor]]] = dict
    update_rtol: float = 1e-2
    update_atol: float = 1e-4


def compare(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rtol: float,
            atol: float) -> tuple[float, str]:
    """The worst element of `got` against `expected`: how many times its tolerance |got - expected| is (above 1: a
    mismatch; with rtol = atol = 0, any difference is infinitely many) and a line that says where."""
    worst, line = 0.0, ""
    for name, e in expected.items():
        e, g = e.detach().double().flatten().cpu(), got[name].detach().double().flatten().cpu()
        if e.shape != g.shape:
            return float("inf"), f"{name}: {g.numel()} values replayed vs {e.numel()} eager"
        if not e.numel():
            continue
        excess = torch.where(e == g, 0.0, (g - e).abs() / (atol + rtol * e.abs()))
        excess = torch.where(excess.isnan(), float("inf"), excess)  # a NaN matches nothing
        i = int(excess.argmax())
        if excess[i] > worst or not line:
            worst = float(excess[i])
            line = f"{name}{f'[{i}]' if e.numel() > 1 else ''}: {g[i]:.7g} replayed vs {e[i]:.7g} eager"
    return worst, line


def first_replay(x: torch.Tensor, step: Callable[[torch.Tensor], Any], replay: Callable[[torch.Tensor], Any],
                 check: StepCheck, probe: Callable[[], ContextManager] = contextlib.nullcontext,
                 compare_outputs: bool = True) -> tuple[Any, bool, str]:
    """Whether `replay(x)` (capture, then replay) makes the same update as `step(x)`, and the update that stands.

    Saves `check.state()` and the RNG state, runs `step(x)` inside `probe()` (the host-sync probe on CUDA),
    restores both in place (the graph reads the same addresses), runs `replay(x)`, and compares `check.compared`
    of the two outputs within the tolerance, the update of each tensor of `check.moved()` within the update
    tolerance, and `check.exact()` and the RNG state exactly. Returns the outputs that stand, whether they are the
    replay's, and a verdict: "self-check passed (...)"; else, with the state and RNG restored and the step run
    eagerly again, "not capturable (...)" if the probed step raised, or "self-check failed (...)".
    `compare_outputs=False` (a step compared before) skips the comparison and its host copies: the replay stands
    if the probe passed, with the verdict "self-check passed earlier (...)". Takes any `replay`, so that the
    comparison is tested on a CPU with faults put in."""
    tensors = check.state()
    saved = [t.detach().clone() for t in tensors]
    rng = _rng_state(x.device)
    before = {id(t): s for t, s in zip(tensors, saved)}
    groups = check.moved()
    if any(id(t) not in before for group in groups.values() for t in group):
        raise ValueError("every tensor of StepCheck.moved must be one of StepCheck.state: its update is measured "
                         "from the state saved before the step")
    # (the tensors, their saved copies) per group
    moved = {name: ([t.detach() for t in group], [before[id(t)] for t in group]) for name, group in groups.items()}
    scales: dict[str, torch.Tensor] = {}  # each group's RMS eager update norm: the unit of both runs' updates

    def restore() -> None:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        _set_rng_state(rng, x.device)

    def updates() -> dict[str, torch.Tensor]:
        # One norm per tensor of (after - before), in units of the group's eager RMS (fixed by the first call).
        out = {}
        for name, (group, saved_group) in moved.items():
            if group:
                norms = torch.stack(torch._foreach_norm(torch._foreach_sub(group, saved_group)))
                scale = scales.setdefault(name, norms.double().pow(2).mean().sqrt().clamp_min(1e-30))
                out[name] = norms.double() / scale
        return out

    def observed(outputs: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # Read to the host at once: a graph's outputs are overwritten by its next replay.
        exact = {**check.exact(), "RNG state": _rng_state(x.device)}
        return ({k: v.detach().double().cpu() for k, v in check.compared(outputs).items()},
                {k: v.detach().double().cpu() for k, v in updates().items()},
                {k: v.detach().double().cpu() for k, v in exact.items()})

    try:
        with probe():
            reference = step(x)
    except RuntimeError as error:  # maybe part way through the step: run it again from the saved state
        restore()
        return step(x), False, f"not capturable ({_first_line(error)})"
    if not compare_outputs:
        restore()
        return replay(x), True, "self-check passed earlier (the same step and shape, compared once per process)"
    values, moves, counters = observed(reference)
    restore()
    outputs = replay(x)
    replayed_values, replayed_moves, replayed_counters = observed(outputs)
    excess, where = compare(values, replayed_values, check.rtol, check.atol)
    moved_excess, moved_where = compare(moves, replayed_moves, check.update_rtol, check.update_atol)
    off, which = compare(counters, replayed_counters, 0.0, 0.0)
    # A value out of tolerance says most about what went wrong, then an update; a counter off (a step left out) next.
    if excess > 1 or moved_excess > 1 or off:
        restore()
        why = where if excess > 1 else moved_where if moved_excess > 1 else which
        return step(x), False, f"self-check failed ({why})"
    return outputs, True, f"self-check passed (largest difference {max(excess, moved_excess):.1%} of its tolerance)"


class GraphedStep:
    """`step(x)` run eagerly for `warmup` calls, then captured once, checked against an eager run (see
    `first_replay`; `check` says what the step changes and what to compare) and replayed for every later call.

    A step that syncs with the host, or whose replay differs from its eager run, is warned about once and runs
    eagerly from then on (`status` says why). A capture that fails inside torch.cuda.graph raises
    GraphCaptureFailed, naming `off_switch` (what turns the graph off).
    """

    def __init__(self, step: Callable[[torch.Tensor], Any], warmup: int = WARMUP_STEPS, name: str = "step",
                 check: StepCheck | None = None, off_switch: str = "graphed=False"):
        # A step with no state of its own (check None: the Langevin step, captured anew for each chunk of chains) is
        # compared once per process for each model, shape and precision it is called with (see `_compared_key`).
        self._compare_once = _step_identity(step) if check is None else None
        # Bound methods are held weakly: their owner (the Trainer) holds this object, and the cycle would keep the
        # trainer, its optimizer state and this graph's memory pool alive until a full garbage collection.
        check = StepCheck() if check is None else check
        self._step = _weakly(step)
        self.check = check._replace(state=_weakly(check.state), compared=_weakly(check.compared),
                                    exact=_weakly(check.exact), moved=_weakly(check.moved))
        self.warmup, self.name, self.off_switch = warmup, name, off_switch
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input: torch.Tensor | None = None
        self.outputs: Any = None
        self.verdict: str | None = None  # the self-check's, once the capture call has run
        self._side_stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @property
    def status(self) -> str:
        """"warming up", "graphed: self-check passed (...)", or "eager: " and why."""
        if self.verdict is None:
            return "warming up"
        return f"{'graphed' if self.graph is not None else 'eager'}: {self.verdict}"

    def step(self, x: torch.Tensor) -> Any:
        return self._step(x)

    def __call__(self, x: torch.Tensor) -> Any:
        if self.graph is not None:
            self.static_input.copy_(x)
            self.graph.replay()
            return self.outputs
        if self.verdict is not None:
            return self.step(x)
        if self.calls < self.warmup:
            self.calls += 1
            return self._on_side_stream(x)
        key = self._compared_key(x)
        earlier = _COMPARED.get(key) if key is not None else None
        if earlier is not None and not earlier.startswith("self-check passed"):
            self.verdict = f"{earlier}, earlier in this process for the same step and shape"
            return self.step(x)  # warned about then; not captured again
        check = self.check
        if _low_precision_autocast(x.device.type):  # bf16 sampling: one rounding flip must not fail the check
            check = check._replace(rtol=max(check.rtol, AUTOCAST_RTOL), atol=max(check.atol, AUTOCAST_ATOL))
        outputs, graphed, self.verdict = first_replay(x, self._on_side_stream, self._capture, check,
                                                      probe=_no_host_syncs, compare_outputs=earlier is None)
        if key is not None and earlier is None and not self.verdict.startswith("not capturable"):
            _COMPARED[key] = self.verdict
        if not graphed:
            self.graph = self.static_input = self.outputs = None  # frees the graph's memory pool
            warnings.warn(f"CUDA graph of the {self.name}: {self.verdict}; it runs eagerly", stacklevel=2)
        return outputs

    def _compared_key(self, x: torch.Tensor) -> Hashable | None:
        """What a stateless step's comparison holds for, in this process: the step's code (the same closure made
        again for each chunk) and the objects whose methods it calls (the model whose score it samples: another
        model, another trial in a reused process, is compared again), the name, the input's shape, dtype and device,
        and the autocast it runs under. None for a step with state (a training step): compared at every capture."""
        if self._compare_once is None:
            return None
        kind = x.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        return self._compare_once, self.name, tuple(x.shape), x.dtype, x.device, autocast

    def _on_side_stream(self, x: torch.Tensor) -> Any:
        # Warm-up off the default stream, as capture itself runs: workspaces and autotuned kernels are then made
        # for a side stream before the capture needs them.
        main = torch.cuda.current_stream()
        self._side_stream = self._side_stream or torch.cuda.Stream()
        self._side_stream.wait_stream(main)
        try:
            with torch.cuda.stream(self._side_stream):
                return self.step(x)
        finally:
            # Also when the step raised part way (the probe found a host sync): the restore that follows copies on
            # the main stream, after whatever the half step queued on this one.
            main.wait_stream(self._side_stream)

    def _capture(self, x: torch.Tensor) -> Any:
        """Capture the step on `x`, then replay it once: capture runs nothing, so this replay is the step."""
        main = torch.cuda.current_stream()
        self.static_input = x.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a CUDA call from another thread of the process (a logger, a checkpoint upload) must not
            # invalidate this capture, and is not recorded into it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.step(self.static_input)
        except RuntimeError as error:
            torch.cuda.set_stream(main)  # torch.cuda.graph raised before restoring it; the rest cannot be undone
            raise GraphCaptureFailed(
                f"CUDA graph capture of the {self.name} failed ({_first_line(error)}), which leaves this process's "
                f"CUDA state unusable; run it with CUDA graphs off: {self.off_switch}") from error
        self.graph = graph
        graph.replay()
        return self.outputs


@contextlib.contextmanager
def _no_host_syncs():
    """Every host sync raises inside (process-wide, for the one step probed): a sync would invalidate a capture,
    and is cheaper to find out about before one begins."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


# Stateless steps compared in this process: GraphedStep._compared_key -> the verdict of that comparison.
_COMPARED: dict[Hashable, str] = {}


def _step_identity(fn: Callable) -> tuple | None:
    """The code a step function runs (a closure made again per call has the same) and weak references to the owners
    of the bound methods it is or holds (equal only while it is the same object, never a later one at the same
    address); None if it has no code or an owner cannot be referred to weakly."""
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None:
        return None
    methods = [fn] + [cell.cell_contents for cell in getattr(func, "__closure__", None) or ()
                      if _filled(cell) and inspect.ismethod(cell.cell_contents)]
    try:
        return (code, *(weakref.ref(m.__self__) for m in methods if inspect.ismethod(m)))
    except TypeError:
        return None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


def _low_precision_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (torch.bfloat16,
                                                                                               torch.float16)


def _weakly(fn: Callable) -> Callable:
    if not inspect.ismethod(fn):
        return fn
    method = weakref.WeakMethod(fn)
    return lambda *args: method()(*args)


def _rng_state(device: torch.device) -> torch.Tensor:
    # The generator a step on `device` draws from: the default CUDA one, which graphs record, or the CPU's.
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
