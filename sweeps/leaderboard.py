"""Ranked table of a sweep's trials, from W&B (online) or from the sweep's Ray Tune results on disk.

    gensweep leaderboard --name NAME [--source local|wandb] [--importance]   (or python sweeps/leaderboard.py)

--importance adds which hyperparameters mattered (sweeps/importance.py: Optuna's PED-ANOVA over the trials compared
at one milestone), from the trials' results on disk whatever the source.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from sweeps.cli import exit_with, script
from sweeps.plan import duration
from sweeps.rows import (
    EXTRA_KEYS,
    extra_columns,
    is_rerun_point,
    pareto_front,
    rank_rows,
    ranking_fields,
    short,
    trial_row,
)
from sweeps.spaces import SMOKE_NOTE
from sweeps.spec import SweepSpec, UsageError
from sweeps.sweep_results import UNFINISHED, resolve_sweep, sweep_trials, trial_status
from trainables.wandb_auth import is_logged_in


def local_rows(storage: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial from the sweep's folder (configs, ranking values, statuses)."""
    return [trial_row(t, spec) for t in sweep_trials(storage, spec)]


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
                     "extra": extra_columns(summary)})
    return rows


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
    # the best value a trial reported, where it is not the one it ranks by (a metric that only improves: never)
    with_best = any(short(r["best"]) not in ("-", short(r["value"])) for r in rows)
    ranking = [f"{metric} ({mode})", *(["n"] if with_n else []),
               *([f"best_{metric}" + ("@n" if with_n else "")] if with_best else [])]
    header = ["rank", "trial", *[k.split(".")[-1] for k in params], *ranking, *extras, "epochs", "status"]
    table = [header]
    for i, r in enumerate(rows, 1):
        values = [short(r["value"]), *([short(r.get("n") or "-")] if with_n else []),
                  *([short(r["best"])] if with_best else [])]
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


def print_board(rows: list[dict[str, Any]], spec: SweepSpec, source: str, trials: list[dict] | None = None) -> None:
    """What the driver prints at a sweep's end and `gensweep leaderboard` prints any time: the Pareto front of a
    multi-objective sweep, the ranked table, what a smoke sweep's ranking is not, and with the stored `trials` the
    rows came from, what is left of an unfinished sweep."""
    if len(spec.objectives) > 1 and source == "local":
        print_front(rows, list(spec.objectives), spec.mode)
    print_table(rows, spec.metric, spec.mode, title=f"Leaderboard of {spec.name} ({source} results)",
                warm_start=spec.warm_start)
    if spec.preset == "smoke":
        print(f"note: {SMOKE_NOTE}")
    if trials is not None and (left := left_line(trials, spec)):
        print(left)


def left_line(trials: list[dict], spec) -> str | None:
    """For the leaderboard of an unfinished sweep (its stored trials, sweep_results.sweep_trials): how much of its
    plan is left (None when every trial ended), given the values ASHA holds so far (sweeps/progress.py's tally)."""
    from sweeps.progress import Tally  # Ray's Callback with it: the local results load Ray anyway

    n = spec.num_samples
    ended = [t for t in trials if t["status"] not in UNFINISHED]
    if len(ended) >= n:
        return None
    tally = Tally()
    tally.begin(spec, slots=1)
    for t in trials:
        for result in t["history"]:
            tally.record(t["trial"], result)
    tally.ended.update(t["trial"] for t in ended)
    left = tally.epochs_left()
    trained = sum(t["last"].get("epoch") or 0 for t in trials)
    seconds = sum(t["last"].get("time_total_s") or 0.0 for t in trials)
    line = (f"gensweep: unfinished: {len(ended)} of {n} trials ended, {len(trials) - len(ended)} under way or "
            f"interrupted, {n - len(trials)} not started; about {left:.3g} trial-epochs of the plan's "
            f"{trained + left:.3g} are left")
    if trained and seconds:
        line += (f", {duration(left * seconds / trained)} of device time at the {seconds / trained:.3g} s a "
                 f"trial-epoch took so far (divide by the trials running at once)")
    return line


def command(args) -> int:
    if args.source == "wandb" and not is_logged_in():
        raise UsageError("W&B is not logged in: run `wandb login` (or set WANDB_API_KEY), or pass --source local")
    storage, spec = resolve_sweep(args)
    source = args.source or ("wandb" if is_logged_in() else "local")
    rows = []
    if source == "wandb":
        try:
            rows = wandb_rows(spec, args.wandb_project, args.wandb_entity)
        except Exception as e:  # CommError, UsageError, requests' errors...: whichever, one line, not a traceback
            message = (str(e).strip().splitlines() or [""])[0]
            raise UsageError(f"W&B API failed ({type(e).__name__}: {message}); check the network and `wandb login`, "
                             "or pass --source local") from None
        if not rows:
            print(f"no W&B runs in group {spec.name!r}; showing local results", file=sys.stderr)
            source = "local"
    trials = sweep_trials(storage, spec) if source == "local" or args.importance else None
    if source == "local":
        rows = [trial_row(t, spec) for t in trials]
    print_board(rows, spec, source, trials if source == "local" else None)
    if args.importance:
        from sweeps import importance  # Optuna: only when asked

        print()
        print("\n".join(importance.describe(importance.compare(trials, spec))))
    return 0


def main(argv: list[str] | None = None) -> int:
    return script("leaderboard", argv, prog="leaderboard.py")


if __name__ == "__main__":
    exit_with(main())
