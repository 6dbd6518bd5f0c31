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
from genmodels.metrics.fid import FIDScorer
from genmodels.registry import trial_config
from sweeps.plan import Rungs, TrialCost

TIMED_STEPS = 3  # training steps per timing, after one that warms up
SLOW_STEP_S = 2.0  # a step slower than this is timed once
PROBE_IMAGES = 256  # test images evaluated, reconstructed and scored in the timings
PROBE_SAMPLES = 64  # samples drawn per sampling timing


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


def first_step_s(point: dict[str, Any], data: dict[str, torch.Tensor], device: torch.device) -> float:
    """Building a trial and its first step, the first time in this process: with the one-time costs that each
    trial process's first trial pays beyond prepare_process's (the model's first kernels)."""
    cfg = prepare(trial_config(point), data["train"])
    start = time.perf_counter()
    exp = Experiment(cfg, data["train"], data["test"][:2], device)
    return timed(lambda: exp.train_epoch(1), device) + time.perf_counter() - start


def measure(point: dict[str, Any], spec, data: dict[str, torch.Tensor], device: torch.device) -> TrialCost:
    """The TrialCost of one point of the sweep's space (flat config), measured here."""
    train, test = data["train"], data["test"]
    cfg = prepare(trial_config(point), train)
    n_eval = min(cfg.train.eval_images or len(test), len(test))
    per_epoch_images = cfg.train.eval_subset if 0 < cfg.train.eval_subset < n_eval else n_eval
    m = min(n_eval, PROBE_IMAGES)
    steps_per_epoch = cfg.train.steps_per_epoch or max(1, len(train) // cfg.train.batch_size)

    startup = time.perf_counter()
    exp = Experiment(cfg, train, test[:m], device)
    startup_s = timed(lambda: exp.train_epoch(1), device) + time.perf_counter() - startup
    step_s = timed(lambda: exp.train_epoch(1), device)
    if step_s < SLOW_STEP_S:  # a step of seconds (a full-size network on a CPU) is timed once: the dry run stays short
        step_s = statistics.median(timed(lambda: exp.train_epoch(TIMED_STEPS), device) / TIMED_STEPS
                                   for _ in range(2))
    cheap_s = timed(lambda: exp.evaluate(full=False, subset=False), device) / m
    ranking_full = exp.ranks_on_full_evaluation(spec.objectives)
    ranking_s = timed(lambda: exp.evaluate(full=True), device) / m if ranking_full else cheap_s
    epoch_s = step_s * steps_per_epoch + cheap_s * per_epoch_images
    rungs = Rungs.of(spec)
    model = exp.eval_model
    steps_per_level = int(getattr(cfg.model, "langevin_steps", 0) or 0)

    def sampling(budget: float) -> tuple[float, float]:
        """The budget to time at, and the factor that scales the timing to `budget`."""
        if not steps_per_level:
            return budget, 1.0
        return 1 / steps_per_level, max(1, round(steps_per_level * budget))

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_s = timed(lambda: exp.save(Path(tmp) / "state.pt"), device)
        grid_budget = spec.fid.step_fractions[0]
        at, factor = sampling(grid_budget)
        grids_s = timed(lambda: exp.write_grids(Path(tmp) / "g", budget=at), device) * factor
        at, factor = sampling(1.0)
        final_grids_s = timed(lambda: exp.write_grids(Path(tmp) / "f", budget=at), device) * factor
        metrics_s = timed(lambda: exp.finish(None), device)  # the final metrics: by test images
        final_eval_s = metrics_s * n_eval / m + max(0.0, timed(lambda: exp.finish(Path(tmp) / "e"), device) - metrics_s)

    fid = _FIDCosts(spec, exp, device, m, sampling)
    ranked_by = next((o for o in spec.objectives if o in ("fid", "rfid")), None)
    milestone = []
    for rung, _ in enumerate(rungs.cuts):
        seconds = ranking_s * n_eval + grids_s + checkpoint_s
        if ranked_by == "fid" and model.can_sample:
            ladder = spec.fid.ladder
            seconds += fid.sample_fid(ladder[min(rung, len(ladder) - 1)],
                                      spec.fid.step_fractions[min(rung, len(spec.fid.step_fractions) - 1)])
        if ranked_by == "rfid" and model.can_reconstruct:
            seconds += fid.reconstruction_fid(len(test))
        milestone.append(seconds)
    end = ranking_s * n_eval + final_eval_s + final_grids_s + checkpoint_s
    if model.can_sample:
        end += fid.sample_fid(spec.fid.final, 1.0, kid=True)
    if model.can_reconstruct and (spec.fid.rfid or ranked_by == "rfid"):
        end += fid.reconstruction_fid(len(test))
    return TrialCost(startup_s, epoch_s, tuple(milestone), end)


class _FIDCosts:
    """FID's cost at a sample count: drawing the samples and their features (per sample, timed on a few), and
    scoring them (timed once per count, on features of the network's width)."""

    def __init__(self, spec, exp: Experiment, device: torch.device, m: int, sampling):
        self.scorer = FIDScorer(spec.fid.network, spec.fid.weights_path, device=device)
        self.exp, self.device, self.m, self.sampling = exp, device, m, sampling
        images = exp.test_images(m)
        features = torch.cat(list(self.scorer.features(images)))
        self.width = features.shape[1]
        self.ref = self.scorer.reference_from_features([features], total=m)
        self.scores: dict[tuple[int, bool], float] = {}

    def score(self, n: int, kid: bool) -> float:
        if (n, kid) not in self.scores:
            self.scorer.kid_subsets = 100 if kid else 0
            features = torch.randn(n, self.width, device=self.device)
            self.scores[n, kid] = timed(lambda: self.scorer.score_features([features], self.ref), self.device)
        return self.scores[n, kid]

    def sample_fid(self, n: int, budget: float, kid: bool = False) -> float:
        model, at, factor = self.exp.eval_model, *self.sampling(budget)
        k = min(n, PROBE_SAMPLES)

        @torch.no_grad()
        def draw() -> None:
            for _ in self.scorer.features(model.sample(k, budget=at)):
                pass

        return timed(draw, self.device) * factor * n / k + self.score(n, kid)

    def reconstruction_fid(self, n: int) -> float:
        model, images = self.exp.eval_model, self.exp.test_images(self.m)

        @torch.no_grad()
        def reconstruct() -> None:
            for _ in self.scorer.features(model.reconstruct(images.to(model.device))):
                pass

        return timed(reconstruct, self.device) * n / self.m + self.score(n, False)
