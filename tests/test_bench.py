"""The benchmark harness on CPU at CI sizes, and the engine's fast-path options (compile, memory format, sync-free
divergence check) leaving training unchanged."""
import copy
import json
import statistics
import time

import pytest
import torch
from conftest import make_trainer
from torch import nn

import genmodels.bench.suite as bench
import genmodels.bench.training as training
import genmodels.engine as engine
from genmodels.data import Batches, synthetic_images
from genmodels.engine import Diverged, seed_everything
from genmodels.registry import build_model

TINY_VAE = dict(arch="conv-small", width=4, latent=8, batch_size=16, steps_per_epoch=3, lr=1e-3)
TINY_NCSN = dict(arch="unet", width=8, unet_blocks=1, num_levels=3, batch_size=8, steps_per_epoch=3, lr=1e-3)


@pytest.fixture(scope="module")
def images():
    return synthetic_images(64, seed=0), synthetic_images(32, seed=1)


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


def test_bench_models_match_the_sweep_presets():
    """BENCH_MODELS copies the sweeps' presets (genmodels cannot import sweeps.spaces, which imports ray)."""
    from ray.tune.search.sample import Categorical, Domain

    from sweeps.spaces import SPACES

    spaces = {"vae": "vae", "resnet_vae": "resnet_vae", "iwae": "iwae", "dfc": "dfc", "vqvae": "vqvae",
              "vqvae_prior": "vqvae", "ncsn": "ncsn", "ncsn_refinenet": "ncsn"}
    differs = {("vqvae_prior", "stage1_epochs"), ("vqvae_prior", "epochs"),  # starts at the second stage
               ("vqvae_prior", "steps_per_epoch"),
               ("ncsn_refinenet", "arch"), ("ncsn_refinenet", "batch_size"),  # the smoke preset has no refinenet
               ("dfc", "vgg_weights")}  # random weights: same FLOPs, no download
    assert set(spaces) == set(bench.BENCH_MODELS)
    for name, (model, full, small) in bench.BENCH_MODELS.items():
        space = SPACES[spaces[name]]
        assert space.model == model
        for size, preset in (("full", full), ("smoke", small)):
            fixed = {**space.params, **space.presets[size].config}
            for key, value in preset.items():
                if (name, key) in differs or key not in fixed:
                    continue
                expected = fixed[key]
                if isinstance(expected, Categorical):
                    assert value in expected.categories, (name, size, key)
                elif not isinstance(expected, Domain):
                    assert value == expected, (name, size, key)
            for key in ("batch_size", "arch", "width", "epochs"):  # what sets the work: never left to a default
                if key in fixed and not isinstance(fixed[key], Domain) and (name, key) not in differs:
                    assert preset.get(key) == fixed[key], (name, size, key)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_trainer_matches_a_plain_eager_loop(images, memory_format):
    """compile=False, and channels_last on CPU, train the same as a hand-written loop over the same batches:
    Adam, clipping, EMA with warm-up and BatchNorm statistics, all with the engine's RNG order."""
    train, test = images
    params = dict(TINY_VAE, ema_decay=0.9, grad_clip=1.0, seed=5, compile=False, memory_format=memory_format)
    trainer = make_trainer("vae", params, train, test, device="cpu")
    assert trainer.compiled_loss is None and trainer.channels_last == (memory_format == "channels_last")
    got = trainer.train_epoch()

    seed_everything(5)
    model = build_model("vae", params, channels=3)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step, x in enumerate(Batches(train, 16, "cpu", shuffle=True, flip=True, seed=5).epoch(3)):
        loss, logs = model.loss(x)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(0.9, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
            for b_ema, b in zip(ema.buffers(), model.buffers()):
                b_ema.copy_(b)
        losses.append(loss.item())

    # The engine averages the logged losses in fp32, the loop above in float64.
    if memory_format == "channels_last":
        # Convolutions sum in another order, and Adam's first steps are about lr * sign(grad): a conv bias before
        # BatchNorm, whose gradient is rounding noise, moves differently without changing any output. So: the loss.
        assert got["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-4)
        return
    assert got["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    for (name, a), b in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    # The engine's EMA is ema * decay + p * (1 - decay) with the decay on the device (graph-safe), lerp's rounding
    # differs from it in the last bit.
    for (name, a), b in zip(trainer.ema.model.state_dict().items(), ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_channels_last_weights_and_same_loss_as_contiguous_for_groupnorm_unet(images):
    train, test = images
    results = {}
    for fmt in ("contiguous", "channels_last"):
        t = make_trainer("ncsn", dict(TINY_NCSN, memory_format=fmt, ema_decay=0.99), train, test, device="cpu")
        conv = t.model.net.stem.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == (fmt == "channels_last")
        results[fmt] = (t.train_epoch()["train_loss"], t.evaluate()["test_dsm_loss"])
    assert results["channels_last"][0] == pytest.approx(results["contiguous"][0], rel=1e-4)
    assert results["channels_last"][1] == pytest.approx(results["contiguous"][1], rel=1e-4)


def test_auto_memory_format_is_contiguous_on_cpu_and_bad_names_fail(images):
    assert engine.use_channels_last("auto", torch.device("cuda")) and not engine.use_channels_last(
        "auto", torch.device("cpu"))
    t = make_trainer("vae", TINY_VAE, *images, device="cpu")
    assert not t.channels_last and t.model.encoder[0].weight.is_contiguous()
    with pytest.raises(ValueError, match="memory_format"):
        make_trainer("vae", dict(TINY_VAE, memory_format="nhwc"), *images, device="cpu")


def test_channels_last_checkpoint_resumes_in_nchw_with_matching_optimizer_layout(images, tmp_path):
    train, test = images
    a = make_trainer("vae", dict(TINY_VAE, memory_format="channels_last", seed=2), train, test, device="cpu")
    a.train_epoch()
    a.save(tmp_path / "state.pt")
    after_a = a.train_epoch()["train_loss"]
    b = make_trainer("vae", dict(TINY_VAE, memory_format="contiguous", seed=9), train, test, device="cpu")
    b.load(tmp_path / "state.pt")
    assert set(b.state_dict()["model"]) == set(a.state_dict()["model"])
    for p in b.model.parameters():
        for value in b.optimizer.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert value.stride() == p.stride()
    assert b.train_epoch()["train_loss"] == pytest.approx(after_a, rel=1e-4)


def test_compile_keeps_state_dict_keys_and_the_original_module(images):
    """torch.compile wraps the loss function only: no `_orig_mod.` prefix in checkpoints, the same module trained.
    (Compiling itself takes about a minute on a CPU; docs/PERFORMANCE.md has the measured compile time.)"""
    plain = make_trainer("vae", TINY_VAE, *images, device="cpu")
    compiled = make_trainer("vae", dict(TINY_VAE, compile=True), *images, device="cpu")
    assert compiled.compiled_loss is not None and isinstance(compiled.model, type(plain.model))
    keys = list(compiled.state_dict()["model"])
    assert keys == list(plain.state_dict()["model"]) and not any("_orig_mod" in k for k in keys)
    assert compiled.state_dict()["config"]["train.compile"] is True
    plain.model.load_state_dict(compiled.state_dict()["model"])  # loads both ways, strictly


def test_divergence_is_caught_at_the_check_after_it(images, monkeypatch):
    """The loss sent to the host at a check is read at the next one (no wait in between): a NaN from step 1 on
    raises within two check intervals, before the epoch ends."""
    monkeypatch.setattr(engine, "DIVERGENCE_CHECK_EVERY", 2)
    t = make_trainer("vae", dict(TINY_VAE, steps_per_epoch=50), *images, device="cpu")
    steps = []

    def nan_loss(x):
        steps.append(1)
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(t.model, "loss", nan_loss)
    with pytest.raises(Diverged, match="loss is nan at step 2"):
        t.train_epoch()
    assert len(steps) == 4  # read at step 4, the check after step 2's


def test_logged_values_are_averaged_per_name(images, monkeypatch):
    t = make_trainer("vae", TINY_VAE, *images, device="cpu")
    counter = iter(range(100))

    def loss(x):
        i = float(next(counter))
        w = t.model.to_posterior.weight
        return (w.sum() * 0 + i), {"a": torch.tensor(2 * i), "b": torch.tensor(i, dtype=torch.bfloat16)}

    monkeypatch.setattr(t.model, "loss", loss)
    metrics = t.train_epoch()
    assert metrics == {"train_loss": 1.0, "train_a": 2.0, "train_b": 1.0}  # means of 0, 1, 2


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
    import genmodels.bench.pack as pack

    monkeypatch.setattr(pack.shutil, "which", lambda name: None)
    monkeypatch.setattr(pack, "run_concurrent_trials", lambda n, *a, **k: [
        dict(rank=r, start=0.0, end=1.0, images=10, peak_memory_bytes=None, graph_captured=False) for r in range(n)])
    report = bench.main(["pack", "--device", "cpu", "--trials", "2", "--cuda-graphs", "on,off", "--mps"])
    rows = [(r["cuda_graphs"], r["mps"], r["trials"], r["error"]) for r in report["rows"]]
    assert rows[:4] == [(False, False, 1, None), (False, False, 2, None)] * 2
    assert [r[3] for r in rows[4:]] == ["CUDA MPS not available: nvidia-cuda-mps-control is not on PATH"] * 2
    assert report["rows"][1]["speedup_vs_one"] == pytest.approx(2.0)


def test_gpus_per_trial_auto_falls_back_to_cpu_with_one_line(capsys):
    from sweeps.cli import parse_args
    from sweeps.packing import auto_gpus_per_trial

    assert parse_args(["--gpus-per-trial", "auto"]).gpus_per_trial == "auto"
    assert parse_args(["--gpus-per-trial", "0.25"]).gpus_per_trial == 0.25
    assert auto_gpus_per_trial("vae", {"batch_size": 8}, {"train": None, "test": None}) == 0.0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "auto" in out[0] and "GPU" in out[0]


def test_worst_case_configs_take_the_largest_numbers_and_every_string():
    from ray import tune

    from sweeps.packing import worst_case_configs

    config = {"latent": tune.choice([32, 256, 64]), "arch": tune.choice(["unet", "refinenet"]),
              "lr": tune.loguniform(1e-4, 1e-2), "batch_size": 128, "k": tune.randint(1, 51)}
    configs = worst_case_configs(config)
    assert sorted(c["arch"] for c in configs) == ["refinenet", "unet"]
    assert all(c["latent"] == 256 and c["k"] == 50 and c["batch_size"] == 128 for c in configs)
    assert all(1e-4 <= c["lr"] <= 1e-2 for c in configs)


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
    subprocess.run([sys.executable, "-m", "genmodels.bench", "all", "--device", "cpu", "--models", "vae",
                    "--budget-s", "30", "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    elapsed = time.monotonic() - start
    report = json.loads(out.read_text())
    assert [r["benchmark"] for r in report["runs"]] == ["train", "pack", "fid", "flops"]
    assert {r["status"] for r in report["runs"]} <= {"ok", "timed out", "skipped", "failed"}
    assert any(r["status"] == "ok" and r["report"]["rows"] for r in report["runs"])
    assert report["elapsed_s"] <= 30 + 3 and elapsed < 30 + 30  # the budget holds (process start-up aside)


def test_train_writes_each_row_as_it_is_measured(tmp_path):
    from argparse import Namespace

    from genmodels.bench.training import write_partial

    out = tmp_path / "train.json"
    write_partial(Namespace(json=out), [{"model": "vae"}])
    assert json.loads(out.read_text()) == {"benchmark": "train", "partial": True, "rows": [{"model": "vae"}]}


def test_mps_is_seen_where_its_control_pipe_is(tmp_path):
    from sweeps.packing import mps_running

    assert not mps_running({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    (tmp_path / "control").touch()
    assert mps_running({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})


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
    from genmodels.bench.trial import PHASES, PLANS, main

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
    from genmodels.bench.trial import plan_seconds

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


def test_trial_presets_match_the_sweeps():
    """The trial benchmark's schedules, evaluation settings, FID ladders and data sizes are the sweeps' own."""
    import dataclasses

    from ray.tune.search.sample import Domain

    from genmodels.bench.common import SMOKE_IMAGES, TRIAL_PRESETS, bench_config
    from genmodels.bench.trial import FID_LADDERS, STEP_FRACTIONS, asha_milestones
    from genmodels.registry import trial_config
    from sweeps.budgets import ASHASettings, FIDSettings
    from sweeps.spaces import FID_SETTINGS, SMOKE_DATA, SPACES

    spaces = {"vae": "vae", "resnet_vae": "resnet_vae", "iwae": "iwae", "dfc": "dfc", "vqvae": "vqvae",
              "vqvae_prior": "vqvae", "ncsn": "ncsn", "ncsn_refinenet": "ncsn"}
    assert set(TRIAL_PRESETS) == set(bench.BENCH_MODELS)
    for name, presets in TRIAL_PRESETS.items():
        space = SPACES[spaces[name]]
        for size, trial_preset in zip(("full", "smoke"), presets):
            preset = space.presets[size]
            assert (trial_preset.grace_period, trial_preset.reduction_factor) == \
                (preset.grace_period, preset.reduction_factor), (name, size)
            assert trial_preset.metric == space.metric, name
            model, params = bench_config(name, "full" if size == "full" else "small")
            flat = trial_config({**params, **trial_preset.config}, model).flat()
            fixed = {**space.params, **preset.config}
            for key in ("eval_images", "eval_k", "final_eval_k", "eval_subset", "langevin_steps"):
                if key in fixed and not isinstance(fixed[key], Domain):
                    assert next(v for k, v in flat.items() if k.endswith(f".{key}")) == fixed[key], (name, size, key)
    for size, (ladder, final) in FID_LADDERS.items():
        settings = FID_SETTINGS["smoke" if size == "small" else "full"]
        assert (settings.ladder, settings.final) == (ladder, final)
    assert {f.name: f.default for f in dataclasses.fields(FIDSettings)}["step_fractions"] == STEP_FRACTIONS
    assert SMOKE_IMAGES == (SMOKE_DATA["train_size"], SMOKE_DATA["test_size"])
    for epochs, grace, rf in [(150, 10, 3), (50, 5, 3), (4, 1, 2), (90, 61, 3), (30, 61, 3), (10, 1, 3)]:
        assert asha_milestones(epochs, grace, rf) == ASHASettings(epochs, min(grace, epochs), rf).milestones


def _write_results(folder, trials):
    """result.json files as Tune writes them: one JSON report a line."""
    for name, reports in trials.items():
        (folder / name).mkdir(parents=True)
        lines = [json.dumps({"timestamp": ts, "time_this_iter_s": it, "time_total_s": total, "date": "d"})
                 for ts, it, total in reports]
        (folder / name / "result.json").write_text("\n".join(lines) + "\n")


def test_sweep_busy_figures_from_the_trials_result_files(tmp_path):
    from sweeps.bench_overhead import busy_figures, main, trial_spans

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
