"""A sweep's rows: what the leaderboard, the Optuna study on disk (sweeps/study.py), the report and --warm-start
read of each stored trial (sweeps/sweep_results.sweep_trials), how rows rank, and how a value is shown in a table.
One module, so that the study and the leaderboard agree trial for trial, and what runs a sweep (the progress
table, --warm-start) ranks and prints as the leaderboard does without importing it."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sweeps.sweep_results import is_number

if TYPE_CHECKING:
    from sweeps.spec import SweepSpec


def ranking_fields(results: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The ranking value of a trial from its results (oldest first): `value` from the last result that has the
    metric, `n` the FID sample count it was computed with (`fid_n`; None for non-FID metrics) and `best` the best
    value at that same count (`best_fid_1k`), since FIDs at different counts are not comparable. A diverged trial
    has no value: its model is gone, whatever it scored before."""
    if not results or results[-1].get("diverged") == 1:  # == 1: NaN where a frame lacks the key
        return {"value": None, "n": None, "best": None}
    scored = next((r for r in reversed(results) if is_number(r.get(metric))), {})
    n = int(scored[f"{metric}_n"]) if is_number(scored.get(f"{metric}_n")) else None
    if n is None:
        return {"value": scored.get(metric), "n": None, "best": scored.get(f"best_{metric}")}
    from genmodels.metrics.fid import fid_metric_name

    return {"value": scored[metric], "n": n, "best": scored.get(f"best_{fid_metric_name(n, metric)}")}


def trial_row(t: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """The leaderboard's row of a stored trial (sweep_results.sweep_trials); the Optuna study on disk is built from
    the same rows, so the two agree trial for trial."""
    last = t["last"]
    history = [*t["history"], last]  # every result: the last one may lack an FID computed only at rungs
    params = {k: t["config"].get(k) for k in spec.searched}
    return {"trial": t["trial"], "params": params, "warm_start": is_rerun_point(params, spec.warm_start),
            **ranking_fields(history, spec.metric),
            "objectives": {m: ranking_fields(history, m) for m in spec.objectives},
            "epochs": last.get("epoch", 0), "status": t["status"], "seconds": last.get("time_total_s"),
            "error": last.get("error"), "extra": extra_columns(last)}


def is_rerun_point(params: dict[str, Any], warm_start: Mapping[str, Any]) -> bool:
    """Whether a trial's searched values are one of the points its sweep reran first from --warm-start."""
    def same(a: Any, b: Any) -> bool:
        return math.isclose(a, b, rel_tol=1e-9) if is_number(a) and is_number(b) else a == b

    return any(params.keys() == p.keys() and all(same(params[k], p[k]) for k in p)
               for p in warm_start.get("rerun", ()))


EXTRA_KEYS = ("test_bpd", "test_iwae_bpd", "test_psnr", "test_perplexity", "test_dead_codes")


def extra_columns(result: dict[str, Any]) -> dict[str, Any]:
    """Metrics worth a glance beside the ranking metric, when a model reports them (FIDs named by sample count)."""
    fids = [k for k in result if k.startswith(("fid_", "rfid_")) and k not in ("fid_network", "fid_n", "rfid_n")]
    extra = {k: result[k] for k in [*EXTRA_KEYS, *sorted(fids), "fid_network"] if k in result}
    if isinstance(result.get("graph_status"), str):  # on CUDA: graphed, eager or off (the reason is in W&B)
        extra["graphs"] = result["graph_status"].split(":")[0]
    return extra


def short(v: Any) -> str:
    """A table cell: floats to 3 significant digits; `-` for a missing value (None, or NaN from a frame)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def rank_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Rows best first: trials with a value before those without; FIDs by sample count first (the deepest rung a
    trial reached: a 128-sample FID is biased upward against a 256-sample one, and marks an earlier stop), then
    by value. Non-FID rows have no count and rank by value alone."""
    def key(r: dict[str, Any]) -> tuple:
        v = r["value"]
        if not is_number(v):
            return (True, 0, 0.0)
        return (False, -(r.get("n") or 0), v if mode == "min" else -v)

    return sorted(rows, key=key)


def pareto_front(rows: list[dict[str, Any]], objectives: list[str], mode: str) -> tuple[list[dict[str, Any]], str]:
    """The trials no other trial beats on every objective, and what they were compared at. FIDs are compared only
    at one sample count: the front is drawn among the trials whose FIDs have the largest count (the deepest rung,
    or the end of the trial)."""
    sign = 1 if mode == "min" else -1
    scored = [r for r in rows if all(is_number(r["objectives"].get(m, {}).get("value")) for m in objectives)]
    counts = {m: max((r["objectives"][m]["n"] or 0 for r in scored), default=0) for m in objectives}
    scored = [r for r in scored if all((r["objectives"][m]["n"] or 0) == counts[m] for m in objectives)]
    points = [tuple(sign * r["objectives"][m]["value"] for m in objectives) for r in scored]
    front = sorted(nondominated(points))
    where = ", ".join(f"{m} at n={counts[m]}" for m in objectives if counts[m])
    return [scored[i] for _, i in front], where


def nondominated(points: list[tuple[float, ...]]) -> list[tuple[tuple[float, ...], int]]:
    """(point, index) of the points no other point beats on every coordinate (all minimised): a Pareto front."""
    return [(p, i) for i, p in enumerate(points)
            if not any(all(a <= b for a, b in zip(o, p)) and o != p for o in points)]
