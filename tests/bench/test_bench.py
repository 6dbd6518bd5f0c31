"""The benchmarks (bench/) on the CPU at CI sizes: each one's report, the rows it keeps when stopped, `bench all`'s
budget, the trial benchmark's plans and `bench overhead`'s sweep figures."""
import json
import statistics
import time

import pytest
import torch
from conftest import make_trainer
from torch import nn

import bench.suite as bench
import bench.training as training

TINY_NCSN = dict(arch="unet", width=8, unet_blocks=1, num_levels=3, batch_size=8, steps_per_epoch=3, lr=1e-3)


def _recomputed_rate(run, unit):
    """A rate from a run's raw timings: batch * steps / median window (training), steps / median window (sampling)."""
    per_window = run["steps"] * (run["batch_size"] if unit == "images/s" else 1)
    return per_window / statistics.median(run["seconds"])


@pytest.mark.slow
def test_train_bench_reports_fast_over_baseline_from_two_measured_runs(tmp_path, monkeypatch):
    calls = {"baseline": [], "fast": []}
    real_baseline, real_fast = training.baseline_training, training.fast_training
    monkeypatch.setattr(training, "baseline_training",
                        lambda name, *a, **k: calls["baseline"].append(name) or real_baseline(name, *a, **k))
    monkeypatch.setattr(training, "fast_training",
                        lambda name, *a, **k: calls["fast"].append(name) or real_fast(name, *a, **k))
    out = tmp_path / "train.json"
    bench.main(["train", "--device", "cpu", "--models", "vae,ncsn", "--size", "small", "--steps", "2", "--warmup",
                "1", "--repeats", "2", "--workers", "1", "--sampling-steps", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert calls == {"baseline": ["vae", "ncsn"], "fast": ["vae", "ncsn"]}  # both modes ran for every model
    assert report["benchmark"] == "train" and report["device"] == "cpu" and report["size"] == "small"
    assert report["peak_flops"] > 0 and "measured" in report["peak_source"]
    assert {"torch", "date", "threads", "load_average"} <= set(report)
    rows = {(r["model"], r["what"]): r for r in report["rows"]}
    assert set(rows) == {("vae", "training"), ("ncsn", "training"), ("ncsn", "sampling (Langevin steps)")}
    for row in rows.values():
        base, fast = row["baseline_run"], row["fast_run"]
        assert row["baseline"] > 0 and row["fast"] > 0
        assert row["speedup"] == pytest.approx(row["fast"] / row["baseline"], rel=1e-12)
        # each figure is its own run's measurement: recomputed from that run's own windows
        assert row["baseline"] == pytest.approx(_recomputed_rate(base, row["unit"]), rel=1e-9)
        assert row["fast"] == pytest.approx(_recomputed_rate(fast, row["unit"]), rel=1e-9)
        assert len(base["seconds"]) == len(fast["seconds"]) == 2 and base["seconds"] != fast["seconds"]
        assert row["gflops_per_image"] > 0
        assert row["mem_baseline_mib"] is None and row["mem_fast_mib"] is None  # no GPU memory on a CPU
        rate_to_flops = row["gflops_per_image"] * 1e9 / report["peak_flops"]
        per_second = row["batch_size"] if row["unit"] == "steps/s" else 1
        assert row["mfu_fast"] == pytest.approx(rate_to_flops * row["fast"] * per_second)
    train = rows[("vae", "training")]
    assert train["fast_run"]["steps"] == 2 and train["batch_size"] == 64  # the small preset's batch


def test_train_bench_baseline_only_has_no_ratio(tmp_path):
    report = bench.main(["train", "--device", "cpu", "--models", "vae", "--size", "small", "--steps", "1",
                         "--warmup", "1", "--repeats", "1", "--workers", "0", "--baseline", "--batch-size", "8"])
    (row,) = report["rows"]
    assert row["baseline"] > 0 and row["fast"] is None and row["speedup"] is None and row["batch_size"] == 8


def test_flop_count_of_a_linear_model_is_exact(monkeypatch):
    """FlopCounterMode through flops_per_image: one Linear 3072 -> 1 costs 2*3072 forward, twice that backward."""

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3072, 1, bias=False)

        def start_epoch(self, epoch):
            pass

        def loss(self, x):
            return self.fc(x.float().flatten(1)).sum(), {}

    import genmodels.registry as registry

    monkeypatch.setattr(registry, "build_model", lambda *a, **k: Linear())
    flops = bench.flops_per_image("linear", {}, torch.device("cpu"), batch=4)
    # forward x @ W^T: 2*3072 per image; backward: grad of W only (the input needs none): 2*3072
    assert flops == 2 * 3072 * 2


@pytest.mark.slow
def test_pack_bench_runs_trials_in_parallel_processes(tmp_path):
    out = tmp_path / "pack.json"
    report = bench.main(["pack", "--device", "cpu", "--model", "vae", "--trials", "2", "--steps", "2", "--warmup",
                         "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    one, two = report["rows"]
    assert (one["trials"], two["trials"]) == (1, 2)  # one trial alone is always measured, for the ratio
    assert one["error"] is None and two["error"] is None
    assert len(two["runs"]) == 2 and {r["rank"] for r in two["runs"]} == {0, 1}
    for row in (one, two):
        window = max(r["end"] for r in row["runs"]) - min(r["start"] for r in row["runs"])
        assert row["aggregate_images_per_s"] == pytest.approx(sum(r["images"] for r in row["runs"]) / window)
    assert two["speedup_vs_one"] == pytest.approx(two["aggregate_images_per_s"] / one["aggregate_images_per_s"])
    assert "not" in report["note"] and "GPU" in report["note"]


def test_pack_bench_says_why_mps_was_not_measured(monkeypatch):
    """--mps on a machine without NVIDIA's MPS control: one row per count saying so, the other variants measured."""
    import bench.pack as pack

    monkeypatch.setattr(pack.shutil, "which", lambda name: None)
    monkeypatch.setattr(pack, "run_concurrent_trials", lambda n, *a, **k: [
        dict(rank=r, start=0.0, end=1.0, images=10, peak_memory_bytes=None, graph_captured=False) for r in range(n)])
    report = bench.main(["pack", "--device", "cpu", "--trials", "2", "--cuda-graphs", "on,off", "--mps"])
    rows = [(r["cuda_graphs"], r["mps"], r["trials"], r["error"]) for r in report["rows"]]
    assert rows[:4] == [(False, False, 1, None), (False, False, 2, None)] * 2
    assert [r[3] for r in rows[4:]] == ["CUDA MPS not available: nvidia-cuda-mps-control is not on PATH"] * 2
    assert report["rows"][1]["speedup_vs_one"] == pytest.approx(2.0)


@pytest.mark.slow
def test_bench_all_keeps_to_its_budget_and_records_every_step(tmp_path):
    """`bench all` runs each benchmark in a process of its own with a share of the budget: a step that runs over is
    stopped (timed out), a step with too little time left is skipped, and the JSON has a record of each."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "all.json"
    start = time.monotonic()
    # 30 s: enough for the CPU's small vae train step (its share, 18 s) on a loaded 2-core CI machine
    subprocess.run([sys.executable, "-m", "bench", "all", "--device", "cpu", "--models", "vae",
                    "--budget-s", "30", "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    elapsed = time.monotonic() - start
    report = json.loads(out.read_text())
    assert [r["benchmark"] for r in report["runs"]] == ["train", "pack", "fid", "flops"]
    assert {r["status"] for r in report["runs"]} <= {"ok", "timed out", "skipped", "failed"}
    assert any(r["status"] == "ok" and r["report"]["rows"] for r in report["runs"])
    assert report["elapsed_s"] <= 30 + 3 and elapsed < 30 + 30  # the budget holds (process start-up aside)


def test_train_writes_each_row_as_it_is_measured(tmp_path):
    from argparse import Namespace

    from bench.training import write_partial

    out = tmp_path / "train.json"
    write_partial(Namespace(json=out), [{"model": "vae"}])
    assert json.loads(out.read_text()) == {"benchmark": "train", "partial": True, "rows": [{"model": "vae"}]}


def test_sampling_bench_compares_bf16_with_fp32_on_one_checkpoint(tmp_path, monkeypatch):
    """Three sample runs of one checkpoint (fp32 seeds 0 and 1, bf16 seed 0), each scored against the test split;
    the report gives bf16's FID change beside the change a seed alone makes."""
    from genmodels.data import synthetic_images

    monkeypatch.setenv("GENSWEEP_FID_CACHE", str(tmp_path / "fid-cache"))
    images = synthetic_images(64)
    trainer = make_trainer("ncsn", dict(TINY_NCSN, dataset="synthetic", langevin_steps=2), images, images[:16],
                           device="cpu")
    trainer.train_epoch()
    path = trainer.save(tmp_path / "state.pt")
    report = bench.main(["sampling", "--device", "cpu", "--checkpoint", str(path), "--n", "16", "--network",
                         "standin", "--steps-per-level", "1"])
    rows = report["rows"]
    assert [(r["precision"], r["seed"]) for r in rows] == [("fp32", 0), ("fp32", 1), ("bf16", 0)]
    assert all(r["fid"] > 0 and r["chain_steps_per_s"] > 0 and r["chains_per_batch"] == 16 for r in rows)
    assert report["fid_bf16_minus_fp32"] == pytest.approx(rows[2]["fid"] - rows[0]["fid"])
    assert report["fid_seed_noise"] == pytest.approx(abs(rows[1]["fid"] - rows[0]["fid"]))
    assert rows[1]["fid"] != rows[0]["fid"]  # another seed, other samples
    assert rows[2]["fid"] != rows[0]["fid"]  # bf16 changed what was sampled


def test_profile_bench_breaks_a_step_down_by_op():
    report = bench.main(["profile", "--device", "cpu", "--model", "vae", "--steps", "2", "--warmup", "1", "--top",
                         "5"])
    rows = report["rows"]
    assert 0 < len(rows) <= 5 and report["time"] == "host" and report["cuda_graphs"] is False
    assert all(r["share"] > 0 for r in rows) and sum(r["share"] for r in rows) <= 1 + 1e-9
    assert any("conv" in r["op"] for r in rows)  # a conv VAE's step is mostly convolutions
    assert report["total_ms_per_step"] >= sum(r["self_ms_per_step"] for r in rows) - 1e-6


def test_trial_bench_times_every_phase_of_both_plans(tmp_path):
    from bench.trial import PHASES, PLANS, main

    out = tmp_path / "trial.json"
    main(["--model", "vae", "--preset", "small", "--device", "cpu", "--epochs", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["benchmark"] == "trial" and report["preset"] == "small" and report["milestones"] == [1, 2, 4]
    assert report["steps"] == report["real_steps"] == 8 and report["images"]["train"] == 512  # a real smoke epoch
    assert set(report["plans"]) == set(PLANS)
    for plan in report["plans"].values():
        assert set(plan["seconds"]) == set(plan["shares"]) == set(PHASES)
        assert all(s >= 0 for s in plan["seconds"].values()) and plan["seconds"]["train"] > 0
        assert sum(plan["shares"].values()) == pytest.approx(1)
        assert plan["total_s"] == pytest.approx(sum(plan["seconds"].values()))
    assert report["process_start_s"] > 0


def test_trial_plans_schedule_each_phase_as_the_trainable_does():
    from bench.trial import plan_seconds

    unit = dict(startup=1.0, train=10.0, eval_full=5.0, eval_subset=1.0, grids=2.0, grids_final=3.0, checkpoint=1.0,
                final_eval=7.0, fid_rungs=[4.0, 6.0], fid_final=8.0)
    milestones = (1, 3, 9)  # the last one is the end: the final FID, not rung 2's
    old = plan_seconds(unit, 9, milestones, "per-epoch", 300.0)
    assert old == dict(startup=1.0, train=90.0, evaluation=45.0, fid=18.0, grids=8 * 2.0 + 3.0, checkpoint=9.0,
                       final_eval=7.0)
    new = plan_seconds(unit, 9, milestones, "milestones", 1e9)
    assert new == dict(old, evaluation=3 * 5.0 + 6 * 1.0, grids=2 * 2.0 + 3.0, checkpoint=3.0)
    # ranked on a cheap metric: the milestones and the end evaluate the whole split without the bound
    cheap = plan_seconds({**unit, "eval_test": 0.5}, 9, milestones, "milestones", 1e9, "eval_test")
    assert cheap == dict(new, evaluation=3 * 0.5 + 6 * 1.0)
    # every 20 s: epochs 2, 4, 6, 8 add 11 s each since the last save, so 5 and 7 save too
    assert plan_seconds(unit, 9, milestones, "milestones", 20.0)["checkpoint"] == 5.0
    assert plan_seconds(unit, 9, milestones, "milestones", 0.0)["checkpoint"] == 9.0  # 0: every epoch


def _write_results(folder, trials):
    """result.json files as Tune writes them: one JSON report a line."""
    for name, reports in trials.items():
        (folder / name).mkdir(parents=True)
        lines = [json.dumps({"timestamp": ts, "time_this_iter_s": it, "time_total_s": total, "date": "d"})
                 for ts, it, total in reports]
        (folder / name / "result.json").write_text("\n".join(lines) + "\n")


def test_sweep_busy_figures_from_the_trials_result_files(tmp_path):
    from bench.overhead import busy_figures, main, trial_spans

    # (timestamp, time_this_iter_s, time_total_s) per report: a runs 98-104, b 98-110, c 105-108, d 110-112
    _write_results(tmp_path, {"a": [(100, 2, 2), (104, 4, 6)], "b": [(101, 3, 3), (110, 9, 12)],
                              "c": [(106, 1, 1), (108, 2, 3)], "d": [(112, 2, 2)]})
    spans = {s["trial"]: (s["start"], s["end"], s["own_s"]) for s in trial_spans(tmp_path)}
    assert spans == {"a": (98, 104, 6), "b": (98, 110, 12), "c": (105, 108, 3), "d": (110, 112, 2)}
    report = main(["--results", str(tmp_path), "--slots", "2", "--json", str(tmp_path / "busy.json")])
    assert report["trials"] == 4 and report["trial_s"] == 23 and report["span_s"] == 14 and report["wall_s"] is None
    assert report["busy_fraction"] == pytest.approx(23 / (2 * 14))
    assert report["peak_concurrency"] == 2  # d starts the second b ends: no overlap
    assert report["gaps_s"] == [1, 2, 0]  # after a (104 -> c at 105), c (108 -> d at 110), b (110 -> d)
    assert json.loads((tmp_path / "busy.json").read_text())["busy_fraction"] == report["busy_fraction"]
    back_to_back = [{"start": 0, "end": 10, "own_s": 10}, {"start": 10, "end": 20, "own_s": 10}]
    assert busy_figures(back_to_back, 1)["peak_concurrency"] == 1
    assert busy_figures(back_to_back, 1)["busy_fraction"] == 1


def test_the_forecast_bench_spreads_the_time_left_over_the_outcomes_the_estimator_expects():
    """`bench forecast`'s outcome spread: sweeps simulated from the progress tally's state by the estimator's own
    model. On one slot the time left is linear in each trial's odds, so the progress line's figure is their mean;
    a trial that can only end one way leaves no spread; best_hit is the largest share one number is within 30% of."""
    from bench.forecast import best_hit, outcomes_left
    from sweeps.plan import SWEEP_END_S, Rungs
    from sweeps.progress import Tally

    tally = Tally()
    tally.rungs, tally.trials, tally.slots, tally.metric, tally.sign = Rungs(4, (1, 2), 2), 6, 1, "loss", -1.0
    for trial, pid, at, seconds in (("a", 1, 3.0, [3.0, 1.0, 1.0, 4.0]), ("b", 2, 3.5, [3.5, 1.5])):
        for epoch, s in enumerate(seconds, 1):
            at += s
            tally.record(trial, {"epoch": epoch, "time_this_iter_s": s, "iterations_since_restore": epoch,
                                 "pid": pid, "reported_at": at, "loss": 1.0 + ord(trial) / 100}, now=at)
        tally.ended.add(trial)
    tally.record("c", {"epoch": 1, "time_this_iter_s": 2.0, "iterations_since_restore": 1, "pid": 1,
                       "reported_at": 13.0, "loss": 0.5}, now=13.0)
    outcomes = outcomes_left(tally, now=13.0, sweeps=4000)
    assert outcomes == sorted(outcomes) and len(set(outcomes)) > 3  # 3 trials still to start: several endings
    assert statistics.mean(outcomes) == pytest.approx(tally.left(now=13.0), rel=0.03)
    tally.trials = 3  # none to start; c, the best at epoch 1, beats what ASHA holds at epoch 2: it completes
    alone = set(outcomes_left(tally, now=13.0))
    # its epochs 2-4 at 1 s (a's epoch 3), the cut at 2's 0.25 s more (a's and b's epoch 2), the end's 3 s more; then
    # the sweep's end
    assert len(alone) == 1 and alone.pop() == pytest.approx(tally.left(now=13.0)) == pytest.approx(
        3 + 0.25 + 3 + SWEEP_END_S)
    assert best_hit([1.0, 1.2, 1.8, 3.0]) == 0.75 and best_hit([1.0, 1.8]) == 1.0 and best_hit([1.0, 1.9]) == 0.5


def test_the_forecast_bench_measures_the_time_left_to_the_sweeps_end(tmp_path):
    """The sweep's end is when its driver wrote driver.json (Ray stopped, the results about to print), which is later
    than its last report; a sweep kept without one ends at its last report."""
    import os

    from bench.forecast import sweep_end

    trial = tmp_path / "vae_a"
    trial.mkdir()
    (trial / "result.json").write_text("".join(json.dumps({"epoch": e, "reported_at": 100.0 + e}) + "\n"
                                               for e in (1, 2)))
    assert sweep_end(tmp_path) == 102.0
    (tmp_path / "driver.json").write_text("{}")
    os.utime(tmp_path / "driver.json", (103.5, 103.5))
    assert sweep_end(tmp_path) == 103.5


def test_the_forecast_bench_measures_each_time_left_the_sweep_printed(tmp_path):
    """Each progress line a sweep prints, timed as it comes, against the sweep's end from that moment; other lines
    and the line before the first reports (no figure yet) are not."""
    import sys

    from bench.forecast import printed_time_left, timed_lines

    script = tmp_path / "sweep.py"
    script.write_text("import sys, time\n"
                      "print('== Status ==')\n"
                      "print('gensweep: 0.2 s elapsed, 0 of 8 trials ended; time left: once the first trials report')\n"
                      "sys.stdout.flush(); time.sleep(0.3)\n"
                      "print('gensweep: 6.2 s elapsed, 2 of 8 trials ended; about 1 min 05 s left (0.5 s an epoch')\n"
                      "print('oops', file=sys.stderr); sys.exit(3)\n")
    lines, code, err = timed_lines([sys.executable, str(script)])
    assert code == 3 and err == "oops\n" and len(lines) == 3
    assert lines[2][0] - lines[1][0] >= 0.25  # each line timed when it came, not when the process ended
    rows = printed_time_left(lines, end=lines[2][0] + 50.0)
    assert rows == [{"at": "2/8 ended", "said_s": 65.0, "actual_s": 50.0, "error_%": pytest.approx(30.0)}]


def test_the_forecast_replay_sets_the_trial_epochs_expected_left_against_those_trained(tmp_path):
    """At a quarter and half of the trials ended, the trial-epochs the estimator expected still to train, against
    those the sweep then trained (each trial's last epoch, less what it had reported by then): summed over many
    sweeps, they say whether its model of ASHA's cuts is calibrated."""
    from bench.forecast import replayed_time_left
    from sweeps import cli
    from sweeps.spec import SweepSpec

    args = cli.parse("run", ["--space", "vae", "--preset", "smoke", "--num-samples", "4", "--name", "forecast",
                             "--storage-path", str(tmp_path)])
    spec = SweepSpec.from_args(args, str(tmp_path))
    assert (spec.asha.max_t, tuple(m for m in spec.milestones if m < spec.asha.max_t)) == (4, (1, 2))
    trials = {"a": (1, [1.0, 2.0, 3.0, 4.0]), "b": (2, [1.5]), "c": (2, [2.5, 3.5]), "d": (1, [5.0])}
    for name, (pid, times) in trials.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text("".join(json.dumps(
            {"epoch": e, "time_this_iter_s": 1.0, "iterations_since_restore": e, "pid": pid, "reported_at": at,
             "test_bpd": 5.0 - e / 10 - (name == "a")}) + "\n" for e, at in enumerate(times, 1)))
    quarter, half = replayed_time_left(tmp_path, spec, 2, end=7.0)
    # a quarter: b has ended (1 epoch); a has reported epoch 1. Then: a's 3 more, c's 2 and d's 1
    assert (quarter["at"], quarter["epochs_trained_after"]) == ("1/4 ended", 6)
    # half: c has ended too, a is at epoch 3, past both cuts; then a's last epoch and d's one
    assert (half["at"], half["epochs_trained_after"]) == ("2/4 ended", 2)
    assert 2.0 < half["epochs_left"] < 1 + 4  # a's last, and d's expected: at least its first epoch, at most four
    assert quarter["epochs_left"] > half["epochs_left"]
