"""SweepSpec: one description of a sweep, saved and read back whole; ASHA's rungs from one place."""
from __future__ import annotations

import json
import re

import pytest
from ray.tune.schedulers import ASHAScheduler

from sweeps import cli, driver
from sweeps.spec import SWEEP_FILE, ASHASettings, FIDSettings, SweepSpec, UsageError
from sweeps.tuner import asha_scheduler


def new_spec(tmp_path, *flags: str) -> SweepSpec:
    args = cli.parse("run", ["--space", "vae", "--preset", "smoke", "--name", "s", "--storage-path", str(tmp_path),
                           *flags])
    return SweepSpec.from_args(args, str(tmp_path))


def test_a_saved_spec_loads_as_it_was(tmp_path):
    spec = new_spec(tmp_path, "--objectives", "fid,test_iwae_bpd", "--fixed", "lr=1e-3", "--cpus-per-trial", "2")
    assert spec.searched and set(spec.domains) == set(spec.searched)  # a new sweep carries Tune's domains
    spec.save(str(tmp_path))
    loaded = SweepSpec.load(str(tmp_path), "s")
    assert loaded == spec
    assert loaded.domains == {}  # Tune keeps the domains in its own state
    assert loaded.metric == "fid" and loaded.objectives == ("fid", "test_iwae_bpd")
    assert loaded.constants["train.lr"] == 1e-3 and loaded.resources == {"cpu": 2.0, "gpu": 0.0}
    assert loaded.fid == FIDSettings(network="standin", ladder=(128, 256), final=256)


def test_resume_reads_the_saved_spec_not_argv(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "restorable", lambda storage, name: True)  # as if Tune had saved its state
    spec = new_spec(tmp_path, "--metric", "test_iwae_bpd", "--seed", "3")
    spec.save(str(tmp_path))
    resumed = driver.sweep_spec(cli.parse("run", ["--resume", "s", "--storage-path", str(tmp_path)]), str(tmp_path))
    assert resumed == spec and resumed.metric == "test_iwae_bpd" and resumed.seed == 3
    again = driver.sweep_spec(cli.parse("run", ["--resume", "s", "--cpus-per-trial", "4"]), str(tmp_path))
    assert again.resources == {"cpu": 4.0, "gpu": 0.0} and again.replace(resources=spec.resources) == spec


def test_a_file_written_before_the_spec_still_loads(tmp_path):
    """The untyped format of earlier versions (no "version"): ASHA's settings come from the space's preset."""
    constants = {"model_name": "vae", "model.arch": "conv-small", "train.epochs": 4, "train.seed": 0,
                 "data.dataset": "synthetic"}
    old = {"space": "vae", "preset": "smoke", "metric": "test_bpd", "objectives": [], "mode": "min",
           "fid": {"network": "standin", "weights_path": None, "ladder": [128, 256], "step_fractions": [0.25, 0.5, 1.0],
                   "final": 256, "rfid": True},
           "max_epochs": 4, "param_space_constants": constants, "searched": ["model.beta", "model.lr"],
           "fixed": {}, "resources": {"cpu": 1.0, "gpu": 0.0}, "argv": ["--preset", "smoke"]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / SWEEP_FILE).write_text(json.dumps(old))
    spec = SweepSpec.load(str(tmp_path), "old")
    assert (spec.name, spec.metric, spec.objectives, spec.max_epochs) == ("old", "test_bpd", ("test_bpd",), 4)
    assert spec.searched == ("model.beta", "model.lr") and spec.milestones == (1, 2, 4)


@pytest.mark.parametrize("text, says", [
    ("{not json", "is damaged (JSONDecodeError"),
    ('{"version": 2, "name": "bad"}', "is damaged (KeyError: 'asha')"),
    ('[1, 2]', "is damaged (ValueError"),
    ('{}', "is damaged (KeyError: 'space')"),
    ('{"version": 99}', "format version 99"),
])
def test_a_damaged_or_newer_file_fails_in_one_line(tmp_path, text, says):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SWEEP_FILE).write_text(text)
    with pytest.raises(UsageError, match=re.escape(says)) as e:
        SweepSpec.load(str(tmp_path), "bad")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no sweep named 'missing'"):
        SweepSpec.load(str(tmp_path), "missing")


@pytest.mark.parametrize("change, says", [
    ({"mode": "lowest"}, "mode must be min or max, got 'lowest'"),
    ({"num_samples": 0}, "--num-samples must be at least 1, got 0"),
    ({"resources": {"cpu": 0, "gpu": 0.0}}, "--cpus-per-trial must be more than 0, got 0"),
    ({"objectives": ()}, "objectives must be one or more different metrics"),
    ({"name": "-x"}, "--name '-x'"),
])
def test_every_field_is_checked_in_one_line(tmp_path, change, says):
    spec = new_spec(tmp_path)
    with pytest.raises(UsageError, match=re.escape(says)):
        spec.replace(**change)
    with pytest.raises(UsageError, match=re.escape("--final-fid-samples must be at least 2, got 1")):
        FIDSettings(network="standin", ladder=(128,), final=1)


@pytest.mark.parametrize("max_t, grace_period, reduction_factor", [
    (4, 1, 2), (10, 7, 2), (100, 10, 3), (150, 10, 3), (90, 61, 3), (1000, 1, 10), (9, 1, 3), (1, 1, 2)])
def test_the_milestones_are_the_schedulers_rungs(max_t, grace_period, reduction_factor):
    """The FID ladder scores trials at spec.milestones: they must be where Ray's ASHA compares them (read from its
    public debug string, 'Bracket: Iter 4.000: None | Iter 2.000: None | ...')."""
    asha = ASHASettings(max_t, grace_period, reduction_factor)
    scheduler = ASHAScheduler(time_attr="epoch", metric="m", mode="min", max_t=max_t, grace_period=grace_period,
                              reduction_factor=reduction_factor)
    rungs = sorted(int(float(t)) for t in re.findall(r"Iter ([\d.]+)", scheduler.debug_string()))
    assert asha.milestones == tuple(rungs)


def test_the_sweeps_scheduler_is_built_from_the_spec(tmp_path):
    spec = new_spec(tmp_path)
    rungs = sorted(int(float(t)) for t in re.findall(r"Iter ([\d.]+)", asha_scheduler(spec).debug_string()))
    assert spec.milestones == tuple(rungs) == (1, 2, 4)


def test_a_sweep_saved_before_tune_started_says_how_to_start_it_again(tmp_path, capsys):
    """A driver killed in its first seconds leaves gensweep's settings and no Tune state: --resume, the leaderboard
    and the report say so in one line."""
    from sweeps import leaderboard, report

    new_spec(tmp_path, "--seed", "2").save(str(tmp_path))
    assert cli.main(["resume", "s", "--storage-path", str(tmp_path), "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped before Tune saved any state" in err[0] and "--seed 2" in err[0], err
    for tool, flag in [(leaderboard, ["--source", "local"]), (report, ["--no-wandb"])]:
        assert tool.main(["--name", "s", "--storage-path", str(tmp_path), *flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no trial of sweep 's' has reported yet" in err[0], err


@pytest.mark.parametrize("flags, says", [
    (["--objectives", "fid,nope"], "--objectives nope is not offered by space 'vae'"),
])
def test_from_args_refuses_in_one_line(tmp_path, flags, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        new_spec(tmp_path, *flags)


@pytest.mark.parametrize("flags, final_k", [
    ((), 0),  # vae ranks by test_bpd, the ELBO: the bound ranks nothing, so no end-of-trial bound
    (("--metric", "fid"), 0),
    (("--metric", "test_iwae_bpd"), 32),  # the bound ranks: the smoke preset's end-of-trial bound
    (("--objectives", "fid,test_iwae_bpd"), 32),
    (("--fixed", "final_eval_k=500"), 500),  # asked for
    (("--metric", "fid", "--fixed", "final_eval_k=500"), 500),
])
def test_the_end_of_trial_bound_runs_where_the_bound_ranks_or_where_asked(tmp_path, flags, final_k):
    assert new_spec(tmp_path, *flags).constants["model.final_eval_k"] == final_k
