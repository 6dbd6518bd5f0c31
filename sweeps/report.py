"""Plots of a finished sweep, written as PNG into the sweep folder and logged to W&B.

    python sweeps/report.py --name NAME

- the ranking metric against epochs for every trial, named in a legend (a marker where each ended: ASHA stops are
  visible); an FID gets one series per sample count, since FIDs at different counts are not comparable;
- the trade-offs across trials: rate (KL, nats) against distortion (reconstruction MSE), coloured by beta where
  searched (the seeds' blurry-versus-sharp beta experiment, over a whole sweep), and FID against bits/dim;
- the last sample and reconstruction grids of the five best trials (ranked as the leaderboard ranks them);
- which hyperparameters mattered (sweeps/importance.py: Optuna's PED-ANOVA over the trials compared at one
  milestone, printed too) and those trials' values on Optuna's parallel coordinates.
"""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

import matplotlib

from genmodels.metrics.fid import fid_metric_name
from sweeps import importance
from sweeps.cli import script
from sweeps.distributions import quiet_optuna
from sweeps.rows import nondominated, rank_rows, ranking_fields, short
from sweeps.spec import SweepSpec
from sweeps.storage import is_uri
from sweeps.sweep_results import is_number, resolve_sweep, sweep_trials
from trainables.wandb_auth import is_logged_in

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def trial_histories(storage: str, spec: SweepSpec) -> list[dict[str, Any]]:
    """Per trial: its id, legend label, config, status and per-epoch results (sweep_results.sweep_trials: from Tune's
    state, or from the trials' folders where that does not load)."""
    return [{**t, "name": t["trial"], "label": trial_label(t["id"], t["config"], spec.searched)}
            for t in sweep_trials(storage, spec)]


def trial_label(trial_id: str, config: dict[str, Any], searched: tuple[str, ...]) -> str:
    """Short name of a trial for legends: its id and searched values, e.g. `dbb3c202 beta=0.5 lr=0.001`."""
    return " ".join([trial_id, *(f"{k.split('.')[-1]}={short(config.get(k))}" for k in searched)])


def metric_series(history: list[dict[str, Any]], metric: str) -> dict[int | None, list[tuple[float, float]]]:
    """(epoch, value) points of the metric, one series per FID sample count (`fid_n`; None for other metrics)."""
    series: dict[int | None, list[tuple[float, float]]] = {}
    for r in history:
        if is_number(r.get(metric)) and is_number(r.get("epoch")):
            n = r.get(f"{metric}_n")
            series.setdefault(int(n) if is_number(n) else None, []).append((r["epoch"], r[metric]))
    return series


END_MARKERS = {"stopped (ASHA)": "x", "completed": "o"}  # where a trial's curve ends; a square for any other status


def plot_curves(spec: SweepSpec, trials: list[dict[str, Any]], path: Path) -> Path:
    """The ranking metric per epoch, a colour per trial (legend: id and searched values) and, for an FID, a line
    style per sample count; a figure saying so when no trial has reported the metric yet."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    metric = spec.metric
    per_trial = [(t, metric_series(t["history"], metric)) for t in trials]
    per_trial = [(t, s) for t, s in per_trial if s]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    if not per_trial:
        ax.text(0.5, 0.5, f"no trial reported {metric} yet", ha="center", va="center", fontsize=14)
        ax.axis("off")
        return _save(fig, path)
    counts = sorted({n for _, s in per_trial for n in s}, key=lambda n: n or 0)
    styles = dict(zip(counts, ["-", "--", ":", "-."] * len(counts)))
    colours = plt.get_cmap("tab10" if len(per_trial) <= 10 else "tab20").colors
    trial_handles, values = [], []
    for i, (t, series) in enumerate(per_trial):
        colour = colours[i % len(colours)]
        for n, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, styles[n], color=colour, marker="o", ms=3, lw=1, alpha=0.8)
            values += ys
        xs, ys = zip(*series[max(series, key=lambda n: n or 0)])  # where the trial ended: its deepest count
        ax.plot(xs[-1], ys[-1], END_MARKERS.get(t["status"], "s"), color=colour, ms=8, mfc="none")
        trial_handles.append(Line2D([], [], color=colour, marker="o", ms=3, label=t["label"]))
    count_handles = [Line2D([], [], color="grey", ls=styles[n], label=fid_metric_name(n, metric)) for n in counts if n]
    ax.legend(handles=trial_handles + count_handles, title="trial" + (", sample count" if count_handles else ""),
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (x: stopped by ASHA, o: ran to the end, square: ended otherwise or not yet)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    if spec.mode == "min" and all(v > 0 for v in values) and max(values) >= 10 * min(values):
        ax.set_yscale("log")  # a decade or more: log, labelled in plain numbers
        _plain_log_labels(ax.yaxis, math.log10(max(values) / min(values)))
    else:
        ax.ticklabel_format(axis="y", useOffset=False)
    return _save(fig, path)


def _plain_log_labels(axis, decades: float) -> None:
    """Label a log axis `20`, `50`, `100` rather than `2x10^1`...: its decades, and between them 2 and 5 (and 3
    when it spans less than two decades) times a power of ten."""
    from matplotlib.ticker import FuncFormatter

    keep = (1,) if decades > 4 else (1, 2, 5) if decades > 2 else (1, 2, 3, 5)

    def label(v: float, _pos) -> str:
        if v <= 0:
            return ""
        mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
        return f"{v:g}" if any(math.isclose(mantissa, k, rel_tol=1e-6) for k in keep) else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def plot_tradeoffs(trials: list[dict[str, Any]], path: Path) -> Path | None:
    """Rate-distortion and FID-vs-bpd scatters from each trial's last result, where the metrics exist."""
    panels = [("test_kl", "test_mse", "rate: KL (nats)", "distortion: reconstruction MSE")]
    fid_key = next((k for t in trials for k in t["last"] if k.startswith("fid_") and k[4:-1].isdigit()), None)
    bpd_key = "test_iwae_bpd" if any("test_iwae_bpd" in t["last"] for t in trials) else "test_bpd"
    if fid_key:
        panels.append((bpd_key, fid_key, f"{bpd_key} (bits/dim)", fid_key))
    panels = [p for p in panels
              if any(is_number(t["last"].get(p[0])) and is_number(t["last"].get(p[1])) for t in trials)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (xk, yk, xl, yl) in zip(axes[0], panels):
        pts = [(t["last"][xk], t["last"][yk], t["config"].get("model.beta")) for t in trials
               if is_number(t["last"].get(xk)) and is_number(t["last"].get(yk))]
        xs, ys, betas = zip(*pts)
        if all(is_number(b) and b > 0 for b in betas):
            sc = ax.scatter(xs, ys, c=[math.log10(b) for b in betas], cmap="viridis")
            fig.colorbar(sc, ax=ax, label="log10 beta")
        else:
            ax.scatter(xs, ys)
        if yk == fid_key:  # both are minimised: the trials no other trial beats on both
            front = sorted(p for p, _ in nondominated(list(zip(xs, ys))))
            ax.step(*zip(*front), where="post", color="tab:red", lw=1, label="Pareto front")
            ax.legend(loc="upper right")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.suptitle("trade-offs across trials (last result of each)")
    return _save(fig, path)


RECONSTRUCTION_COLUMNS = 16  # engine.write_grids: 16 images a row, alternating input, reconstruction, input, ...
GRIDS_WIDTH = 11.5  # inches of best_samples.png the grids of a row share
ROW_LABELS_HEIGHT = 0.75  # inches a row of best_samples.png needs for its labels: a guess _fit_height corrects


def plot_best_samples(spec: SweepSpec, trials: list[dict[str, Any]], path: Path, k: int = 5) -> Path | None:
    """The last sample and reconstruction grids of the k best trials, one row each, best first."""
    metric = spec.metric
    rows = [{**ranking_fields([*t["history"], t["last"]], metric), "t": t} for t in trials if t["dir"]]
    ranked = [r for r in rank_rows(rows, spec.mode) if is_number(r["value"])]
    grids = [(r, _last_grids(r["t"]["dir"])) for r in ranked]
    grids = [(r, g) for r, g in grids if g][:k]
    if not grids:
        return None
    from genmodels.images import bare_grid

    kinds = [kind for kind in ("samples", "reconstructions") if any(kind in g for _, g in grids)]
    images = [{kind: bare_grid(p) for kind, p in g.items()} for _, g in grids]
    # each panel as wide as its grid is for one row height, the figure about as tall as the rows' grids, their
    # titles and tick labels (constrained layout places them), then cut to what the grids fill: no band of white
    aspects = [max(im[kind].shape[1] / im[kind].shape[0] for im in images if kind in im) for kind in kinds]
    row_height = GRIDS_WIDTH / sum(aspects)
    fig = plt.figure(figsize=(GRIDS_WIDTH, len(grids) * (row_height + ROW_LABELS_HEIGHT) + 0.3), layout="constrained")
    axes = fig.subplots(len(grids), len(kinds), gridspec_kw={"width_ratios": aspects}, squeeze=False)
    for row, (r, g), im in zip(axes, grids, images):
        n = f" (n={r['n']})" if r["n"] else ""
        first = next(kind for kind in kinds if kind in g)  # the panel that names the trial
        for ax, kind in zip(row, kinds):
            ax.axis("off")
            if kind not in g:
                continue
            image = im[kind]
            ax.imshow(image, aspect="auto")  # until _fit_height has sized the figure to the images
            ax.set_title(f"{r['t']['label']}\n{metric}={r['value']:.4g}{n}: {kind}" if kind == first else kind,
                         fontsize=7)
            if kind == "reconstructions":
                _label_columns(ax, image.shape[1])
    fig.suptitle(f"last grids of the {len(grids)} best trials, best first")
    _fit_height(fig, axes)
    return _save(fig, path)


def _fit_height(fig, axes) -> None:
    """Make each row of images as tall as its images are for the width they got, so that no band of white is left
    above or below them: constrained layout sizes the panels as if the images could stretch (it only keeps room
    for the titles and labels an axes has outside the image it fills), the figure then grows or shrinks by what the
    rows lack or have too much, and the images keep their aspect again."""
    fig.draw_without_rendering()
    width, height = fig.get_size_inches()
    change = 0.0
    for row in axes:
        shown = [ax for ax in row if ax.images]
        if shown:
            need = max(ax.get_position().width * width * _height_per_width(ax) for ax in shown)
            change += need - shown[0].get_position().height * height
    fig.set_size_inches(width, height + change)
    for row in axes:
        for ax in row:
            ax.set_aspect("equal")


def _height_per_width(ax) -> float:
    h, w = ax.images[0].get_array().shape[:2]
    return h / w


def _last_grids(trial_dir: Path) -> dict[str, Path]:
    """The grids of the trial's last images folder that has any (epoch_0004 sorts before final)."""
    for d in sorted(trial_dir.glob("images/*/"), reverse=True):
        grids = {kind: d / f"{kind}.png" for kind in ("samples", "reconstructions") if (d / f"{kind}.png").exists()}
        if grids:
            return grids
    return {}


def _label_columns(ax, width: int) -> None:
    """Mark each column of a reconstruction grid as input or reconstruction (they alternate within each row)."""
    cell = (width - 1) / RECONSTRUCTION_COLUMNS  # image plus its 1-pixel padding (save_grid)
    ax.axis("on")
    ax.set_xticks([1 + (j + 0.5) * cell for j in range(RECONSTRUCTION_COLUMNS)],
                  ["in", "rec"] * (RECONSTRUCTION_COLUMNS // 2), fontsize=6)
    ax.set_yticks([])
    ax.tick_params(length=0, labeltop=True, labelbottom=False)
    ax.set_xlabel("columns alternate: input, its reconstruction", fontsize=7)
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_importances(c: importance.Comparison, path: Path) -> Path:
    """Optuna's importance bars, as importance.describe prints them (the same evaluator on the same trials)."""
    from optuna.visualization.matplotlib import plot_param_importances

    at = f"epoch {c.epoch}" + (f", n={c.n}" if c.n else "")
    with _optuna_style():
        ax = plot_param_importances(_short_study(c.study), evaluator=c.evaluator, target_name=c.metric)
        ax.set_title(f"which hyperparameters mattered for {c.metric} (PED-ANOVA: best {c.top} of "
                     f"{len(c.study.trials)} trials at {at})", loc="left")  # in place of Optuna's title
        ax.figure.set_size_inches(9, 1.5 + 0.5 * len(c.importances))
        return _save(ax.figure, path)


def plot_parallel(c: importance.Comparison, path: Path) -> Path:
    """Optuna's parallel coordinates of the compared trials, their value at the milestone on the first axis."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    with _optuna_style():
        ax = plot_parallel_coordinate(_short_study(c.study), target_name=f"{c.metric} at epoch {c.epoch}")
        _recolour_lines(ax, best_low=c.study.direction.name == "MINIMIZE")
        for axis in ax.figure.axes:  # a log-searched parameter's axis: 0.0002, not 2x10^-4
            if axis.get_yscale() == "log":
                _plain_log_labels(axis.yaxis, math.log10(max(axis.get_ylim()) / min(axis.get_ylim())))
        ax.set_title(f"the {len(c.study.trials)} trials compared at epoch {c.epoch}, by their {c.metric} there",
                     y=1.03)
        ax.figure.set_size_inches(max(8.0, 2.0 * (len(c.importances) + 1)), 4.5)
        return _save(ax.figure, path)


def _short_study(study):
    """The study's trials with their parameters named as the leaderboard names them (`beta` for `model.beta`,
    importance.short_names), for Optuna's plots to label them so."""
    import optuna

    names = importance.short_names(list(dict.fromkeys(k for t in study.trials for k in t.distributions)))
    short = optuna.create_study(direction=study.direction, study_name=study.study_name)
    short.add_trials([optuna.trial.create_trial(params={names[k]: v for k, v in t.params.items()},
                                                distributions={names[k]: d for k, d in t.distributions.items()},
                                                value=t.value) for t in study.trials])
    return short


PARALLEL_COLOURS = "plasma"
PARALLEL_RANGE = (0.0, 0.7)  # of PARALLEL_COLOURS: dark blue to salmon, both plain on white (its yellow end is not)


def _recolour_lines(ax, best_low: bool) -> None:
    """Optuna draws the trials' lines in Blues, whose worst end is white on white: recolour them (and the colour
    bar, which follows its lines) from dark blue (the best value) to a salmon still plain on white."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap

    base = plt.get_cmap(PARALLEL_COLOURS)
    cmap = ListedColormap(base([PARALLEL_RANGE[0] + (PARALLEL_RANGE[1] - PARALLEL_RANGE[0]) * i / 255
                                for i in range(256)]), name=f"{PARALLEL_COLOURS}_part")
    for lines in ax.collections:
        if isinstance(lines, LineCollection) and lines.get_array() is not None:
            lines.set_cmap(cmap if best_low else cmap.reversed())


@contextlib.contextmanager
def _optuna_style():
    """Optuna's plots switch matplotlib to its ggplot style and warn that they are experimental: both kept to
    them (rc_context restores the style for the other figures)."""
    with plt.rc_context(), quiet_optuna(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": keeps legends placed beside the axes
    plt.close(fig)
    return path


def write_report(storage: str, spec: SweepSpec, trials: list[dict[str, Any]] | None = None,
                 comparison: importance.Comparison | None = None) -> list[Path]:
    """The plots, in the sweep's folder (or ./report-NAME when the sweep lives in cloud storage); the importance
    plots only where there are importances (importance.compare says why not)."""
    trials = trial_histories(storage, spec) if trials is None else trials
    comparison = importance.compare(trials, spec) if comparison is None else comparison
    out = Path(f"report-{spec.name}") if is_uri(storage) else Path(storage) / spec.name / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_curves(spec, trials, out / "metric_per_epoch.png"),
             plot_tradeoffs(trials, out / "tradeoffs.png"),
             plot_best_samples(spec, trials, out / "best_samples.png")]
    if comparison.importances:
        paths += [plot_importances(comparison, out / "param_importances.png"),
                  plot_parallel(comparison, out / "parallel_coordinate.png")]
    return [p for p in paths if p]


def log_to_wandb(paths: list[Path], name: str, project: str, entity: str | None, storage: str,
                 importances: dict[str, float] | None = None) -> str | None:
    """Log the plots (and the importances, as a table) as one W&B run of the sweep's group; returns the
    `wandb sync` command when it ran offline."""
    import wandb

    run = wandb.init(project=project, entity=entity, group=name, name=f"{name}-report", job_type="report",
                     dir=str(paths[0].parent), settings=wandb.Settings(silent=True))
    run.log({p.stem: wandb.Image(str(p)) for p in paths})
    if importances:
        run.log({"param_importances_table": wandb.Table(columns=["parameter", "share"],
                                                        data=[[k, v] for k, v in importances.items()])})
    offline, sync_dir = run.offline, run.settings.sync_dir
    run.finish()
    return f"wandb sync {shlex.quote(sync_dir)}" if offline else None


def command(args) -> int:
    storage, spec = resolve_sweep(args)
    trials = trial_histories(storage, spec)
    comparison = importance.compare(trials, spec)
    paths = write_report(storage, spec, trials, comparison)
    print("\n".join(importance.describe(comparison)))
    for path in paths:
        print(path)
    if not args.no_wandb:
        os.environ.setdefault("WANDB_MODE", "online" if is_logged_in() else "offline")
        sync = log_to_wandb(paths, spec.name, args.wandb_project, args.wandb_entity, storage,
                            comparison.importances)
        if sync:
            print(f"W&B is offline: upload the report with `{sync}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    return script("report", argv, prog="report.py")


if __name__ == "__main__":
    sys.exit(main())
