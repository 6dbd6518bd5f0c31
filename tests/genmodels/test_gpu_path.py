"""What the GPU path relies on, tested on the CPU where it can be and on CUDA where it needs a GPU:

- the sampler's precision: sampling_precision=bf16 runs the score network's convolutions in bf16, and fp32 leaves a
  caller's bf16 autocast on (the bench's "bf16" sampling row);
- VQ-VAE dead-code restarts read nothing back to the host, and draw the same codes as the restart they replaced;
- a packed trial plans its sampling batch from its share of the GPU's free memory, and an FID run probes once;
- VQ-VAE stage 2 lets go of stage 1's last batch of encoder outputs (under CUDA graphs: memory of the stage-1
  graph's pool) and of the stage-1 graphed step.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import types
import weakref

import pytest
import torch
from conftest import make_trainer
from torch.utils._python_dispatch import TorchDispatchMode

import genmodels.engine as engine
import genmodels.models.ncsn as ncsn
from bench.training import sampling_rate
from genmodels.data import synthetic_images
from genmodels.metrics.fid import FIDScorer
from genmodels.networks.quantizer import VectorQuantizer, _sq_dist
from genmodels.registry import build_model

NCSN_TINY = dict(arch="unet", width=8, unet_blocks=1, sigma_1=20.0, sigma_L=0.01, num_levels=2, langevin_steps=1,
                 langevin_eps=1e-5)
VQ_TINY = dict(width=8, res_blocks=1, codebook_size=16, code_dim=8, prior_width=8, prior_layers=4, restart_window=5)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------------- the sampler's precision

def conv_dtypes(model: torch.nn.Module) -> tuple[set[torch.dtype], list]:
    """The output dtypes of every convolution of `model` from now on (a set the hooks fill), and the hooks."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return seen, hooks


@pytest.mark.parametrize("precision, caller_bf16, expected", [
    ("bf16", False, torch.bfloat16),  # asked for by the config
    ("fp32", True, torch.bfloat16),  # the caller's autocast stays on (it was switched off inside sample)
    ("fp32", False, torch.float32),  # the default: fp32
])
def test_the_samplers_convolutions_run_in_the_precision_asked_for(precision, caller_bf16, expected):
    torch.manual_seed(0)
    model = build_model("ncsn", {**NCSN_TINY, "sampling_precision": precision}, channels=3).eval()
    seen, _ = conv_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=caller_bf16):
        x = model.sample(4, batch_size=4)
    assert seen == {expected}
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)  # the chains themselves stay fp32


@pytest.mark.parametrize("autocast, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_benchs_bf16_sampling_row_samples_in_bf16(autocast, expected):
    # bench.training's "sampling, bf16 autocast" row: sampling_rate(autocast=True) on the default config
    model = build_model("ncsn", NCSN_TINY, channels=3).eval()
    assert model.cfg.sampling_precision == "fp32"
    seen, _ = conv_dtypes(model)
    row = sampling_rate(model, torch.device("cpu"), batch=2, steps_per_level=1, repeats=1, autocast=autocast)
    assert seen == {expected} and row["steps"] == model.schedule.L + 1


# ------------------------------------------------------------------------ restarts without host reads

# Ops that read a tensor's value on the host (a device sync on CUDA): .item(), bool(), int(), float() and indexing
# with a 0-dim tensor go through _local_scalar_dense; the others size their output from the data, or check their
# input on the host (torch.multinomial's one-sample path reads the weights' min, max and sum).
HOST_READS = ("local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "multinomial", "histc",
              "repeat_interleave")


class HostReads(TorchDispatchMode):
    """Records every op run under it that reads tensor values on the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.lstrip("_").startswith(HOST_READS):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def python_host_reads():
    """Calls of Tensor.item, bool, int, float, index and tolist while it is open, by name (HostReads sees the reads
    made in C++ too)."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "__bool__", "__index__", "__int__", "__float__", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield calls


def quantizer_with_dead_codes(mode: str = "ema", seed: int = 0, dead: int | None = None) -> VectorQuantizer:
    """A 32-code quantizer after training steps on clustered outputs: most codes dead (or `dead` of them, chosen
    at random: -1 for all), the latest batch in `_recent`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    q = VectorQuantizer(32, 4, mode=mode, decay=0.9, restart_window=3).train()
    centres = torch.randn(6, 4, generator=g) * 3
    for _ in range(4):
        z = (centres[torch.randint(6, (96,), generator=g)] + 0.1 * torch.randn(96, 4, generator=g))
        q(z.view(6, 16, 4).permute(0, 2, 1).reshape(6, 4, 4, 4))
    if dead is not None:
        q.unused_steps.zero_()
        picked = torch.randperm(32, generator=g)[:dead] if dead >= 0 else torch.arange(32)
        q.unused_steps[picked] = q.restart_window
    return q


def test_the_host_read_detector_sees_what_it_has_to():
    # the old restart's reads: a 0-dim index tensor, torch.multinomial
    x, i = torch.arange(5.0), torch.tensor(2)
    with HostReads() as mode, python_host_reads() as python_reads:
        x[i]
        torch.multinomial(x, 1)
        bool(x.sum() > 0)
    assert len(mode.reads) == 3 and python_reads == ["__bool__"], (mode.reads, python_reads)


@pytest.mark.parametrize("mode", ["ema", "loss"])
def test_dead_code_restarts_read_nothing_on_the_host(mode):
    q = quantizer_with_dead_codes(mode)
    dead_before = int(q.dead_codes())
    assert dead_before > 16  # the loop runs its 16 passes with a dead code to restart in each
    with HostReads() as reads, python_host_reads() as python_reads:
        q.restart_dead_codes()
    assert reads.reads == [] and python_reads == []
    assert int(q.codes_restarted) == 16 and int(q.dead_codes()) == dead_before - 16


@cuda
def test_dead_code_restarts_do_not_sync_on_cuda():
    q = quantizer_with_dead_codes().cuda()
    q._recent = q._recent.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q.restart_dead_codes()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(q.codes_restarted) == 16


@torch.no_grad()
def restart_at_0e26f38(q: VectorQuantizer, max_restarts: int = 16) -> None:
    """VectorQuantizer.restart_dead_codes as it was at 0e26f38 (0-dim index tensors and torch.multinomial)."""
    recent = q._recent
    dead = q.unused_steps >= q.restart_window
    codebook = q.codebook.detach().float()
    nearest = _sq_dist(recent, codebook).masked_fill(dead[None], float("inf")).amin(1)
    restarted = torch.zeros_like(dead)
    for _ in range(min(max_restarts, q.num_codes)):
        pending = dead & ~restarted
        code = pending.float().argmax()
        weights = torch.where(torch.isfinite(nearest), nearest, torch.ones_like(nearest)).clamp_min(0)
        weights = weights + (weights.sum() == 0).float()
        pick = recent[torch.multinomial(weights, 1)[0]]
        act = pending.any()
        codebook[code] = torch.where(act, pick, codebook[code])
        restarted[code] |= act
        nearest = torch.minimum(nearest, torch.where(act, _sq_dist(recent, pick[None])[:, 0], nearest))
    q.codebook.copy_(torch.where(restarted[:, None], codebook, q.codebook))
    if q.mode == "ema":
        q.cluster_size.copy_(torch.where(restarted, torch.ones_like(q.cluster_size), q.cluster_size))
        q.code_sum.copy_(torch.where(restarted[:, None], codebook, q.code_sum))
    q.unused_steps.masked_fill_(restarted, 0)
    q.codes_restarted.add_(restarted.sum())


@pytest.mark.parametrize("mode", ["ema", "loss"])
@pytest.mark.parametrize("dead", [None, 0, 3, 16, 20, -1])  # as trained (most), none, fewer than 16, more, all
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restarts_draw_the_codes_the_old_restart_drew(mode, dead, seed):
    # The draw is torch.multinomial's own one-sample path (weights over Exponential(1) noise, the argmax), so from
    # the same RNG state the new restart picks the same encoder outputs, code by code, and leaves the RNG where
    # the old one left it.
    new = quantizer_with_dead_codes(mode, seed, dead)
    old = copy.deepcopy(new)
    old._recent = new._recent
    was_dead = new.unused_steps >= new.restart_window
    torch.manual_seed(100 + seed)
    new.restart_dead_codes()
    after_new = torch.rand(1)
    torch.manual_seed(100 + seed)
    restart_at_0e26f38(old)
    after_old = torch.rand(1)
    for (name, a), (_, b) in zip(new.state_dict().items(), old.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(after_new, after_old)
    # and what both did is a restart: min(16, dead) codes, each now on an encoder output of the batch
    restarted = was_dead & (new.unused_steps == 0)
    assert int(restarted.sum()) == int(new.codes_restarted) == min(16, int(was_dead.sum()))
    codes, outputs = new.codebook.detach()[restarted], new._recent
    assert bool((codes[:, None] == outputs[None]).all(-1).any(1).all())


# ----------------------------------------------------------------- a packed trial's sampling batch

class FakeRay(types.ModuleType):
    """Just what gpu_share reads of Ray: a worker with `assigned` resources (or a driver, assigned None)."""

    def __init__(self, assigned: dict[str, float] | None, initialized: bool = True):
        super().__init__("ray")
        self.assigned, self.initialized = assigned, initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def get_runtime_context(self):
        def assigned() -> dict[str, float]:
            if self.assigned is None:
                raise AssertionError("This method is only available when the process is a worker")
            return self.assigned

        return types.SimpleNamespace(get_assigned_resources=assigned)


@pytest.mark.parametrize("ray, share", [
    (FakeRay({"GPU": 0.125, "CPU": 1.0}), 0.125),  # eight trials packed on a GPU
    (FakeRay({"GPU": 0.3333, "CPU": 2.0}), 0.3333),
    (FakeRay({"GPU": 1.0}), 1.0),
    (FakeRay({"GPU": 2.0}), 1.0),  # whole GPUs: sampling runs on one, all of it
    (FakeRay({"CPU": 1.0}), 1.0),  # a CPU trial
    (FakeRay(None), 1.0),  # the driver
    (FakeRay({"GPU": 0.125}, initialized=False), 1.0),
    (None, 1.0),  # no Ray in this process
])
def test_gpu_share_is_the_fraction_ray_gave_the_trial(monkeypatch, ray, share):
    if ray is None:
        monkeypatch.delitem(sys.modules, "ray", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "ray", ray)
    assert ncsn.gpu_share() == share


MiB = 1 << 20


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda's memory functions faked for a CPU model: chains_that_fit's probe of 32 chains peaks at 16 MiB
    (twice that per chain is 1 MiB), 16 GiB of 141 free. Returns the mem_get_info calls so far (a 1-element list)."""
    probes = [0]
    state = {"allocated": 0}

    def memory_allocated(device=None) -> int:
        allocated = state["allocated"]
        state["allocated"] = 16 * MiB  # every read after the first is the probe's peak: 32 chains, 16 MiB
        return allocated

    def mem_get_info(device=None) -> tuple[int, int]:
        probes[0] += 1
        state["allocated"] = 0
        return 16 << 30, 141 << 30

    monkeypatch.setattr(torch.cuda, "memory_allocated", memory_allocated)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return probes


def test_trials_packed_on_a_gpu_plan_their_share_of_its_free_memory(monkeypatch, fake_gpu):
    model = build_model("ncsn", NCSN_TINY, channels=3).eval()
    per_chain = 2 * 16 * MiB / 32  # chains_that_fit's margin: twice the peak per chain
    free = 16 << 30
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    alone = model.chains_that_fit()
    assert alone == 4096 and alone * per_chain <= ncsn.SAMPLING_MEMORY_SHARE * free
    monkeypatch.setitem(sys.modules, "ray", FakeRay({"GPU": 0.125, "CPU": 1.0}))
    packed = model.chains_that_fit()
    # eight trials that reach a milestone together, each probing the same free memory, plan a quarter of it
    # between them (before: a quarter each, twice the free memory in all)
    assert packed == 512 and 8 * packed * per_chain <= ncsn.SAMPLING_MEMORY_SHARE * free
    monkeypatch.setitem(sys.modules, "ray", FakeRay({"GPU": 1 / 64}))
    assert model.chains_that_fit() == 128  # never below 128 chains


def test_an_fid_run_probes_the_gpu_once_and_samples_in_the_batches_it_planned(monkeypatch, fake_gpu, tmp_path):
    monkeypatch.setattr(ncsn, "_plans_by_memory", lambda device: True)  # the GPU path of sampling_batch, on a CPU
    monkeypatch.setitem(sys.modules, "ray", FakeRay({"GPU": 1 / 32}))  # 4096 / 32 chains: 128
    model = build_model("ncsn", NCSN_TINY, channels=3).eval()
    batches: list[int] = []
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda n, **kw: batches.append(n) or sample(n, **kw))
    chunks: list[int] = []
    langevin = ncsn.annealed_langevin
    monkeypatch.setattr(ncsn, "annealed_langevin", lambda *a, **kw: chunks.append(a[2][0]) or langevin(*a, **kw))
    scorer = FIDScorer("standin", device="cpu", cache_dir=tmp_path, batch_size=64)
    ref = scorer.reference(synthetic_images(64, seed=1), "synthetic-test")
    result = scorer.sample_fid(model, 200, ref, seed=0)
    assert result["n"] == 200
    assert fake_gpu[0] == 1  # sample_fid's plan; each sample() call follows it (before: one probe per call too)
    assert batches == [128, 72] and chunks == [128, 72]
    model.sample(300)  # a bare call follows the last plan as well
    assert fake_gpu[0] == 1 and chunks[2:] == [128, 128, 44]


# --------------------------------------------------------------------- VQ-VAE stage 2 lets stage 1 go

class EagerGraphedStep:
    """Stands in for genmodels.cuda_graph.GraphedStep on a CPU: runs the step eagerly, records each instance."""

    made: list[weakref.ref] = []

    def __init__(self, step, warmup: int = 3, name: str = "step", **_):
        self.step, self.captured = step, True
        EagerGraphedStep.made.append(weakref.ref(self))

    def __call__(self, x):
        return self.step(x)


def test_stage_two_drops_stage_ones_last_batch_and_graphed_step(monkeypatch):
    monkeypatch.setattr(engine, "GraphedStep", EagerGraphedStep)
    monkeypatch.setattr(EagerGraphedStep, "made", [])
    cfg = {**VQ_TINY, "stage1_epochs": 1, "epochs": 2, "steps_per_epoch": 6, "batch_size": 16}
    trainer = make_trainer("vqvae", cfg, synthetic_images(64, 0), synthetic_images(16, 1), device="cpu")
    trainer.cuda_graphs = True  # the graphed path's bookkeeping (a new step per graph key), run eagerly
    quantizer = trainer.model.quantizer

    trainer.train_epoch()  # stage 1
    assert trainer.model.stage == 1 and len(EagerGraphedStep.made) == 1
    assert quantizer._recent is not None  # the batch the restarts draw from: inside a real graph, its pool's memory
    recent = weakref.ref(quantizer._recent)

    trainer.train_epoch()  # stage 2: a new graph key, so a new graphed step
    assert trainer.model.stage == 2 and len(EagerGraphedStep.made) == 2
    assert quantizer._recent is None  # let go when stage 2 began, and not refilled (eval mode, no restarts)
    assert recent() is None  # nothing else holds the stage-1 batch: its memory (a graph's, its pool) is free
    assert EagerGraphedStep.made[0]() is None  # the stage-1 step (a graph and its pool) is gone too
    assert EagerGraphedStep.made[1]() is not None


def test_resuming_in_stage_two_starts_without_a_stage_one_batch():
    model = build_model("vqvae", {**VQ_TINY, "stage1_epochs": 1}, channels=3).train()
    model.quantizer(torch.randn(2, 8, 8, 8))
    assert model.quantizer._recent is not None
    model.start_epoch(1)
    assert model.quantizer._recent is None
    model.quantizer.restart_dead_codes()  # nothing to draw from: a no-op
    assert int(model.quantizer.codes_restarted) == 0


@cuda
def test_stage_two_frees_stage_ones_graph_on_cuda():
    cfg = {**VQ_TINY, "stage1_epochs": 1, "epochs": 2, "steps_per_epoch": 6, "batch_size": 16, "cuda_graphs": True}
    trainer = make_trainer("vqvae", cfg, synthetic_images(64, 0), synthetic_images(16, 1), device="cuda")
    trainer.train_epoch()
    if not trainer.graph_captured:
        pytest.skip(f"stage 1 did not capture: {trainer.graph_status}")
    stage1, recent = weakref.ref(trainer._graphed), weakref.ref(trainer.model.quantizer._recent)
    trainer.train_epoch()
    assert trainer.model.quantizer._recent is None and recent() is None
    assert stage1() is None  # the stage-1 graph, and with it its pool
