"""The dry run's measurement: one trial's phases timed on this machine, on the sweep's own network, data and FID
settings, by a short run of a few steps, then scaled to a whole trial (sweeps/plan.py's TrialCost).

Each phase is timed on a little and scaled by what it is proportional to: training by steps (a real epoch is the
preset's steps_per_epoch, or one pass over the training split), evaluation by test images, sampling by samples
(and, for a sampler with T steps per level, by the steps its budget asks for: timed at one step per level, so an
overestimate of the parts that do not scale), FID scoring at each sample count as it is. The trainable's schedule
(trainables/trainable.py) is followed: the cheap evaluation every epoch, the ranking evaluation, FID ladder, grids
and a checkpoint at ASHA's milestones, the final evaluation, final FID (with KID) and reconstruction FID at the end.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from genmodels.experiment import Experiment, prepare
from genmodels.registry import trial_config
from sweeps.plan import Rungs, TrialCost
from trainables.evaluation import process_scorer

TIMED_STEPS = 3  # training steps per timing, after one that warms up
SLOW_STEP_S = 2.0  # a step slower than this is timed once
SLOW_DRAW_S = 5.0  # a Langevin draw slower than this is costed from one score-network pass
PROBE_IMAGES = 256  # test images evaluated, reconstructed and scored in the timings
PROBE_SAMPLES = 64  # samples drawn per sampling timing
PROBE_BATCH = 8  # images per step, evaluation and draw where a trial's own batch is too slow to time (a CPU)
KID_PROBE_SUBSETS = 2  # KID's subsets timed; its cost grows with their number (a trial computes 100)
GRID_IMAGES = 64  # a sample grid's images (Engine.write_grids), and half as many reconstructed


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def process_start_s(spec, device: torch.device) -> float:
    """Seconds for a new trial process to import what a trial imports and pay its one-time costs, as its first
    trial does (trainables.trainable.prepare_process; once per slot: Tune reuses the process)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from trainables.trainable import prepare_process; "
                    "prepare_process(sys.argv[1], sys.argv[2], sys.argv[3] or None)",
                    str(device), spec.fid.network, spec.fid.weights_path or ""], check=True, capture_output=True)
    return time.perf_counter() - start


def measure(point: dict[str, Any], spec, data: dict[str, torch.Tensor], device: torch.device,
            notes: set[str] | None = None) -> TrialCost:
    """The TrialCost of one point of the sweep's space (flat config), measured here; what was scaled rather than
    timed is added to `notes`, a line each."""
    notes = set() if notes is None else notes
    train, test = data["train"], data["test"]
    cfg = prepare(trial_config(point), train)
    n_eval = min(cfg.train.eval_images or len(test), len(test))
    per_epoch_images = cfg.train.eval_subset if 0 < cfg.train.eval_subset < n_eval else n_eval
    batch = cfg.train.batch_size
    steps_per_epoch = cfg.train.steps_per_epoch or max(1, len(train) // batch)

    exp, m, k, startup_s, step_s = _on_a_cpu_at_a_few_images(point, cfg, data, device)
    if exp is not None:
        notes.add(f"a step takes {SLOW_STEP_S:g} s or more at the trial's batch of {batch} on this CPU: steps, "
                  f"evaluations and draws were timed at {PROBE_BATCH} images and scaled by the images (a CPU's "
                  f"cost grows with them)")
    else:
        m, k = min(n_eval, PROBE_IMAGES), PROBE_SAMPLES
        startup = time.perf_counter()
        exp = Experiment(cfg, train, test[:m], device)
        startup_s = timed(lambda: exp.train_epoch(1), device) + time.perf_counter() - startup
        step_s = timed(lambda: exp.train_epoch(1), device)
        if step_s < SLOW_STEP_S:  # a step of seconds (a full-size network on a GPU) is timed once: the dry run is short
            step_s = statistics.median(timed(lambda: exp.train_epoch(TIMED_STEPS), device) / TIMED_STEPS
                                       for _ in range(2))
    cheap_s = timed(lambda: exp.evaluate(full=False, subset=False), device) / m
    ranking_full = exp.ranks_on_full_evaluation(spec.objectives)
    ranking_s = timed(lambda: exp.evaluate(full=True), device) / m if ranking_full else cheap_s
    epoch_s = step_s * steps_per_epoch + cheap_s * per_epoch_images
    rungs = Rungs.of(spec)
    model = exp.eval_model
    fid = _FIDCosts(spec, exp, device, m, k, len(test), notes)

    def grids_s(budget: float) -> float:  # the samples drawn and the test images reconstructed (Engine.write_grids)
        return ((GRID_IMAGES * fid.per_sample(budget) if model.can_sample else 0.0)
                + (GRID_IMAGES // 2 * fid.per_reconstruction() if model.can_reconstruct else 0.0))

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_s = timed(lambda: exp.save(Path(tmp) / "state.pt"), device)
        metrics_s = timed(lambda: exp.finish(None), device)  # the final metrics: by test images
        final_eval_s = metrics_s * n_eval / m + max(0.0, timed(lambda: exp.finish(Path(tmp) / "e"), device) - metrics_s)
    ranked_by = next((o for o in spec.objectives if o in ("fid", "rfid")), None)
    milestone = []
    for rung, _ in enumerate(rungs.cuts):
        seconds = ranking_s * n_eval + grids_s(spec.fid.step_fractions[0]) + checkpoint_s
        if ranked_by == "fid" and model.can_sample:
            ladder = spec.fid.ladder
            seconds += fid.sample_fid(ladder[min(rung, len(ladder) - 1)],
                                      spec.fid.step_fractions[min(rung, len(spec.fid.step_fractions) - 1)])
        if ranked_by == "rfid" and model.can_reconstruct:
            seconds += fid.reconstruction_fid(len(test))
        milestone.append(seconds)
    end = ranking_s * n_eval + final_eval_s + grids_s(1.0) + checkpoint_s
    if model.can_sample:
        end += fid.sample_fid(spec.fid.final, 1.0, kid=True)
    if model.can_reconstruct and (spec.fid.rfid or ranked_by == "rfid"):
        end += fid.reconstruction_fid(len(test))
    return TrialCost(startup_s, epoch_s, tuple(milestone), end)


def _on_a_cpu_at_a_few_images(point: dict[str, Any], cfg, data: dict[str, torch.Tensor], device: torch.device):
    """On a CPU, a step at PROBE_BATCH images first. Where the trial's own batch would take SLOW_STEP_S or more (a
    full-size network: tens of seconds a step), everything is timed at PROBE_BATCH images and scaled, since a CPU's
    cost grows with the images it computes: (the Experiment, test images, samples, startup, step seconds). Else, or on
    a GPU (where small batches cost more than their share), (None, ...): the trial's own batch is timed."""
    batch = cfg.train.batch_size
    if device.type != "cpu" or batch <= PROBE_BATCH:
        return None, 0, 0, 0.0, 0.0
    train, test = data["train"], data["test"]
    start = time.perf_counter()
    exp = Experiment(prepare(trial_config({**point, "train.batch_size": PROBE_BATCH}), train), train,
                     test[:PROBE_BATCH], device)
    build_s = time.perf_counter() - start
    step_s = timed(lambda: exp.train_epoch(1), device) * batch / PROBE_BATCH
    if step_s < 10 * SLOW_STEP_S:  # the first step's first kernels show; a step of seconds is warm enough as it is
        step_s = timed(lambda: exp.train_epoch(1), device) * batch / PROBE_BATCH
    if step_s < SLOW_STEP_S:
        return None, 0, 0, 0.0, 0.0
    return exp, PROBE_BATCH, PROBE_BATCH, build_s + step_s, step_s


_scores: dict[tuple, float] = {}  # per-image feature and FID (KID) scoring seconds: the same for every point


def _once(store: dict, key, fn: Callable[[], float]) -> float:
    if key not in store:
        store[key] = fn()
    return store[key]


class _FIDCosts:
    """Sampling and FID at a sample count: drawing the samples (per sample, timed on k and cached per budget),
    their features (per image, timed once on k for every point), and scoring them (timed once per count, on random
    features of the network's width; KID on a few subsets and scaled)."""

    def __init__(self, spec, exp: Experiment, device: torch.device, m: int, k: int, test_images: int,
                 notes: set[str]):
        self.scorer = process_scorer(spec.fid.network, spec.fid.weights_path, device)  # the one a trial uses
        self.exp, self.model, self.device, self.m, self.k, self.notes = exp, exp.eval_model, device, m, k, notes
        self.features_s = _once(_scores, (self.scorer.name, str(device), "features"), lambda: timed(
            lambda: list(self.scorer.features(torch.rand(k, 3, 32, 32, device=device))), device) / k)
        # random reference features, as many as a sweep's reference keeps for KID (whose cost grows with them squared)
        self.width, kept = self.scorer.num_features, min(test_images, self.scorer.kid_max_features)
        self.ref = self.scorer.reference_from_features([torch.randn(kept, self.width, device=device)], total=kept)
        self.cache: dict[Any, float] = {}  # this point's sampling and reconstruction seconds

    def per_sample(self, budget: float) -> float:
        """Seconds to draw one sample at `budget`. A Langevin sampler makes model.score_passes(budget) passes of its
        score network per chain, each alike: the draw is timed at one step per level, or, where even that takes
        SLOW_DRAW_S or more (hundreds of levels of a full-size network on a CPU), one pass is."""
        model, k = self.model, self.k
        passes = getattr(model, "score_passes", None)
        if passes is None:
            return _once(self.cache, budget, lambda: timed(lambda: model.sample(k, budget=budget), self.device) / k)

        def per_pass() -> float:
            x = torch.rand(k, model.channels, 32, 32, device=self.device)
            levels = torch.zeros(k, dtype=torch.long, device=self.device)
            with torch.no_grad():
                one = timed(lambda: model.score(x, levels), self.device) / k
            cheapest = 1 / model.schedule.T  # one step per level
            if one * k * passes(cheapest) >= SLOW_DRAW_S:
                self.notes.add("a Langevin draw is costed as its score-network passes (levels x steps per level, "
                               "and the denoising step) times one timed pass")
                return one
            return timed(lambda: model.sample(k, budget=cheapest), self.device) / k / passes(cheapest)

        return _once(self.cache, "pass", per_pass) * passes(budget)

    def per_reconstruction(self) -> float:
        images = self.exp.test_images(self.m).to(self.model.device)
        return _once(self.cache, "reconstruct",
                     lambda: timed(lambda: self.model.reconstruct(images), self.device) / self.m)

    def score(self, n: int, kid: bool) -> float:
        """Seconds to score n samples' features: the same for every point of the space (kept for the next)."""
        def seconds(subsets: int) -> float:
            self.scorer.kid_subsets = subsets
            features = torch.randn(n, self.width, device=self.device)
            return timed(lambda: self.scorer.score_features([features], self.ref), self.device)

        key = (self.scorer.name, self.width, len(self.ref.kid_features), str(self.device), n)
        fid_s = _once(_scores, key, lambda: seconds(0))
        if not kid:
            return fid_s
        return fid_s + _once(_scores, key + ("kid",),
                             lambda: max(0.0, seconds(KID_PROBE_SUBSETS) - fid_s) * 100 / KID_PROBE_SUBSETS)

    def sample_fid(self, n: int, budget: float, kid: bool = False) -> float:
        return n * (self.per_sample(budget) + self.features_s) + self.score(n, kid)

    def reconstruction_fid(self, n: int) -> float:
        return n * (self.per_reconstruction() + self.features_s) + self.score(n, False)
