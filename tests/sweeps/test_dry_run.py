"""`--dry-run`: the plan (and a forecast measured here) after every check a real run makes, with no Ray started
and nothing written; the progress output's time left."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import ray
from conftest import saved_spec_of


def dry_run(argv, tmp_path, capsys):
    import sweeps.run as run

    storage = tmp_path / "runs"
    started = time.perf_counter()
    code = run.main(["--preset", "smoke", "--no-wandb", "--storage-path", str(storage), "--dry-run", *argv])
    took = time.perf_counter() - started
    out = capsys.readouterr()
    assert code == 0, out.err
    assert not ray.is_initialized() and not any(storage.iterdir())  # nothing started, nothing written
    return out.out, took


def test_the_plan_alone_says_what_the_sweep_will_run(tmp_path, capsys):
    out, took = dry_run(["--space", "vae", "--num-samples", "12", "--max-concurrent", "1", "--no-measure"],
                        tmp_path, capsys)
    assert "trials: 12, 1 at once" in out and "limited by the --max-concurrent" in out
    assert "milestones at epochs 1, 2, 4, reduction factor 2" in out and "expected trials at epoch 1: 12, 2: 6.5" in out
    assert "searched: beta log-uniform [0.05, 16], latent {32, 64, 128, 256}" in out
    assert "forecast" not in out
    assert out.strip().splitlines()[-1] == ("gensweep: to run it: python sweeps/run.py --preset smoke --no-wandb "
                                            f"--storage-path {tmp_path / 'runs'} --space vae --num-samples 12 "
                                            "--max-concurrent 1")
    with capsys.disabled():
        print(f"\ndry run without measurement: {took:.1f} s in-process")


@pytest.mark.slow
def test_the_forecast_is_measured_on_the_sweeps_own_network(tmp_path, capsys):
    out, took = dry_run(["--space", "ncsn", "--num-samples", "4"], tmp_path, capsys)
    assert "FID (standin): epoch 1: 128 samples at 25% of a sampler's steps" in out
    assert "reconstruction FID" not in out  # NCSN does not reconstruct
    forecast = out[out.index("forecast (measured on this machine's CPU"):]
    assert "wall time about" in forecast and "CPU-hours" in forecast and "assumptions:" in forecast
    with capsys.disabled():
        print(f"\ndry run with measurement (ncsn smoke): {took:.1f} s in-process")


def test_no_measure_goes_with_dry_run(tmp_path, capsys):
    import sweeps.run as run

    code = run.main(["--preset", "smoke", "--storage-path", str(tmp_path), "--no-measure"])
    assert code == 2 and "--no-measure goes with --dry-run" in capsys.readouterr().err


def test_a_forecast_this_machine_cannot_measure_says_why():
    from sweeps.dry_run import no_forecast_reason

    spec = saved_spec_of().replace(resources={"cpu": 1.0, "gpu": 1.0})
    if not __import__("torch").cuda.is_available():
        assert no_forecast_reason(spec, None) == "the trials ask for GPUs and this machine has none"
    assert no_forecast_reason(saved_spec_of(), None) is None


def test_the_progress_line_says_the_time_left(monkeypatch):
    """A trial's first epoch (its start included, its process's one-time costs not), its later ones at no cut and at
    each cut, the last of one that completes and the gap before the next trial in its process are timed apart, the
    first epoch from the later trials of a process once one has reported: the time left is the running trial's rest
    and the 6 trials not started, on 2 slots."""
    from sweeps import progress
    from sweeps.plan import SWEEP_END_S, TUNE_GAP_S, Rungs, TrialCost, time_left
    from sweeps.progress import ProgressTally, tally

    spec = saved_spec_of(max_epochs=4).replace(num_samples=8)
    tally.begin(spec, slots=2)
    assert tally.line().endswith("time left: once the first trials report")
    callback = ProgressTally()
    done, other, running = (SimpleNamespace(config={"model_name": "ncsn"}, trial_id=i) for i in "abc")
    # the first trial of process 1 (2.5 s of its first epoch were the process's setup), then of process 2
    for epoch, seconds, at, fid in ((1, 5.5, 10.0, 20.0), (2, 3.0, 11.0, 19.5), (3, 1.0, 12.0, 19.4),
                                    (4, 5.0, 17.0, 19.0)):
        callback.on_trial_result(0, [], done, {"epoch": epoch, "time_this_iter_s": seconds, "process_setup_s": 2.5,
                                               "iterations_since_restore": epoch, "pid": 1, "reported_at": at,
                                               "fid": fid})
        if epoch == 3:  # no trial has completed yet: its end is taken as the latest milestone's extra, 2 s
            assert tally.cost() == TrialCost(TUNE_GAP_S + 3.0 - 1.0, epoch=1.0, milestone=(0.0, 2.0), end=2.0)
    callback.on_trial_complete(0, [], done)
    callback.on_trial_result(0, [], other, {"epoch": 1, "time_this_iter_s": 4.0, "process_setup_s": 2.0,
                                            "iterations_since_restore": 1, "pid": 2, "reported_at": 12.5, "fid": 21.0})
    callback.on_trial_complete(0, [], other)
    # the cut at epoch 2 costs 2 s more than a plain epoch (its evaluation); no later trial in a process yet
    assert tally.cost() == TrialCost(TUNE_GAP_S + 2.5 - 1.0, epoch=1.0, milestone=(0.0, 2.0), end=4.0)
    # the next trial in process 1 starts 0.5 s after the first one's last report, and its first epoch takes 4 s
    callback.on_trial_result(0, [], running, {"epoch": 1, "time_this_iter_s": 4.0, "process_setup_s": 0.0,
                                              "iterations_since_restore": 1, "pid": 1, "reported_at": 21.5,
                                              "fid": 19.0})
    pace = tally.cost()
    assert pace == TrialCost(startup=0.5 + 4.0 - 1.0, epoch=1.0, milestone=(0.0, 2.0), end=4.0)
    rungs = Rungs.of(spec)
    # ASHA holds fid 21 (other), 20 (done) and 19 (running) at epoch 1, and done's at epoch 2: ranked, smaller best
    recorded = ((0.25, 0.5, 0.75), (0.5,))
    assert tally.standing() == ({"ncsn_b": 0.25, "ncsn_a": 0.5, "ncsn_c": 0.75}, recorded, ())
    # the trials' rest, then the sweep's end (Ray stopped, the results printed)
    assert tally.left() <= time_left(rungs, 8, 2, pace, [(1, 0.0, 0.75)], 3, recorded) + SWEEP_END_S
    heard = tally.heard[ProgressTally._key(running)]  # the running trial's next epoch is under way since then
    assert tally.left(now=heard + 0.5) - SWEEP_END_S == time_left(rungs, 8, 2, pace, [(1, 0.5, 0.75)], 3,
                                                                  recorded) > pace.seconds(rungs, 1) * 3
    line = tally.line()
    assert "2 of 8 trials ended; about" in line and "(1 s an epoch so far, on 2 slots)" in line
    running_seen = []
    monkeypatch.setattr(progress, "time_left", lambda *args: running_seen.append(args[4:]) or 0.0)
    tally.left(now=heard + 0.5)
    # the running trial: one epoch trained, half a second into its next, the best at epoch 1; 3 trials started
    assert running_seen == [([(1, 0.5, 0.75)], 3, recorded, ())]


def test_between_progress_tables_a_trials_end_prints_the_line_at_most_every_few_seconds(monkeypatch, capsys):
    """A sweep shorter than the table's 30 s shows its time left too: the line follows a trial's end once
    LINE_EVERY_S have passed since it was last printed (with a table, or alone), and not after the last trial."""
    from sweeps import progress
    from sweeps.plan import duration
    from sweeps.progress import LINE_EVERY_S, ProgressTally, tally

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    tally.begin(saved_spec_of(max_epochs=2).replace(num_samples=4), slots=2)
    callback = ProgressTally()
    printed = []
    for i, (trial, at) in enumerate((("a", 100.0 + LINE_EVERY_S / 2), ("b", 100.0 + LINE_EVERY_S),
                                     ("c", 101.0 + LINE_EVERY_S), ("d", 200.0))):
        clock[0] = at
        trial = SimpleNamespace(config={"model_name": "ncsn"}, trial_id=trial)
        callback.on_trial_result(0, [], trial, {"epoch": 1, "time_this_iter_s": 1.0, "iterations_since_restore": 1,
                                                "pid": i % 2, "reported_at": at, "fid": 20.0 + i})
        (callback.on_trial_error if trial.trial_id == "c" else callback.on_trial_complete)(0, [], trial)
        printed.append(capsys.readouterr().out)
    assert printed[0] == "" and printed[2] == "" and printed[3] == ""  # too soon, too soon again, the last trial
    assert printed[1].startswith(f"gensweep: {duration(LINE_EVERY_S)} elapsed, 2 of 4 trials ended; about")
    clock[0] = 300.0
    assert tally.line() and tally.said == 300.0  # a table's line restarts the wait too


def test_a_reproducible_sweeps_time_left_cuts_the_batch_under_way_against_the_batches_before_it():
    """--reproducible, batches of 2: the first batch's values are what the second batch is cut against; its own
    values count only for the batches after it, and once it has ended, the next batch is cut against all four."""
    from sweeps.plan import SWEEP_END_S, Rungs, time_left
    from sweeps.progress import Tally

    tally = Tally()
    tally.begin(saved_spec_of(max_epochs=4).replace(num_samples=6, reproducible=True, max_concurrent=2), slots=2)
    assert tally.rungs == Rungs(4, (1, 2), 2, batch=2)
    for trial, fids, start in (("a", [20, 19, 18, 17], 0.0), ("b", [21, 20, 19, 18], 0.1),  # batch 1: complete
                               ("c", [25], 10.0), ("d", [19.5], 10.1)):  # batch 2: c stopped at epoch 1, d went on
        for epoch, fid in enumerate(fids, 1):
            tally.record(trial, {"epoch": epoch, "time_this_iter_s": 1.0, "iterations_since_restore": epoch,
                                 "pid": ord(trial) % 2, "reported_at": start + epoch, "fid": fid}, now=start + epoch)
        if trial != "d":
            tally.ended.add(trial)
    rank, recorded, current = tally.standing()
    assert rank == {"c": 0.2, "b": 0.4, "a": 0.6, "d": 0.8}
    assert recorded == ((0.4, 0.6), (0.4, 0.6)) and current == ((0.2, 0.8), ())
    # d beats what batch 1 holds at epoch 2 (c's value does not count there): it completes; batch 3's two trials
    # are cut against all four
    odds = tally.rungs.odds(2, recorded, running=((0.8, 1),), current=current, started=4)
    assert odds[0] == (1.0, 1.0, 1.0) and odds[1] == pytest.approx(odds[2], abs=0.03) and 0 < odds[1][1] < 1
    ended = Tally()
    ended.__dict__.update(tally.__dict__, ended={"a", "b", "c", "d"})
    assert ended.standing()[1:] == (((0.2, 0.4, 0.6, 0.8), (0.4, 0.6)), ((), ()))
    cost = tally.cost()
    assert tally.left(now=11.6) - SWEEP_END_S == time_left(tally.rungs, 6, 2, cost, [(1, 0.5, 0.8)], 4, recorded,
                                                           current)


def test_a_step_too_slow_to_time_at_the_trials_batch_is_timed_at_a_few_images(monkeypatch):
    """A full-size network on a CPU takes tens of seconds a step, and a Langevin draw hundreds of passes of it: the
    forecast then times one step, the evaluations and the draws at PROBE_BATCH images, and one score-network pass,
    and scales them. Forced here (the thresholds at 0) on a small NCSN, the scaled figures stay near the direct
    ones, and every Experiment of that measurement trains at PROBE_BATCH."""
    import torch

    import sweeps.forecast as forecast
    from genmodels.data import synthetic_images

    point = {"model_name": "ncsn", "model.arch": "unet", "model.width": 8, "model.unet_blocks": 1,
             "model.sigma_1": 20.0, "model.num_levels": 10, "model.langevin_steps": 4, "train.batch_size": 64,
             "train.steps_per_epoch": 4, "train.epochs": 2}
    spec = saved_spec_of()
    data = {"train": synthetic_images(256), "test": synthetic_images(128, seed=1)}
    cpu = torch.device("cpu")
    direct = forecast.measure(point, spec, data, cpu)
    batches = []

    class Recorded(forecast.Experiment):
        def __init__(self, cfg, *args, **kwargs):
            batches.append(cfg.train.batch_size)
            super().__init__(cfg, *args, **kwargs)

    monkeypatch.setattr(forecast, "Experiment", Recorded)
    monkeypatch.setattr(forecast, "SLOW_STEP_S", 0.0)
    monkeypatch.setattr(forecast, "SLOW_DRAW_S", 0.0)
    probed = forecast.measure(point, spec, data, cpu)
    assert batches == [forecast.PROBE_BATCH]
    for name in ("epoch", "end"):
        ratio = getattr(probed, name) / getattr(direct, name)
        assert 1 / 4 < ratio < 4, (name, probed, direct)
    assert 1 / 4 < probed.milestone[0] / direct.milestone[0] < 4, (probed, direct)
