"""Ranked table of a sweep's trials, from W&B (online) or from the sweep's Ray Tune results on disk.

    python sweeps/leaderboard.py --name NAME [--source local|wandb] [--importance]

--importance adds which hyperparameters mattered (sweeps/importance.py: Optuna's PED-ANOVA over the trials compared
at one milestone), from the trials' results on disk whatever the source.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sweeps.spec import SWEEP_FILE, SweepSpec, UsageError
from sweeps.storage import default_storage, resolve
from sweeps.sweep_results import is_number, sweep_trials, trial_status
from trainables.wandb_auth import is_logged_in


def short(v: Any) -> str:
    """A table cell: floats to 3 significant digits; `-` for a missing value (None, or NaN from a frame)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


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


def local_rows(storage: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial from the sweep's folder (configs, ranking values, statuses)."""
    return [trial_row(t, spec) for t in sweep_trials(storage, spec)]


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
            "error": last.get("error"), "extra": _extra_columns(last)}


def is_rerun_point(params: dict[str, Any], warm_start: Mapping[str, Any]) -> bool:
    """Whether a trial's searched values are one of the points its sweep reran first from --warm-start."""
    def same(a: Any, b: Any) -> bool:
        return math.isclose(a, b, rel_tol=1e-9) if is_number(a) and is_number(b) else a == b

    return any(params.keys() == p.keys() and all(same(params[k], p[k]) for k in p)
               for p in warm_start.get("rerun", ()))


def warm_start_note(warm_start: Mapping[str, Any]) -> str:
    """The leaderboard's line on a --warm-start, "" without one."""
    if not warm_start:
        return ""
    if warm_start.get("told"):
        return (f"warm start: the {warm_start['told']} ended trials of sweep {warm_start['sweep']} were told to TPE "
                f"(same budgets; they are that sweep's rows, not these)")
    return (f"warm start: * marks the {len(warm_start.get('rerun', ()))} best point(s) of sweep "
            f"{warm_start['sweep']}, rerun first at this sweep's budgets")


def wandb_rows(spec: SweepSpec, project: str, entity: str | None) -> list[dict[str, Any]]:
    """The same rows from the W&B runs of the sweep (group = sweep name), through the W&B public API."""
    import wandb  # seconds to import: only for this source

    api = wandb.Api()
    path = f"{entity or api.default_entity}/{project}"
    rows = []
    for run in api.runs(path, filters={"group": spec.name}):
        summary = dict(run.summary)  # the last value of each key: fid, fid_n and best_fid_<n> are logged together
        state = {"finished": "TERMINATED", "running": "RUNNING", "crashed": "ERROR", "failed": "ERROR"}.get(
            run.state, "TERMINATED")
        params = {k: run.config.get(k) for k in spec.searched}
        rows.append({"trial": f"{run.config.get('model_name', '')}_{run.id}",  # the run id is the trial's
                     "params": params, "warm_start": is_rerun_point(params, spec.warm_start),
                     **ranking_fields([summary], spec.metric),
                     "epochs": summary.get("epoch", 0),
                     "status": trial_status(summary, spec.max_epochs, state, spec.milestones),
                     "extra": _extra_columns(summary)})
    return rows


EXTRA_KEYS = ("test_bpd", "test_iwae_bpd", "test_psnr", "test_perplexity", "test_dead_codes")


def _extra_columns(result: dict[str, Any]) -> dict[str, Any]:
    """Metrics worth a glance beside the ranking metric, when a model reports them (FIDs named by sample count)."""
    fids = [k for k in result if k.startswith(("fid_", "rfid_")) and k not in ("fid_network", "fid_n", "rfid_n")]
    extra = {k: result[k] for k in [*EXTRA_KEYS, *sorted(fids), "fid_network"] if k in result}
    if isinstance(result.get("graph_status"), str):  # on CUDA: graphed, eager or off (the reason is in W&B)
        extra["graphs"] = result["graph_status"].split(":")[0]
    return extra


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


def print_front(rows: list[dict[str, Any]], objectives: list[str], mode: str, file=None) -> None:
    """The Pareto front of a multi-objective sweep, printed before its ranked table."""
    front, where = pareto_front(rows, objectives, mode)
    print(f"Pareto front of {', '.join(objectives)} ({mode}){' compared ' + where if where else ''}: "
          f"{len(front)} trial(s) that no other trial beats on every objective", file=file)
    width = max([len(r["trial"]) for r in front] + [5])
    print("  ".join(["trial".ljust(width), *objectives, "params"]), file=file)
    for r in front:
        params = " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in r["params"].items())
        print("  ".join([r["trial"].ljust(width), *[short(r["objectives"][m]["value"]).ljust(len(m))
                                                     for m in objectives], params]), file=file)
    print(file=file)


def print_table(rows: list[dict[str, Any]], metric: str, mode: str, title: str = "", file=None,
                warm_start: Mapping[str, Any] | None = None) -> None:
    """The ranked table; for FID metrics with the sample count `n` of each value and the best at that count; with
    the sweep's `warm_start` record, its rerun points marked * and a line on what it did."""
    rows = rank_rows(rows, mode)
    with_n = any(r.get("n") for r in rows)
    params = sorted({k for r in rows for k in r["params"]})
    extras = sorted({k for r in rows for k in r["extra"] if k != metric and k != "fid_network"},
                    key=lambda k: (k not in EXTRA_KEYS, k))
    networks = sorted({str(r["extra"]["fid_network"]) for r in rows if "fid_network" in r["extra"]})
    if networks:
        title = f"{title}; FID network: {', '.join(networks)}" if title else f"FID network: {', '.join(networks)}"
    ranking = [f"{metric} ({mode})", "n", f"best_{metric}@n"] if with_n else [f"{metric} ({mode})", f"best_{metric}"]
    header = ["rank", "trial", *[k.split(".")[-1] for k in params], *ranking, *extras, "epochs", "status"]
    table = [header]
    for i, r in enumerate(rows, 1):
        values = [short(r["value"]), *([short(r.get("n") or "-")] if with_n else []), short(r["best"])]
        table.append([str(i), r["trial"] + (" *" if r.get("warm_start") else ""),
                      *[short(r["params"].get(k)) for k in params], *values,
                      *[short(r["extra"].get(k, "-")) for k in extras], str(r["epochs"]), r["status"]])
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    if title:
        print(title, file=file)
    for j, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)
    if warm_start:
        print(warm_start_note(warm_start), file=file)


def sweep_arguments(prog: str, doc: str) -> argparse.ArgumentParser:
    """The flags that name a finished sweep, shared by leaderboard.py and report.py."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="sweep name (default: the newest sweep under --storage-path)")
    p.add_argument("--storage-path", default=str(default_storage()),
                   help="results root used by run.py (local path or s3:// / gs:// URI)")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "gensweep"))
    p.add_argument("--wandb-entity", default=os.environ.get("WANDB_ENTITY"))
    return p


def resolve_sweep(args: argparse.Namespace) -> tuple[str, SweepSpec]:
    """(storage root, the sweep's spec); raises UsageError with a one-line message."""
    storage = resolve(args.storage_path)
    return storage, SweepSpec.load(storage, args.name or _newest_sweep(storage))


def main(argv: list[str] | None = None) -> int:
    p = sweep_arguments("leaderboard.py", __doc__)
    p.add_argument("--source", choices=["local", "wandb"], help="default: wandb when logged in, else local")
    p.add_argument("--importance", action="store_true",
                   help="also print Optuna's parameter importances for the ranking metric (from the local results)")
    args = p.parse_args(argv)
    if args.source == "wandb" and not is_logged_in():
        print("leaderboard.py: error: W&B is not logged in: run `wandb login` (or set WANDB_API_KEY), "
              "or pass --source local", file=sys.stderr)
        return 2
    try:
        storage, spec = resolve_sweep(args)
    except UsageError as e:
        print(f"leaderboard.py: error: {e}", file=sys.stderr)
        return 2
    source = args.source or ("wandb" if is_logged_in() else "local")
    rows = []
    if source == "wandb":
        try:
            rows = wandb_rows(spec, args.wandb_project, args.wandb_entity)
        except Exception as e:  # CommError, UsageError, requests' errors...: whichever, one line, not a traceback
            message = (str(e).strip().splitlines() or [""])[0]
            print(f"leaderboard.py: error: W&B API failed ({type(e).__name__}: {message}); "
                  "check the network and `wandb login`, or pass --source local", file=sys.stderr)
            return 2
        if not rows:
            print(f"no W&B runs in group {spec.name!r}; showing local results", file=sys.stderr)
            source = "local"
    trials = None
    if source == "local" or args.importance:
        try:
            trials = sweep_trials(storage, spec)
        except UsageError as e:
            print(f"leaderboard.py: error: {e}", file=sys.stderr)
            return 2
    if source == "local":
        rows = [trial_row(t, spec) for t in trials]
    if len(spec.objectives) > 1 and source == "local":
        print_front(rows, list(spec.objectives), spec.mode)
    print_table(rows, spec.metric, spec.mode, title=f"Leaderboard of {spec.name} ({source} results)",
                warm_start=spec.warm_start)
    if args.importance:
        from sweeps import importance  # Optuna: only when asked

        print()
        print("\n".join(importance.describe(importance.compare(trials, spec))))
    return 0


def _newest_sweep(storage: str) -> str:
    if "://" in storage:
        raise UsageError(f"pass --name with a cloud --storage-path ({storage})")
    sweeps = sorted(Path(storage).glob(f"*/{SWEEP_FILE}"), key=lambda p: p.stat().st_mtime)
    if not sweeps:
        raise UsageError(f"no sweeps under {storage}; run sweeps/run.py first or pass --storage-path")
    return sweeps[-1].parent.name


if __name__ == "__main__":
    code = main()
    if code == 2 and "wandb" in sys.modules:
        # A failed W&B API call can leave wandb's service process unresponsive, and wandb's exit handlers then
        # wait for it (seen in CI: minutes after the error line). The error is printed; nothing is left to clean up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
