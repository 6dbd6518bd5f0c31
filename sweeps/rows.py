"""A sweep's rows: what the leaderboard, the Optuna study on disk (sweeps/study.py), the report and --warm-start
read of each stored trial (sweeps/sweep_results.sweep_trials). One module, so that the study and the leaderboard
agree trial for trial, and neither imports the other."""
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
            "epochs": last.get("epoch", 0), "status": t["status"],
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
