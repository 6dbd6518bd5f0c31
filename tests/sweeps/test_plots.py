"""The report's plots and the trials' grids read as a user reads them: whole epochs and plain numbers on the metric
curves, every parallel-coordinate line visible on white, parameters named as the tables name them, labelled
reconstruction and traversal grids, and best_samples.png without a band of white."""
import random
import re

import numpy as np
import pytest
import torch
from conftest import make_trainer, saved_spec_of
from test_leaderboard_report import saved_figures, synthetic_trial  # noqa: F401 (saved_figures: a fixture)

from genmodels.data import synthetic_images
from sweeps import importance, report

SEARCHED = ("model.beta", "model.latent", "train.lr", "model.likelihood_scale")
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]")  # `model.beta`, not `0.5`


def texts_of(fig) -> list[str]:
    """Every text a reader sees on the figure: titles, axis labels, tick labels, legends, annotations."""
    drawn(fig)
    out = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        out += [ax.get_title(loc) for loc in ("left", "center", "right")]
        out += [ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
        out += [t.get_text() for t in [*ax.get_xticklabels(which="both"), *ax.get_yticklabels(which="both")]]
        if ax.get_legend():
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return [t for t in out if t]


def visible_tick_labels(axis) -> list[str]:
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text() and lo <= t.get_position()[
        0 if axis.axis_name == "x" else 1] <= hi]


# ---------------------------------------------------------------------------------------------------------------
# 1. the metric per epoch: whole epochs, plain numbers


@pytest.mark.parametrize("metric, values", [("test_bpd", [8.4, 7.9, 7.1, 6.2]),  # less than a decade
                                            ("fid", [420.0, 160.0, 75.0, 31.0])])  # more than a decade
def test_curves_have_whole_epochs_and_plain_numbers(tmp_path, saved_figures, metric, values):  # noqa: F811
    spec = saved_spec_of(space="vae", objectives=(metric,), searched=SEARCHED, max_epochs=4)
    trials = [synthetic_trial("t1", [{"epoch": e, metric: v, f"{metric}_n": 128} for e, v in enumerate(values, 1)]),
              synthetic_trial("t2", [{"epoch": 1, metric: values[0] * 0.9, f"{metric}_n": 128}], "stopped (ASHA)")]
    report.plot_curves(spec, trials, tmp_path / "curves.png")
    fig = saved_figures["curves.png"]
    drawn(fig)
    ax = fig.axes[0]
    xs = visible_tick_labels(ax.xaxis)
    assert xs and all(re.fullmatch(r"\d+", x) for x in xs), xs  # epochs 1, 2, 3, 4: not 1.5
    ys = visible_tick_labels(ax.yaxis)
    assert len(ys) >= 3 and all(re.fullmatch(r"\d+(\.\d+)?", y) for y in ys), ys  # not 8x10^0, 2x10^2
    assert ax.get_yscale() == ("log" if max(values) >= 10 * min(values) else "linear")


# ---------------------------------------------------------------------------------------------------------------
# 2. and 3. Optuna's plots: every line visible, parameters under the tables' names


@pytest.fixture(scope="module")
def comparison():
    """Eight synthetic vae trials, six of which reached epoch 4, compared there."""
    spec = saved_spec_of(space="vae", objectives=("test_bpd",), searched=SEARCHED, max_epochs=4)
    rng = random.Random(1)
    trials = []
    for i in range(8):
        config = {"model.beta": 10 ** rng.uniform(-1.3, 1.2), "model.latent": rng.choice([32, 64, 128, 256]),
                  "train.lr": 10 ** rng.uniform(-4, -2.5), "model.likelihood_scale": 10 ** rng.uniform(-1.7, 0)}
        epochs = 4 if i % 4 else 2
        history = [{"epoch": e, "test_bpd": 8 - 0.3 * e + 2 * config["model.likelihood_scale"] + 0.1 * rng.random()}
                   for e in range(1, epochs + 1)]
        trials.append({**synthetic_trial(f"{i:08x}", history), "config": config})
    c = importance.compare(trials, spec)
    assert c.importances, c.reason
    return c


def relative_luminance(rgba) -> float:
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_every_parallel_coordinate_line_is_visible_on_white(tmp_path, comparison, saved_figures):  # noqa: F811
    from matplotlib.collections import LineCollection

    report.plot_parallel(comparison, tmp_path / "parallel.png")
    fig = saved_figures["parallel.png"]
    drawn(fig)
    lines = [c for ax in fig.axes for c in ax.collections
             if isinstance(c, LineCollection) and c.get_array() is not None]  # the trials' (not the colour bar's)
    assert len(lines) == 1
    colours = lines[0].get_colors()
    assert len(colours) == len(comparison.study.trials)
    luminance = [relative_luminance(c) for c in colours]
    assert max(luminance) < 0.4, luminance  # Optuna's Blues draws the worst trial at 0.96: white on white
    values = [lines[0].get_array()[i] for i in range(len(colours))]
    assert luminance[int(np.argmin(values))] == min(luminance)  # the best (lowest) value is the darkest line


@pytest.mark.parametrize("plot", ["importances", "parallel"])
def test_optuna_plots_name_parameters_as_the_tables_do(tmp_path, comparison, saved_figures, plot):  # noqa: F811
    getattr(report, f"plot_{plot}")(comparison, tmp_path / f"{plot}.png")
    texts = texts_of(saved_figures[f"{plot}.png"])
    assert not [t for t in texts if DOTTED_NAME.search(t)], texts
    assert not [t for t in texts if "^" in t], texts  # plain numbers on log-searched parameters' axes: no 2x10^-4
    assert {"beta", "latent", "lr", "likelihood_scale"} <= set(texts), texts


def test_short_names_keep_the_importances(comparison):
    import optuna

    short = report._short_study(comparison.study)
    raw = optuna.importance.get_param_importances(short, evaluator=comparison.evaluator)
    assert {k: round(v, 6) for k, v in raw.items()} == {
        k.split(".")[-1]: round(v, 6) for k, v in comparison.importances.items()}


# ---------------------------------------------------------------------------------------------------------------
# 4. labelled grids


@pytest.fixture(scope="module")
def trainer():
    torch.manual_seed(0)
    images = synthetic_images(48, seed=0)
    cfg = {"arch": "conv-small", "width": 4, "latent": 8, "epochs": 1, "steps_per_epoch": 2, "batch_size": 16}
    return make_trainer("vae", cfg, images[:32], images[32:])


def strip_has_text(picture: np.ndarray) -> bool:
    return bool((picture.min(axis=-1) < 100).any())  # black text on the white strip


def test_reconstruction_grid_says_which_columns_are_inputs(tmp_path, trainer):
    from genmodels.images import bare_grid

    path = trainer.write_grids(tmp_path)["reconstructions"]
    from PIL import Image

    bare_height, bare_width = 2 * 33 + 1, 16 * 33 + 1  # 16 test images and their reconstructions: 2 rows of 16

    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] == bare_width and picture.shape[0] > bare_height + 20, picture.shape
    assert strip_has_text(picture[:picture.shape[0] - bare_height])
    assert bare_grid(path).shape == (bare_height, bare_width, 3)
    assert (bare_grid(path)[:1] == 255).all()  # the grid's own white padding starts where the strip ends


def test_traversal_grid_names_its_units_and_values(tmp_path, trainer):
    from PIL import Image

    from genmodels.images import bare_grid
    from genmodels.metrics.latent import latent_grids

    path = latent_grids(trainer.eval_model, trainer.test_images(16), tmp_path, n_pairs=2, steps=5)["traversal"]
    bare = bare_grid(path)
    assert bare.shape == (8 * 33 + 1, 5 * 33 + 1, 3)  # latent 8: every unit, 5 steps
    picture = np.asarray(Image.open(path).convert("RGB"))
    top, left = picture.shape[0] - bare.shape[0], picture.shape[1] - bare.shape[1]
    assert top > 20 and left > 10, (top, left)
    assert strip_has_text(picture[:top]) and strip_has_text(picture[top:, :left])  # title and values; unit names


def test_unlabelled_grids_are_unchanged(tmp_path):
    from torchvision.utils import save_image

    from genmodels.images import bare_grid, save_grid

    images = synthetic_images(6, seed=3).float() / 255
    save_image(images, tmp_path / "torchvision.png", nrow=3, padding=1, pad_value=1.0)
    save_grid(images, tmp_path / "ours.png", nrow=3)
    assert np.array_equal(bare_grid(tmp_path / "ours.png"), bare_grid(tmp_path / "torchvision.png"))


# ---------------------------------------------------------------------------------------------------------------
# 5. best_samples.png: the grids fill the figure


def test_best_samples_grids_fill_the_figure(tmp_path, trainer, saved_figures):  # noqa: F811
    trials = []
    for i in range(3):
        d = tmp_path / f"vae_{i}"
        trainer.write_grids(d / "images" / "epoch_0002")
        trials.append({**synthetic_trial(f"t{i}", [{"epoch": 2, "test_bpd": 7.0 + i}]), "dir": d})
    spec = saved_spec_of(space="vae", objectives=("test_bpd",), searched=SEARCHED)
    report.plot_best_samples(spec, trials, tmp_path / "best.png")
    fig = saved_figures["best.png"]
    renderer = drawn(fig)
    shown = [ax for ax in fig.axes if ax.images]
    grids = merged_spans([ax.get_window_extent(renderer) for ax in shown])  # an image fills its axes
    assert len(grids) == 3  # a row a trial
    content = merged_spans([*(t.get_window_extent(renderer) for t in fig.texts),  # the title
                        *(ax.get_tightbbox(renderer) for ax in shown)])
    gaps = [(b[0] - a[1]) / fig.dpi for a, b in zip(content, content[1:])]
    assert max(gaps, default=0) < 0.2, gaps  # inches: was 1.2 between the title and the first row
    saved = fig.get_tightbbox(renderer)  # inches: what savefig keeps (bbox_inches="tight")
    covered = sum(ax.get_window_extent(renderer).width * ax.get_window_extent(renderer).height for ax in shown)
    assert covered / (saved.width * saved.height * fig.dpi ** 2) > 0.55  # the grids' share: was 0.37, now 0.67
    for ax in shown:  # the reconstructions without the PNG's label strip: the axes label their columns
        assert ax.images[0].get_array().shape[0] in (8 * 33 + 1, 2 * 33 + 1)


def drawn(fig):
    """The renderer of the figure drawn again (_save closed it: its canvas no longer draws)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def merged_spans(boxes) -> list[tuple[float, float]]:
    """The vertical extents the boxes cover, overlapping ones merged, bottom first."""
    out: list[list[float]] = []
    for y0, y1 in sorted((b.y0, b.y1) for b in boxes):
        if out and y0 <= out[-1][1]:
            out[-1][1] = max(out[-1][1], y1)
        else:
            out.append([y0, y1])
    return [(a, b) for a, b in out]
