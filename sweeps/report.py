"""Plots of a finished sweep, written as PNG into the sweep folder and logged to W&B.

    python sweeps/report.py --name NAME

- the ranking metric against epochs for every trial (a marker where each ended: ASHA stops are visible);
- the trade-offs across trials: rate (KL, nats) against distortion (reconstruction MSE), coloured by beta where
  searched (the seeds' blurry-versus-sharp beta experiment, over a whole sweep), and FID against bits/dim;
- the last sample grids of the five best trials side by side.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

from sweeps.storage import is_uri, join

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def trial_histories(storage: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep's info and, per trial, its config, status and per-epoch results."""
    from ray.tune import ExperimentAnalysis

    from sweeps.leaderboard import _status
    from sweeps.storage import read_sweep_info

    info = read_sweep_info(storage, name)
    analysis = ExperimentAnalysis(join(storage, name))
    frames = analysis.trial_dataframes
    max_epochs = int(info["max_epochs"])
    trials = []
    for trial in analysis.trials:
        df = frames.get(trial.trial_id)
        history = df.to_dict("records") if df is not None else []
        last = trial.last_result or {}
        trials.append({"name": str(trial), "dir": Path(trial.path) if "://" not in trial.path else None,
                       "config": trial.config, "history": history, "last": last,
                       "status": _status(last, max_epochs, trial.status)})
    return info, trials


def plot_curves(info: dict[str, Any], trials: list[dict[str, Any]], path: Path) -> Path:
    metric = info["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        pts = [(r["epoch"], r[metric]) for r in t["history"] if _num(r.get(metric)) and _num(r.get("epoch"))]
        if not pts:
            continue
        xs, ys = zip(*pts)
        line, = ax.plot(xs, ys, lw=1, alpha=0.8)
        ax.plot(xs[-1], ys[-1], "x" if "ASHA" in t["status"] else "o", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{info['metric']} per trial (x: stopped by ASHA, o: ran to the end)")
    if info["mode"] == "min" and all(_num(r.get(metric)) and r[metric] > 0 for t in trials for r in t["history"]
                                     if metric in r):
        ax.set_yscale("log")
    return _save(fig, path)


def plot_tradeoffs(trials: list[dict[str, Any]], path: Path) -> Path | None:
    """Rate-distortion and FID-vs-bpd scatters from each trial's last result, where the metrics exist."""
    panels = [("test_kl", "test_mse", "rate: KL (nats)", "distortion: reconstruction MSE")]
    fid_key = next((k for t in trials for k in t["last"] if k.startswith("fid_") and k[4:-1].isdigit()), None)
    bpd_key = "test_iwae_bpd" if any("test_iwae_bpd" in t["last"] for t in trials) else "test_bpd"
    if fid_key:
        panels.append((bpd_key, fid_key, f"{bpd_key} (bits/dim)", fid_key))
    panels = [p for p in panels if any(_num(t["last"].get(p[0])) and _num(t["last"].get(p[1])) for t in trials)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (xk, yk, xl, yl) in zip(axes[0], panels):
        pts = [(t["last"][xk], t["last"][yk], t["config"].get("model.beta")) for t in trials
               if _num(t["last"].get(xk)) and _num(t["last"].get(yk))]
        xs, ys, betas = zip(*pts)
        if all(_num(b) and b > 0 for b in betas):
            sc = ax.scatter(xs, ys, c=[math.log10(b) for b in betas], cmap="viridis")
            fig.colorbar(sc, ax=ax, label="log10 beta")
        else:
            ax.scatter(xs, ys)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.suptitle("trade-offs across trials (last result of each)")
    return _save(fig, path)


def plot_best_samples(info: dict[str, Any], trials: list[dict[str, Any]], path: Path, k: int = 5) -> Path | None:
    metric, sign = info["metric"], 1 if info["mode"] == "min" else -1
    ranked = sorted((t for t in trials if _num(t["last"].get(metric)) and t["dir"]),
                    key=lambda t: sign * t["last"][metric])[:k]
    grids = [(t, sorted(t["dir"].glob("images/epoch_*/samples.png"))) for t in ranked]
    grids = [(t, g[-1]) for t, g in grids if g]
    if not grids:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (t, png) in zip(axes[0], grids):
        ax.imshow(plt.imread(png))
        ax.set_title(f"{t['name'].split('_')[1]}\n{metric}={t['last'][metric]:.4g}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"samples of the {len(grids)} best trials", y=1.0)
    return _save(fig, path)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(storage: str, name: str) -> list[Path]:
    """The plots, in the sweep's folder (or ./report-NAME when the sweep lives in cloud storage)."""
    info, trials = trial_histories(storage, name)
    out = Path(f"report-{name}") if is_uri(storage) else Path(storage) / name / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_curves(info, trials, out / "metric_per_epoch.png"),
             plot_tradeoffs(trials, out / "tradeoffs.png"),
             plot_best_samples(info, trials, out / "best_samples.png")]
    return [p for p in paths if p]


def log_to_wandb(paths: list[Path], name: str, project: str, entity: str | None, storage: str) -> None:
    import wandb

    run = wandb.init(project=project, entity=entity, group=name, name=f"{name}-report", job_type="report",
                     dir=str(paths[0].parent), settings=wandb.Settings(silent=True))
    run.log({p.stem: wandb.Image(str(p)) for p in paths})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    from sweeps.leaderboard import resolve_sweep, sweep_arguments
    from trainables.wandb_logging import is_logged_in

    p = sweep_arguments("report.py", __doc__)
    p.add_argument("--no-wandb", action="store_true", help="only write the PNGs")
    args = p.parse_args(argv)
    try:
        storage, name = resolve_sweep(args)
        paths = write_report(storage, name)
    except FileNotFoundError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if not args.no_wandb:
        os.environ.setdefault("WANDB_MODE", "online" if is_logged_in() else "offline")
        log_to_wandb(paths, name, args.wandb_project, args.wandb_entity, storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
