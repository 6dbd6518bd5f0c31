"""The Ray Tune function trainable: the genmodels Experiment in its epoch loop, reporting, checkpointing, resuming.

A trial's config is the flat `section.field` dict of the sweep's param space (sweeps/param_space.py), read back
into a typed TrialConfig here, at the Ray boundary.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import ray
import torch
from ray import tune

from genmodels.cuda_graph import GraphCaptureFailed
from genmodels.engine import CHECKPOINT_FILE, Diverged, default_device
from genmodels.experiment import Experiment
from genmodels.metrics.fid import fid_metric_name
from genmodels.registry import trial_config
from trainables.checkpoints import (
    CARRIED_REPORTS,
    IMAGES_DIR,
    folder_bytes,
    graph_capture_failed,
    has_ended,
    has_room,
    newest_state,
    record_graph_capture_failed,
    recorded_epochs,
    trial_dirname,
)
from trainables.evaluation import FIDPlan, fid_metrics, process_scorer, sampling_budget

# In exp.extra (saved in each checkpoint, under CARRIED_REPORTS): the reports made since the previous checkpoint, this
# one's own last. Tune persists a checkpoint before the driver records its report, so a driver stopped in between
# leaves a checkpoint whose reports the sweep never saw; a resumed trial reports them again (`replay`).


class TrialPlan(NamedTuple):
    """What a trial knows of its sweep besides its hyperparameters (from the sweep's spec, through
    `tune.with_parameters`): the ranking metric and its direction, the FID plan, ASHA's milestones (where the full
    evaluation, the FID ladder, the grids and a checkpoint are due) and how often to checkpoint in between."""
    metric: str
    mode: str = "min"
    fid: FIDPlan | None = None
    milestones: tuple[int, ...] = ()
    checkpoint_every_s: float = 0.0  # 0: a checkpoint with every report
    objectives: tuple[str, ...] = ()  # every metric the searcher reads (several for --objectives); () = (metric,)


_process_prepared = False


def prepare_process(device: torch.device | str, fid_network: str | None = None,
                    fid_weights: str | None = None) -> float:
    """Pay a trial process's one-time costs at its first trial's start, and return their seconds (0 for a later
    trial): torch's lazy imports at the first optimizer (torch._dynamo, seconds on a CPU), the device's context, the
    FID network and torchmetrics' import. Else they land in whichever epoch, milestone or end first needs them. The
    first trial reports them (`process_setup_s`), and the progress line's pace leaves them out (sweeps/progress.py);
    the dry run times a new process's start with them (sweeps/forecast.py)."""
    global _process_prepared
    if _process_prepared:
        return 0.0
    start = time.perf_counter()
    torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)])
    if fid_network:
        process_scorer(fid_network, fid_weights, device).import_metrics()
    # Every trial starts with a full collection (train_trial). With torch, Ray and torchmetrics imported the process
    # tracks about 500k objects that live as long as it does, and each collection walked them all: 0.28 s a trial on
    # a 2-core CPU. Frozen out of the collector, a trial's collection walks only what came after them. (Not collected
    # first: another 0.28 s, for the few dozen objects of garbage the imports leave.)
    gc.freeze()
    sys.unraisablehook = exit_on_a_lost_sigterm
    _process_prepared = True
    return time.perf_counter() - start


def exit_on_a_lost_sigterm(unraisable) -> None:
    """Ray stops a trial's worker with SIGTERM, whose handler raises SystemExit. Landing in a weakref callback or a
    __del__ (a trial's start collects its process's garbage: many run then), Python can only print it ("Exception
    ignored ... SystemExit", on the driver's screen) and the worker goes on. Exit as Ray asked; anything else as
    Python does."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit):
        sys.stdout.flush()
        sys.stderr.flush()
        code = getattr(unraisable.exc_value, "code", 1)
        os._exit(code if isinstance(code, int) else 1)
    sys.__unraisablehook__(unraisable)


def train_trial(config: dict[str, Any], data: dict[str, torch.Tensor], plan: TrialPlan, folder: str = "") -> None:
    """Train one trial: report every epoch, with a checkpoint at milestones, at the end and every
    `plan.checkpoint_every_s` in between; resume from the newest checkpoint if there is one (in the trial's folder
    of the sweep's `folder` in storage, local path or URI, or Tune's own).

    The report is the last thing an epoch does: Tune may stop the trial (ASHA, or the final epoch) right after it.
    Every report says which epoch this run of the trial started from (0 = fresh; after a node failure or
    `run.py --resume`, the epoch of the checkpoint it restored), on which Ray node it runs, and the seconds its
    first epoch spent on its process's one-time costs (`process_setup_s`; 0 in a process that ran a trial before).
    """
    # Ray logs "Checkpoint successfully created" at every report, from every trial, to the driver's screen.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    trial_folder = f"{folder}/{trial_dirname(config['model_name'], tune.get_context().get_trial_id())}" \
        if folder else None
    if trial_folder and has_ended(trial_folder):
        return  # it ended before the driver died: nothing to redo (Tune keeps the results it has)
    graphs_failed = graph_capture_failed(trial_folder) if trial_folder else None
    if graphs_failed:  # Tune's retry of a trial whose CUDA graph capture failed: the same trial, eagerly
        config = {**config, "train.cuda_graphs": False}
    setup_s = prepare_process(default_device(), plan.fid.network if plan.fid else None,
                              plan.fid.weights_path if plan.fid else None)
    # A reused actor's previous trial may still be held in reference cycles (torch's first imports make some, with
    # the first Experiment on their frames' stack): freed now, before this trial allocates its own. After
    # prepare_process, which freezes what a new process imported: collected before it, a process's first trial
    # walked all of that (0.2 s of its first epoch on a 2-core CPU).
    gc.collect()
    if config.get("checkpoint"):  # an ncsn-sampling trial: its Langevin graphs may fail to capture as well
        try:
            return evaluate_checkpoint(config, data, plan, graphs_off=bool(graphs_failed), setup_s=setup_s)
        except GraphCaptureFailed as e:
            if trial_folder:
                record_graph_capture_failed(trial_folder, str(e))
            raise
    # The driver prepared the sweep's config once (derived values are in it): build, no second prepare.
    exp = Experiment(trial_config(config), data["train"], data["test"])
    if graphs_failed:
        exp.extra["graphs_off_after_failed_capture"] = 1
    # The reports every checkpoint carries, not the newest's alone: a line of result.json that was cut short (and
    # dropped by the driver's repair_results) may be an older checkpoint's.
    carried: list[dict[str, Any]] = []
    newest = newest_state(trial_folder, tune.get_checkpoint(), carried)
    if newest:
        exp.restore_state(newest[0])
        # Tune's own "Restored on ... from checkpoint" names the checkpoint it handed back, which after a resume can
        # be older than the newest that loads: this line says which one the trial continues from
        print(f"gensweep: the trial continues from {newest[1]} (epoch {exp.epoch})", flush=True)
        # Without the trial's folder there is no result.json to compare with: nothing is replayed.
        replay([r for r in carried if r.get("epoch", 0) <= exp.epoch],
               recorded_epochs(trial_folder) if trial_folder else None)
    exp.extra["resumed_from_epoch"] = exp.epoch
    exp.extra["process_setup_s"] = setup_s  # after the restore: this run's, not the saved run's
    # Tune runs each trial in its own working directory, on whichever node it lands, and uploads that folder to the
    # trial's folder in storage (SyncConfig(sync_artifacts=True)); get_trial_dir() is the driver's staging folder,
    # which only exists on the driver's node.
    trial_dir = Path.cwd()
    last_checkpoint = time.monotonic()
    # At a milestone ASHA and Optuna read the objectives, and at the end the leaderboard ranks the trial against
    # those stopped at milestones: both evaluate alike, with the expensive estimates (the VAE family's bound at
    # eval_k) only when one of them ranks the trials. The end adds the model's once-per-trial metrics (finish).
    ranked_on = set(plan.objectives or (plan.metric,))
    ranking_evaluation = "full" if exp.ranks_on_full_evaluation(ranked_on) else "test"
    epochs = exp.cfg.train.epochs

    def on_epoch(metrics: dict[str, float]) -> None:
        nonlocal last_checkpoint
        milestone = exp.done or exp.epoch in plan.milestones
        due = milestone or time.monotonic() - last_checkpoint >= plan.checkpoint_every_s
        images_dir = trial_dir / IMAGES_DIR / f"epoch_{exp.epoch:04d}"
        extra, final_images = evaluate_extra(exp, plan, exp.done, images_dir)
        report(exp, {**metrics, **extra}, plan, images_dir if milestone else None, due, final_images, trial_folder)
        last_checkpoint = time.monotonic() if due else last_checkpoint

    try:
        exp.run(on_epoch, evaluation=lambda epoch: ranking_evaluation if epoch in plan.milestones or epoch >= epochs
                else "subset")
    except GraphCaptureFailed as e:
        # This process's CUDA state is spoilt: end it; Tune retries the trial in a new one, without graphs.
        if trial_folder:
            record_graph_capture_failed(trial_folder, str(e))
        raise
    except Diverged as e:
        # No ranking metric in this report, and done=True: Tune stops the trial on it before ASHA or Optuna see it
        # (Optuna records the trial as pruned), and the sweep goes on (Tune's strict metric check is off).
        tune.report({"diverged": 1, "epoch": exp.epoch, "error": str(e), "done": True})


def replay(carried: list[dict[str, Any]], recorded: set[int] | None) -> None:
    """Report again, in order, the carried reports (of the checkpoints in the trial's folder, up to the one just
    restored) whose epoch result.json lacks (`replayed` 1; the checkpoint of the last is the one just restored,
    already in the trial's folder). Where result.json cannot be read (not synced to a bucket yet, or gone) nothing
    is replayed: which epochs the sweep recorded is unknown, and a missed row is better than a recorded epoch
    reported twice (which reads as an epoch trained twice)."""
    if recorded is None:
        return
    for metrics in carried:
        if metrics.get("epoch") not in recorded:
            tune.report({**metrics, "replayed": 1})


def plain(value: Any) -> Any:
    """`value` as torch.load(weights_only=True) reads it back: numpy and torch scalars (FID, KID) as Python ones
    (np.float64 is a float, so `tolist` is asked first), anything else unknown as its str."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def evaluate_extra(exp: Experiment, plan: TrialPlan, final: bool,
                   images_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """FID on the ladder, and at the end the model's expensive once-per-trial metrics and grids."""
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    metrics: dict[str, Any] = {"epoch": exp.epoch, "step": exp.step, "diverged": 0, "node_id": node_id,
                               "resumed_from_epoch": exp.extra.get("resumed_from_epoch", 0),
                               "process_setup_s": exp.extra.get("process_setup_s", 0.0),
                               "graphs_off_after_failed_capture": exp.extra.get("graphs_off_after_failed_capture", 0)}
    if plan.fid:
        metrics.update(fid_metrics(plan.fid, exp, final))
    images: dict[str, Path] = {}
    if final:
        final_metrics, images = exp.finish(images_dir)
        metrics.update(final_metrics)
    return metrics, images


def report(exp: Experiment, metrics: dict[str, Any], plan: TrialPlan, grids_dir: Path | None, checkpoint: bool,
           final_images: dict[str, Path], trial_folder: str | None = None) -> None:
    """Track the best ranking value, write grids into `grids_dir` (at milestones and the end), and report, with a
    checkpoint holding the trainer state and those grids when one is due (the W&B callback logs the grids from
    there). A report without a checkpoint says so (`checkpointed` 0): a fault loses the epochs since the last. The
    reports since the previous checkpoint go into this one (CARRIED_REPORTS), for a resumed trial to replay."""
    metrics.update(track_best(exp.extra.setdefault("best", {}), metrics, plan.metric, plan.mode))
    # Grids between the end's at the first rung's sampler budget: a full Langevin chain per milestone costs minutes.
    budget = 1.0 if exp.done or not plan.fid else sampling_budget(plan.fid, 0)
    images = {**(exp.write_grids(grids_dir, budget=budget) if grids_dir else {}), **final_images}
    metrics["checkpointed"] = int(checkpoint)
    metrics["reported_at"] = time.time()  # seconds since the epoch (Tune's timestamp is whole seconds)
    carried = exp.extra.setdefault(CARRIED_REPORTS, [])
    if carried and carried[-1].get("checkpointed"):
        carried.clear()  # the previous checkpoint holds those
    carried.append(plain(metrics))
    if not checkpoint:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        exp.save(Path(d) / CHECKPOINT_FILE)
        (Path(d) / IMAGES_DIR).mkdir()
        for name, path in images.items():
            shutil.copy(path, Path(d) / IMAGES_DIR / f"{name}.png")
        if not has_room(trial_folder, folder_bytes(Path(d))):
            # The storage is full: keep the previous checkpoint whole (a copy cut short is one a resume must pass
            # over) and report; the driver's StorageWatch sees the free space and stops the sweep, resumable.
            metrics["checkpointed"] = carried[-1]["checkpointed"] = 0
            tune.report(metrics)
            return
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def track_best(best: dict[str, float], metrics: dict[str, Any], metric: str, mode: str) -> dict[str, float]:
    """Update `best` (kept in the checkpoint) with this report's ranking value and return the `best_` entries due.
    An FID is biased by its sample count, so its best is kept per count (`best_fid_1k`), never across counts."""
    value = metrics.get(metric)
    if value is None:
        return {}
    key = f"best_{fid_metric_name(metrics[f'{metric}_n'], metric)}" if f"{metric}_n" in metrics else f"best_{metric}"
    if key not in best or (value < best[key] if mode == "min" else value > best[key]):
        best[key] = value
    return {key: best[key]}


def evaluate_checkpoint(config: dict[str, Any], data: dict[str, torch.Tensor], plan: TrialPlan,
                        graphs_off: bool = False, setup_s: float = 0.0) -> None:
    """No training: the model of a finished run, with the trial's model settings (the searched sampler values and
    any --fixed ones), seed and train.cuda_graphs (--fixed, or off in the retry of a trial whose Langevin graph
    failed to capture: `graphs_off`) overriding its saved config, scored once at the final FID budget. What
    `ncsn-sampling` sweeps. The overrides are read from the trial's own config, so a resumed sweep applies them as
    well."""
    overrides = {k: v for k, v in config.items()
                 if k.startswith("model.") or k in ("train.seed", "train.cuda_graphs")}
    exp = Experiment.from_checkpoint(config["checkpoint"], data["train"], data["test"], overrides)
    if graphs_off:
        exp.extra["graphs_off_after_failed_capture"] = 1
    exp.extra["process_setup_s"] = setup_s
    images_dir = Path.cwd() / IMAGES_DIR / "final"
    extra, final_images = evaluate_extra(exp, plan, True, images_dir)
    report(exp, {**exp.evaluate(), **extra}, plan, images_dir, True, final_images)
