"""--warm-start NAME (sweeps/warm_start.py): at the same budgets the old sweep's ended trials are told to TPE, which
then suggests where they scored well; at other budgets its best points are the new sweep's first trials; the
leaderboard marks them; bad input is one line, exit 2, before Ray. Old sweeps are written here as Tune leaves them
(tests/test_study.py's write_trial); the run with a real sweep is the slow test at the end."""
import math
from pathlib import Path

import pytest
import ray
from conftest import run_cli, saved_spec_of
from ray import tune
from test_study import write_trial

from sweeps import leaderboard, warm_start
from sweeps.spec import SweepSpec, UsageError
from sweeps.tuner import search_algorithm

BEST_BETA = 8.0
BETAS = [0.06 * 1.27 ** i for i in range(24)]  # 0.06 .. 15: the log-uniform range of the vae space's beta


def vae_spec(name: str, max_epochs: int = 4, **changes) -> SweepSpec:
    return saved_spec_of(name, space="vae", objectives=("test_bpd",), searched=("model.beta", "train.lr"),
                         max_epochs=max_epochs, **changes)


def old_sweep(tmp_path: Path, spec: SweepSpec | None = None, betas=BETAS) -> SweepSpec:
    """A finished sweep where test_bpd grows with beta's distance from BEST_BETA (log scale); half the trials were
    stopped by ASHA at epoch 1, so the told study holds pruned trials too."""
    spec = spec or vae_spec("old")
    spec.save(str(tmp_path))
    for i, beta in enumerate(betas):
        value = 5.0 + abs(math.log(beta / BEST_BETA))
        epochs = spec.max_epochs if i % 2 else 1
        write_trial(tmp_path / spec.name, f"t{i:07d}", {"model.beta": beta, "train.lr": 1e-3},
                    [value + 0.1 * (spec.max_epochs - e) for e in range(1, epochs + 1)])
    return spec


def suggested_betas(spec: SweepSpec, warm, n: int = 6) -> list[float]:
    searcher = search_algorithm(spec, warm)
    space = {"model_name": "vae", "train.epochs": spec.max_epochs, "model.beta": tune.loguniform(0.05, 16.0),
             "train.lr": tune.loguniform(1e-4, 3e-3)}
    searcher.set_search_properties(None, None, space)
    return [searcher.suggest(f"trial{i}")["model.beta"] for i in range(n)]


def test_at_the_same_budgets_the_old_trials_are_told_and_tpe_starts_where_they_scored_well(tmp_path):
    old = old_sweep(tmp_path)
    new = vae_spec("new")
    new = new.replace(constants={**new.constants, "train.seed": 1})
    warm = warm_start.plan(warm_start.load(str(tmp_path), "old", new), new)
    assert len(warm.told) == len(BETAS) and not warm.rerun  # the seed is not a budget
    states = {t.state.name for t in warm.told}
    assert states == {"COMPLETE", "PRUNED"} and all(t.user_attrs["warm_start"] for t in warm.told)
    assert warm.record() == {"sweep": old.name, "told": len(BETAS), "rerun": []}

    def distance(betas):  # how far TPE's suggestions are from where the told trials scored best
        return sum(abs(math.log(b / BEST_BETA)) for b in betas) / len(betas)

    told, cold = distance(suggested_betas(new, warm)), distance(suggested_betas(new, None))
    assert told < 0.6 * cold, (told, cold)  # 24 told trials take TPE past its 10 random start-up trials


def test_at_other_budgets_its_best_points_run_first(tmp_path):
    old_sweep(tmp_path)
    new = vae_spec("new", max_epochs=8).replace(num_samples=8)  # 8 epochs: the old values rank nothing here
    warm = warm_start.plan(warm_start.load(str(tmp_path), "old", new), new)
    assert not warm.told and warm.why_rerun == "train.epochs, ASHA's milestones"
    best = sorted((b for i, b in enumerate(BETAS) if i % 2), key=lambda b: abs(math.log(b / BEST_BETA)))[:2]
    assert [p["model.beta"] for p in warm.rerun] == best  # completed trials first, best first; 8 // 4 of them
    assert suggested_betas(new, warm, n=3)[:2] == best
    rows = [{"trial": f"vae_{i}", "params": {"model.beta": b, "train.lr": 1e-3}, "value": 5.0, "n": None,
             "best": None, "epochs": 8, "status": "completed", "extra": {},
             "warm_start": leaderboard.is_rerun_point({"model.beta": b, "train.lr": 1e-3}, warm.record())}
            for i, b in enumerate([best[0], 0.3])]
    assert [r["warm_start"] for r in rows] == [True, False]


def test_the_leaderboard_marks_rerun_points_and_says_what_was_told(tmp_path, capsys):
    old_sweep(tmp_path)
    new = vae_spec("new", max_epochs=8).replace(num_samples=8)
    warm = warm_start.plan(warm_start.load(str(tmp_path), "old", new), new)
    new = new.replace(warm_start=warm.record())
    new.save(str(tmp_path))
    write_trial(tmp_path / "new", "rerun001", {"model.beta": warm.rerun[0]["model.beta"], "train.lr": 1e-3}, [6.0] * 8)
    write_trial(tmp_path / "new", "tpe00001", {"model.beta": 0.3, "train.lr": 2e-4}, [7.0] * 8)
    assert SweepSpec.load(str(tmp_path), "new").warm_start == new.warm_start
    assert leaderboard.main(["--source", "local", "--name", "new", "--storage-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vae_rerun001 *" in out and "vae_tpe00001 *" not in out
    assert "warm start: * marks the 2 best point(s) of sweep old, rerun first at this sweep's budgets" in out
    assert leaderboard.warm_start_note({"sweep": "old", "told": 12, "rerun": []}).startswith(
        "warm start: the 12 ended trials of sweep old were told to TPE")


def test_a_point_outside_the_new_domains_is_refused(tmp_path):
    old_sweep(tmp_path, betas=[*BETAS, 50.0])  # 50 is outside beta's 0.05 .. 16
    outside = rf"its trial vae_t{len(BETAS):07d} has model.beta=50.0, outside this sweep's domain \(0.05 to 16\)"
    with pytest.raises(UsageError, match=f"--warm-start old: {outside}"):
        warm_start.plan(warm_start.load(str(tmp_path), "old", vae_spec("new")), vae_spec("new"))


def run_main(argv, capsys):
    import sweeps.run as run

    code = run.main(["--preset", "smoke", "--no-wandb", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("old, args, message", [
    (None, [], "--warm-start old: no sweep named 'old' under"),
    (saved_spec_of("old", space="iwae", objectives=("test_bpd",), searched=("model.k",), max_epochs=4), [],
     "--warm-start old: that sweep searched space 'iwae', this one 'vae'"),
    (vae_spec("old"), ["--metric", "fid"], "--warm-start old: that sweep ranked by test_bpd, this one by fid"),
    (vae_spec("old"), ["--seed-defaults"], "--warm-start old: this sweep searches nothing"),
    (vae_spec("old"), ["--resume", "old"], "--resume continues a sweep with its own history; --warm-start starts"),
])
def test_bad_warm_starts_are_one_line_before_ray(old, args, message, tmp_path, capsys):
    if old is not None:
        old_sweep(tmp_path, old)
    code, lines = run_main(["--warm-start", "old", "--storage-path", str(tmp_path), *args], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if old is None else ["old"])  # nothing new written


def test_a_point_outside_the_domains_stops_the_cli_before_ray(tmp_path, capsys):
    old_sweep(tmp_path, vae_spec("old"), betas=[50.0])
    code, lines = run_main(["--warm-start", "old", "--storage-path", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and "has model.beta=50.0, outside this sweep's domain" in lines[0], lines
    assert not ray.is_initialized() and sorted(p.name for p in tmp_path.iterdir()) == ["old"]


@pytest.mark.slow
def test_a_smoke_sweep_warm_starts_the_next_one(smoke_sweep, tmp_path):
    """smoke -> the same smoke budgets with more trials: the first sweep's ended trials are told, none rerun."""
    storage, _ = smoke_sweep
    r = run_cli(["sweeps/run.py", "--space", "vae", "--preset", "smoke", "--storage-path", str(storage), "--name",
                 "warm", "--num-samples", "2", "--warm-start", "smoke", "--no-wandb"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    told = SweepSpec.load(str(storage), "warm").warm_start["told"]
    assert told >= 4 and f"gensweep: warm start from smoke: its {told} ended trials told to TPE" in r.stdout
    assert f"warm start: the {told} ended trials of sweep smoke were told to TPE" in r.stdout
