"""Ranked table of a sweep's trials, from W&B (online) or from the sweep's Ray Tune results on disk.

    python sweeps/leaderboard.py --name NAME [--source local|wandb]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from sweeps.storage import SWEEP_FILE, default_storage, join, read_sweep_info, resolve


def short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _status(last: dict[str, Any], max_epochs: int, ray_status: str) -> str:
    if last.get("diverged"):
        return "diverged"
    if ray_status == "ERROR":
        return "error"
    if ray_status in ("RUNNING", "PENDING", "PAUSED"):
        return ray_status.lower()
    if last.get("epoch", 0) >= max_epochs:
        return "completed"
    return "stopped (ASHA)" if last else "no result"


def local_rows(storage: str, name: str) -> list[dict[str, Any]]:
    """One row per trial from the Ray Tune experiment folder (configs, last results, statuses)."""
    from ray.tune import ExperimentAnalysis

    info = read_sweep_info(storage, name)
    analysis = ExperimentAnalysis(join(storage, name))
    max_epochs = int(info["max_epochs"])
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        rows.append({"trial": f"{trial.config.get('model_name', '')}_{trial.trial_id}",
                     "params": {k: trial.config.get(k) for k in info["searched"]},
                     "value": last.get(info["metric"]), "best": last.get(f"best_{info['metric']}"),
                     "epochs": last.get("epoch", 0), "status": _status(last, max_epochs, trial.status),
                     "extra": _extra_columns(last)})
    return rows


def wandb_rows(name: str, project: str, entity: str | None, metric: str, searched: list[str],
               max_epochs: int) -> list[dict[str, Any]]:
    """The same rows from the W&B runs of the sweep (group = sweep name), through the W&B public API."""
    import wandb

    api = wandb.Api()
    path = f"{entity or api.default_entity}/{project}"
    rows = []
    for run in api.runs(path, filters={"group": name}):
        summary = dict(run.summary)
        state = {"finished": "TERMINATED", "running": "RUNNING", "crashed": "ERROR", "failed": "ERROR"}.get(
            run.state, "TERMINATED")
        rows.append({"trial": f"{run.config.get('model_name', '')}_{run.id}",
                     "params": {k: run.config.get(k) for k in searched},
                     "value": summary.get(metric), "best": summary.get(f"best_{metric}"),
                     "epochs": summary.get("epoch", 0), "status": _status(summary, max_epochs, state),
                     "extra": _extra_columns(summary)})
    return rows


EXTRA_KEYS = ("test_bpd", "test_iwae_bpd", "test_psnr", "test_perplexity", "test_dead_codes")


def _extra_columns(result: dict[str, Any]) -> dict[str, Any]:
    """Metrics worth a glance beside the ranking metric, when a model reports them (FIDs named by sample count)."""
    fids = [k for k in result if k.startswith(("fid_", "rfid_")) and k != "fid_network"]
    return {k: result[k] for k in [*EXTRA_KEYS, *sorted(fids), "fid_network"] if k in result}


def _sort_key(row: dict[str, Any], mode: str) -> tuple:
    v = row["value"]
    ok = isinstance(v, (int, float)) and math.isfinite(v)
    return (not ok, (v if mode == "min" else -v) if ok else 0.0)


def print_table(rows: list[dict[str, Any]], metric: str, mode: str, title: str = "", file=sys.stdout) -> None:
    rows = sorted(rows, key=lambda r: _sort_key(r, mode))
    params = sorted({k for r in rows for k in r["params"]})
    extras = sorted({k for r in rows for k in r["extra"] if k != metric and k != "fid_network"},
                    key=lambda k: (k not in EXTRA_KEYS, k))
    networks = sorted({str(r["extra"]["fid_network"]) for r in rows if "fid_network" in r["extra"]})
    if networks:
        title = f"{title}; FID network: {', '.join(networks)}" if title else f"FID network: {', '.join(networks)}"
    header = ["rank", "trial", *[k.split(".")[-1] for k in params], f"{metric} ({mode})", f"best_{metric}", *extras, "epochs", "status"]
    table = [header]
    for i, r in enumerate(rows, 1):
        table.append([str(i), r["trial"], *[short(r["params"].get(k)) for k in params], short(r["value"]),
                      short(r["best"]), *[short(r["extra"].get(k, "")) for k in extras], str(r["epochs"]),
                      r["status"]])
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    if title:
        print(title, file=file)
    for j, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def sweep_arguments(prog: str, doc: str) -> argparse.ArgumentParser:
    """The flags that name a finished sweep, shared by leaderboard.py and report.py."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="sweep name (default: the newest sweep under --storage-path)")
    p.add_argument("--storage-path", default=str(default_storage()),
                   help="results root used by run.py (local path or s3:// / gs:// URI)")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "gensweep"))
    p.add_argument("--wandb-entity", default=os.environ.get("WANDB_ENTITY"))
    return p


def resolve_sweep(args: argparse.Namespace) -> tuple[str, str]:
    """(storage root, sweep name); raises FileNotFoundError with a one-line message."""
    storage = resolve(args.storage_path)
    name = args.name or _newest_sweep(storage)
    read_sweep_info(storage, name)
    return storage, name


def main(argv: list[str] | None = None) -> int:
    from trainables.wandb_logging import is_logged_in

    p = sweep_arguments("leaderboard.py", __doc__)
    p.add_argument("--source", choices=["local", "wandb"], help="default: wandb when logged in, else local")
    args = p.parse_args(argv)
    try:
        storage, name = resolve_sweep(args)
    except FileNotFoundError as e:
        print(f"leaderboard.py: error: {e}", file=sys.stderr)
        return 2
    info = read_sweep_info(storage, name)
    source = args.source or ("wandb" if is_logged_in() else "local")
    rows = []
    if source == "wandb":
        rows = wandb_rows(name, args.wandb_project, args.wandb_entity, info["metric"], info["searched"],
                          int(info["max_epochs"]))
        if not rows:
            print(f"no W&B runs in group {name!r}; showing local results", file=sys.stderr)
            source = "local"
    if source == "local":
        rows = local_rows(storage, name)
    print_table(rows, info["metric"], info["mode"], title=f"Leaderboard of {name} ({source} results)")
    return 0


def _newest_sweep(storage: str) -> str:
    if "://" in storage:
        raise FileNotFoundError(f"pass --name with a cloud --storage-path ({storage})")
    sweeps = sorted(Path(storage).glob(f"*/{SWEEP_FILE}"), key=lambda p: p.stat().st_mtime)
    if not sweeps:
        raise FileNotFoundError(f"no sweeps under {storage}; run sweeps/run.py first or pass --storage-path")
    return sweeps[-1].parent.name


if __name__ == "__main__":
    sys.exit(main())
