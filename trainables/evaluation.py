"""FID inside a sweep: a fidelity ladder on ASHA's milestones, and the final FID of every completed trial.

FID is biased by the sample count, so every value is named with its count (fid_1k, fid_10k) and only equal-count
values are compared. ASHA compares trials at a rung (milestone) only, so a cheap low-count FID is enough to cut the
worst trials at the first rung and the budget grows with the rung: rung i uses `ladder[i]` samples and, for
samplers with a step count, `step_fractions[i]` of the trial's steps. The ranking metric `fid` (or `rfid`) is
reported only at milestones and at the end, so every value ASHA reads was computed under the same rung budget.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from genmodels.experiment import Experiment
from genmodels.metrics.fid import FIDScorer, RefStats, fid_metric_name


@dataclasses.dataclass(frozen=True)
class FIDPlan:
    """A sweep's FID settings (sweeps.spec.FIDSettings) as its trials use them, with what the driver computed
    once for all of them: the reference statistics and ASHA's milestones (the sweep spec's, ASHA's own rungs)."""
    network: str  # "inception" | "standin"
    weights_path: str | None
    ref: RefStats  # reference statistics of the test split, computed once by the driver
    milestones: tuple[int, ...]  # epochs at which ASHA reads the ranking metric
    ladder: tuple[int, ...]  # samples per rung
    step_fractions: tuple[float, ...]  # sampler steps per rung, as fractions of the trial's own
    final_n: int  # samples for the final FID of a completed trial
    rank_by: str | None = None  # "fid" or "rfid" when the sweep ranks by FID; None: final FID only
    rfid: bool = True  # reconstruction FID at the end of a trial (models that reconstruct)

    def rung(self, epoch: int) -> int | None:
        return self.milestones.index(epoch) if epoch in self.milestones else None


_scorers: dict[tuple, FIDScorer] = {}


def process_scorer(network: str, weights_path: str | None, device) -> FIDScorer:
    """This process's scorer for a feature network: one per trial process, loaded at its first trial's start
    (trainables.trainable.prepare_process)."""
    key = (network, weights_path, str(device))
    if key not in _scorers:
        _scorers[key] = FIDScorer(network, weights_path, device=device)
    return _scorers[key]


def sampling_budget(plan: FIDPlan, rung: int) -> float:
    """The share of a model's full sampling cost spent at `rung` (models without a step count ignore it)."""
    return plan.step_fractions[min(rung, len(plan.step_fractions) - 1)]


def fid_metrics(plan: FIDPlan, exp: Experiment, final: bool) -> dict[str, Any]:
    """FID metrics due at this epoch: the rung's ladder FID at milestones, the full-budget FID at the end."""
    rung = plan.rung(exp.epoch)
    if not final and (rung is None or plan.rank_by is None):  # ranked by something else: FID once, at the end
        return {}
    scorer = process_scorer(plan.network, plan.weights_path, exp.device)
    model = exp.eval_model
    out: dict[str, Any] = {"fid_network": scorer.name}
    seed = exp.cfg.train.seed + 1  # the same noise for every trial and rung: differences come from the models
    if model.can_sample:
        if final:
            n, budget = plan.final_n, 1.0
        else:
            n, budget = plan.ladder[min(rung, len(plan.ladder) - 1)], sampling_budget(plan, rung)
        scorer.kid_subsets = 100 if final else 0  # KID costs minutes on a CPU: once, at the end
        r = scorer.sample_fid(model, n, plan.ref, seed=seed, budget=budget)
        out[fid_metric_name(r["n"])] = r["fid"]
        if "kid" in r:
            out[fid_metric_name(r["n"], "kid")] = r["kid"]
        if plan.rank_by == "fid" or final:
            out["fid"], out["fid_n"] = r["fid"], r["n"]
    if model.can_reconstruct and ((final and plan.rfid) or plan.rank_by == "rfid"):
        scorer.kid_subsets = 0
        test = exp.test_images(plan.ref.num)
        r = scorer.reconstruction_fid(model, test, plan.ref)
        out[fid_metric_name(r["n"], "rfid")] = out["rfid"] = r["fid"]
        out["rfid_n"] = r["n"]
    return out
