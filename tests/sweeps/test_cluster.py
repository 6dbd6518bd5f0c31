"""Beyond one machine: cluster.yaml checked the way `ray up` checks it (no cloud contacted), sweep bookkeeping on any
storage, and a real multi-node Ray cluster on this machine that loses a worker node, then its driver, and still
finishes every trial from checkpoints."""
import glob
import json
import pickle
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import ROOT, LocalCluster, kill_when, stop, stored_results, tune_state

CLUSTER_YAML = ROOT / "cluster.yaml"


# ---------------------------------------------------------------------------------------------------------------
# cluster.yaml


def ray_up_checks(path: Path) -> dict:
    """What `ray up` does with a cluster config before it contacts a provider (Ray 2.60,
    ray/autoscaler/_private/commands.py: create_or_update_cluster, then _bootstrap_config): load the YAML, merge the
    provider's defaults (prepare_config), then validate_config: the JSON schema (unknown keys, types) and the
    node-type references. Only AWS's resource autodetection and bootstrap (IAM, subnets, key pairs) come after."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def test_ray_up_still_validates_this_way():
    """Guards ray_up_checks against a Ray upgrade that changes what `ray up` runs first."""
    import inspect

    from ray.autoscaler._private import commands

    source = inspect.getsource(commands._bootstrap_config)
    assert source.index("prepare_config(config)") < source.index("validate_config(config)") < source.index(
        "provider_cls.bootstrap_config(config)")
    assert "_bootstrap_config(config" in inspect.getsource(commands.create_or_update_cluster)


def test_cluster_yaml_passes_ray_up_validation():
    config = ray_up_checks(CLUSTER_YAML)
    assert config["provider"]["type"] == "aws"
    assert config["idle_timeout_minutes"] > 0


def test_cluster_yaml_runs_trials_on_gpu_workers_with_gensweep_installed():
    config = ray_up_checks(CLUSTER_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the driver's node: no trial lands there
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    families = {t["node_config"]["InstanceType"].split(".")[0] for t in workers.values()}
    assert {"g5", "g6e"} <= families
    for t in workers.values():
        assert t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 1
        assert t["min_workers"] == 0 and t["max_workers"] >= 1  # scale from zero GPUs, pay only while trials run
    assert sum(t["max_workers"] for t in workers.values()) >= config["max_workers"] >= 1
    # Every node gets this repository and installs it with the tested versions.
    [(remote, local)] = config["file_mounts"].items()
    assert (ROOT / local).resolve() == ROOT and remote == "~/gensweep"
    install = [c for c in config["setup_commands"] if "pip install" in c]
    assert install and "-c ~/gensweep/constraints.txt" in install[0] and "gensweep[cluster]" in install[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'cluster = ["ray[default]", "boto3"]' in pyproject
    # The one-time AWS setup in docs/cluster.md matches: the IAM instance profile and the image every node uses.
    readme = (ROOT / "docs" / "cluster.md").read_text()
    [profile] = {t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()}
    assert f"--instance-profile-name {profile}" in readme
    [image] = {t["node_config"]["ImageId"] for t in types.values()}
    assert image.startswith("resolve:ssm:") and f"--name {image.removeprefix('resolve:ssm:')}" in readme


@pytest.mark.parametrize("old, new, message", [
    ("idle_timeout_minutes: 10", "idle_timeout_minute: 10", "'idle_timeout_minute' was unexpected"),
    ("    min_workers: 0\n    max_workers: 8", "    min_worker: 0\n    max_workers: 8", "'min_worker' was unexpected"),
    ("head_node_type: head.cpu", "head_node_type: head.gpu", "`head_node_type` must be one of `available_node_types`"),
    ('resources: {"CPU": 4, "GPU": 1}\n    node_config:\n      InstanceType: g5.xlarge',
     'resources: {"CPU": 4, "GPU": 0.5}\n    node_config:\n      InstanceType: g5.xlarge',
     "0.5 is not of type 'integer'"),
    ("    min_workers: 0\n    max_workers: 8", "    min_workers: 9\n    max_workers: 9",
     "global `max_workers` is smaller than the sum of `min_workers`"),
    ("  type: aws", "  type: awz", "Unsupported node provider: awz"),
])
def test_broken_cluster_yaml_fails_with_rays_message(old, new, message, tmp_path):
    text = CLUSTER_YAML.read_text()
    assert text.count(old) == 1, f"cluster.yaml changed: fix this test's edit {old!r}"
    broken = tmp_path / "cluster.yaml"
    broken.write_text(text.replace(old, new))
    with pytest.raises(Exception) as e:
        ray_up_checks(broken)
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# sweeps on shared or cloud storage, resume bookkeeping, shared data


def test_sweep_files_on_local_paths_and_uris(tmp_path):
    from sweeps import storage

    assert storage.join("s3://bucket/runs/", "sweep", "x.json") == "s3://bucket/runs/sweep/x.json"
    assert storage.resolve("gs://bucket/runs") == "gs://bucket/runs"
    assert storage.resolve("~/runs") == str(Path.home() / "runs")
    for root in [str(tmp_path / "local"), f"file://{tmp_path}/uri"]:  # file:// goes through pyarrow's URI handling
        path = storage.join(root, "sweep", "info.json")
        assert storage.read_text(path) is None
        storage.write_text(path, '{"a": 1}')
        assert storage.read_text(path) == '{"a": 1}'
    assert (tmp_path / "uri" / "sweep" / "info.json").read_text() == '{"a": 1}'


class _Stop(Exception):
    pass


@pytest.mark.parametrize("resume_flags, expected", [
    ([], {"cpu": 2.0, "gpu": 0.5}),  # as the sweep started, whatever this machine has
    (["--gpus-per-trial", "0"], {"cpu": 2.0, "gpu": 0.0}),  # unless given again
])
def test_resume_gives_new_trials_the_resources_the_sweep_started_with(resume_flags, expected, tmp_path, monkeypatch):
    for var in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AIR_NEW_OUTPUT",
                "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"):
        monkeypatch.delenv(var, raising=False)  # run.py sets these on import; undone after the test
    monkeypatch.setenv("WANDB_MODE", "disabled")  # run.main sets it too
    import sweeps.run as run
    from sweeps import cluster, driver

    seen = {}

    class StartedTuner:
        def fit(self):
            raise _Stop

    def tuner(resume):
        def make(spec, *a, **k):
            seen.update(spec.resources, resume=resume)
            return StartedTuner()
        return make

    monkeypatch.setattr(cluster, "init_ray", lambda *a: None)
    monkeypatch.setattr(cluster, "allow_pending_trials", lambda *a, **k: None)
    monkeypatch.setattr(driver, "restorable", lambda storage, name: True)  # as if Tune had saved its state
    monkeypatch.setattr(driver, "make_tuner", tuner(resume=False))
    monkeypatch.setattr(driver, "restore_tuner", tuner(resume=True))
    monkeypatch.setattr(cluster, "check_gpus", lambda *a: None)  # as if on a GPU cluster
    with pytest.raises(_Stop):  # the sweep starts (its settings are saved), then its driver stops
        run.main(["--preset", "smoke", "--cpus-per-trial", "2", "--gpus-per-trial", "0.5", "--name", "old",
                  "--storage-path", str(tmp_path), "--no-wandb"])
    with pytest.raises(_Stop):
        run.main(["--resume", "old", "--storage-path", str(tmp_path), "--no-wandb", *resume_flags])
    assert seen == {**expected, "resume": True}


@pytest.mark.slow
def test_trial_trains_on_the_shared_data_and_reports_where_it_resumed(tmp_path, monkeypatch):
    """Trials get the driver's tensors (through the object store) and never load data themselves; a trial restarted
    from a checkpoint says which epoch it picked up from."""
    import shutil

    import genmodels.data
    import trainables.trainable as tr
    from genmodels.data import synthetic_images

    data = {"train": synthetic_images(32), "test": synthetic_images(16, seed=1)}

    def no_loading(*a, **k):
        raise AssertionError("a trial loaded data itself")

    monkeypatch.setattr(genmodels.data, "load_images", no_loading)
    monkeypatch.setattr(genmodels.data, "synthetic_images", no_loading)
    reports, restore_from = [], {"checkpoint": None}

    def report(metrics, checkpoint=None):
        reports.append(metrics)
        saved = tmp_path / f"checkpoint_{len(reports)}"
        with checkpoint.as_directory() as d:
            shutil.copytree(d, saved)

    monkeypatch.setattr(tr.tune, "report", report)
    monkeypatch.chdir(tmp_path)  # Tune runs a trial in its own working directory
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: restore_from["checkpoint"])
    config = {"model_name": "vae", "model.arch": "conv-small", "model.width": 4, "model.latent": 4,
              "train.batch_size": 8, "train.steps_per_epoch": 2}
    plan = tr.TrialPlan("test_bpd", milestones=(1, 2))  # grids at milestones and the end
    tr.train_trial({**config, "train.epochs": 1}, data, plan)
    restore_from["checkpoint"] = tr.tune.Checkpoint.from_directory(tmp_path / "checkpoint_1")
    tr.train_trial({**config, "train.epochs": 3}, data, plan)
    assert [(r["epoch"], r["resumed_from_epoch"]) for r in reports] == [(1, 0), (2, 1), (3, 1)]
    assert all(r["node_id"] == "" for r in reports)  # not inside Ray here
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["epoch_0001", "epoch_0002", "epoch_0003"]


@pytest.mark.slow
def test_diverged_trials_end_as_diverged_and_the_sweep_finishes(tmp_path):
    """A NaN loss ends its trial with a report that has no ranking metric: Tune must neither reject that report
    nor crash sorting its progress table on it, and Optuna records the trial as pruned. With no trial completed,
    the exit code is 1 and the last line says why."""
    from conftest import run_cli

    r = run_cli(["sweeps/run.py", "--preset", "smoke", "--num-samples", "2", "--fixed", "lr=1e10", "--fixed",
                 "epochs=2", "--no-wandb", "--storage-path", str(tmp_path), "--name", "nan"], timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "gensweep: no trial completed (2 diverged); see the errors above"
    diverged = [line for line in r.stdout.splitlines() if " diverged (non-finite training metrics at epoch 1" in line]
    assert len(diverged) == 2, r.stdout[-3000:]  # each trial: where it diverged, and on what
    rows = leaderboard_rows(r.stdout, "nan")
    assert len(rows) == 2 and all(row.endswith("diverged") for row in rows), r.stdout[-3000:]
    searcher = pickle.loads(sorted(tmp_path.glob("nan/searcher-state-*.pkl"))[-1].read_bytes())
    assert [t.state.name for t in searcher["_ot_study"].trials] == ["PRUNED", "PRUNED"]


# ---------------------------------------------------------------------------------------------------------------
# a real cluster: a head and a worker node, each a `ray start` process, on loopback in a private network namespace

# Every searched hyperparameter pinned: two identical trials ("twins"). Ties never make ASHA stop a trial, so both
# must run all their epochs, and the one that loses its node must end bit-identical to the one that did not.
TWINS = ["--fixed", "beta=1.0", "--fixed", "latent=32", "--fixed", "lr=0.001", "--fixed", "likelihood_scale=0.1",
         "--fixed", "learn_scale=False"]


def sweep_command(cluster: LocalCluster, storage: str, *flags: str) -> list[str]:
    return [sys.executable, "sweeps/run.py", "--address", cluster.address, "--storage-path", storage, "--no-wandb",
            *flags]


def live_results(cluster: LocalCluster, name: str) -> list[dict]:
    """Results as the driver writes them (its staging folder in the Ray session), before they reach storage."""
    rows = []
    for path in glob.glob(str(cluster.session_dir() / "artifacts" / "*" / name / "driver_artifacts" / "*" /
                              "result.json")):
        rows += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows





def table(title: str, results: dict[str, list[dict]], node_names: dict[str, str]) -> str:
    """Per trial: the nodes it ran on, epochs completed, the epochs its runs started from, the final metric."""
    lines = [title, f"{'trial':<14}{'nodes':<18}{'epochs completed':>17}  {'resumed from epoch':<20}test_bpd"]
    for trial, rows in results.items():
        nodes = []
        for r in rows:
            name = node_names.get(r["node_id"], r["node_id"][:8])
            if not nodes or nodes[-1] != name:
                nodes.append(name)
        starts = sorted({r["resumed_from_epoch"] for r in rows})
        lines.append(f"{trial:<14}{' -> '.join(nodes):<18}{rows[-1]['epoch']:>17}  "
                     f"{', '.join(map(str, starts)):<20}{rows[-1].get('test_bpd', float('nan')):.6f}")
    return "\n".join(lines)


def leaderboard_rows(log: str, name: str) -> list[str]:
    """The ranked rows run.py prints at the end of a sweep."""
    board = log[log.index(f"Leaderboard of {name}"):].splitlines()[3:]
    return [line for line in board if line[:1].isdigit()]


@pytest.mark.slow
def test_trial_on_a_dead_node_restarts_on_another_node_from_its_last_checkpoint(tmp_path, capsys):
    epochs, storage, name = 4, tmp_path / "runs", "node-death"
    driver = None
    with LocalCluster() as cluster:
        head, worker = cluster.start_head(num_cpus=1), cluster.add_worker(num_cpus=1)
        try:
            # One CPU per node and per trial: one trial on each node.
            # A checkpoint with every report (--checkpoint-every-s 0), so the restart's epoch is known exactly; the
            # default cadence's cost is counted by test_faults' driver-kill test.
            driver = cluster.popen(sweep_command(cluster, str(storage), "--name", name, "--preset", "smoke",
                                                 "--num-samples", "2", *TWINS, "--fixed", f"epochs={epochs}",
                                                 "--fixed", "steps_per_epoch=40", "--checkpoint-every-s", "0"),
                                   tmp_path / "driver.log")
            deadline, killed, last_seen = time.time() + 150, [], (0, 0.0)
            while not killed and driver.poll() is None and time.time() < deadline:
                on_worker = [r for r in live_results(cluster, name) if r.get("node_id") == worker.node_id]
                epoch = max((r["epoch"] for r in on_worker), default=0)
                if epoch != last_seen[0]:
                    last_seen = (epoch, time.time())
                # Mid-epoch, not right after a report: Tune fetches a function trainable's checkpoint with a separate
                # call just after the report, and a node killed in that instant takes that checkpoint with it.
                elif 0 < epoch < epochs and time.time() - last_seen[1] > 0.4:
                    killed = cluster.kill_node(worker)  # the worker's trial is training its next epoch
                time.sleep(0.1)
            assert killed, "the worker node never ran a trial:\n" + (tmp_path / "driver.log").read_text()[-3000:]
            driver.wait(timeout=240)
        finally:
            stop(driver)
    log = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, log[-5000:]
    results = stored_results(storage, name)
    report = table(f"node death: killed the worker node's {len(killed)} processes mid-sweep", results,
                   {head.node_id: "head", worker.node_id: "worker"})
    with capsys.disabled():
        print("\n" + report)
    assert len(results) == 2, report
    assert {rows[0]["node_id"] for rows in results.values()} == {head.node_id, worker.node_id}, report
    for rows in results.values():  # every trial completed every epoch, and no epoch was reported twice
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), report
    [moved] = [t for t, rows in results.items() if rows[0]["node_id"] == worker.node_id]
    [stayed] = [t for t in results if t != moved]
    before = [r for r in results[moved] if r["node_id"] == worker.node_id]
    after = results[moved][len(before):]
    assert before and after and all(r["node_id"] == head.node_id for r in after), report
    assert all(r["resumed_from_epoch"] == 0 for r in before), report
    # Restarted from its last checkpoint: only the epoch in progress when the node died was lost.
    assert {r["resumed_from_epoch"] for r in after} == {before[-1]["epoch"]} and before[-1]["epoch"] >= 1, report
    # The other trial never noticed, and the resumed twin is bit-identical to it: the checkpoint restored it all.
    assert all(r["resumed_from_epoch"] == 0 and r["node_id"] == head.node_id for r in results[stayed]), report
    assert results[moved][-1]["test_bpd"] == results[stayed][-1]["test_bpd"], report
    rows = leaderboard_rows(log, name)
    assert len(rows) == 2 and all(r.endswith("completed") for r in rows), log[-3000:]
    for trial in results:  # the grids of every milestone (1, 2) and of the end reached storage, from both nodes
        grids = sorted(p.name for p in (storage / name / f"vae_{trial}" / "images").iterdir())
        assert grids == [f"epoch_{e:04d}" for e in (1, 2, epochs)], grids


@pytest.mark.slow
def test_killed_driver_resumes_the_sweep_with_resume(tmp_path, capsys):
    num_samples, epochs, storage, name = 4, 4, tmp_path / "runs", "driver-death"
    uri = f"file://{storage}"  # storage given as a URI, as s3:// or gs:// on a real cluster, read through pyarrow
    driver = None
    with LocalCluster() as cluster:
        head, worker = cluster.start_head(num_cpus=1), cluster.add_worker(num_cpus=1)
        try:
            driver = cluster.popen(sweep_command(cluster, uri, "--name", name, "--preset", "smoke",
                                                 "--num-samples", str(num_samples), "--fixed", f"epochs={epochs}",
                                                 "--fixed", "steps_per_epoch=40", "--fixed", "learn_scale=False",
                                                 # one scale for all: trials that ASHA keeps past the first rung
                                                 "--fixed", "likelihood_scale=0.1",
                                                 # a checkpoint with every report: the resumed epochs are exact
                                                 "--checkpoint-every-s", "0"),
                                   tmp_path / "driver.log")
            def ready() -> bool:
                state = tune_state(storage, name)
                # Kill when the saved state has a finished trial, a running one with a checkpoint, and no reference
                # to a checkpoint deleted since (Tune deletes the oldest of num_to_keep right before it saves the
                # state again; a driver dying in that instant would leave that trial nothing to restore).
                return bool(state) and all(s["checkpoint_epoch"] is not None for s in state.values()) and any(
                    s["status"] == "TERMINATED" for s in state.values()) and any(
                    s["status"] != "TERMINATED" and s["checkpoint_epoch"] for s in state.values())

            kill_when(driver, ready, poll=0.5)
            before = tune_state(storage, name)
            interrupted = stored_results(storage, name)
            driver = cluster.popen(sweep_command(cluster, uri, "--resume", name), tmp_path / "resume.log")
            driver.wait(timeout=240)
        finally:
            stop(driver)
    log = (tmp_path / "resume.log").read_text()
    assert driver.returncode == 0, log[-5000:]
    after, results = tune_state(storage, name), stored_results(storage, name)
    names = {head.node_id: "head", worker.node_id: "worker"}
    report = "\n\n".join([
        table("driver death: reports saved when the driver was killed", interrupted, names),
        table("after `run.py --resume`", results, names),
        "state at the kill: " + ", ".join(
            f"{t} {s['status']} " + (f"(checkpoint at epoch {s['checkpoint_epoch']})" if s["checkpoint_epoch"]
                                     else "(no checkpoint)") for t, s in before.items())])
    with capsys.disabled():
        print("\n" + report)
    finished = [t for t, s in before.items() if s["status"] == "TERMINATED"]
    resumable = {t: s["checkpoint_epoch"] for t, s in before.items() if s["status"] != "TERMINATED"
                 and s["checkpoint_epoch"]}
    assert finished and resumable, report
    assert len(after) == num_samples and all(s["status"] == "TERMINATED" for s in after.values()), report
    for t in finished:  # finished trials stay finished: not one more report
        assert results[t] == interrupted[t] and after[t]["epoch"] == before[t]["epoch"], report
    for t, rows in results.items():
        assert [r["epoch"] for r in rows] == list(range(1, rows[-1]["epoch"] + 1)), report  # no epoch twice
        restarted = [r for r in rows if r["resumed_from_epoch"]]
        if t in resumable:  # running trials continue from their checkpoints, the newest in their folder, unless
            # they ran to their end in the moment before Ray stopped the dead driver's trials (seen in CI)
            assert restarted or rows[-1]["epoch"] == epochs, report
            assert not restarted or restarted[0]["resumed_from_epoch"] >= resumable[t], report
        if restarted:  # from a checkpoint it had reported (Tune's saved state may lag the trial's folder), once
            start = restarted[0]["resumed_from_epoch"]
            assert {r["resumed_from_epoch"] for r in restarted} == {start}, report
            assert restarted[0]["epoch"] == start + 1, report
            assert [r["checkpointed"] for r in rows if r["epoch"] == start] == [1], report
    # The Optuna searcher kept its history: one study numbering every trial in the order the sweep created them,
    # the trials from before the kill first with the hyperparameters they ran with, all complete.
    state_file = sorted((storage / name).glob("searcher-state-*.pkl"))[-1]  # named by session start time
    searcher = pickle.loads(state_file.read_bytes())
    optuna_trials = searcher["_ot_trials"]
    assert set(optuna_trials) == set(after), report
    assert {optuna_trials[t].number for t in before} == set(range(len(before))), report
    for t, s in before.items():
        assert optuna_trials[t].params == {k: s["config"][k] for k in optuna_trials[t].params}, report
    assert len(searcher["_ot_study"].trials) == num_samples, report
    assert all(tr.state.name == "COMPLETE" for tr in searcher["_ot_study"].trials), report
    rows = leaderboard_rows(log, name)
    assert len(rows) == num_samples and all("completed" in r or "stopped (ASHA)" in r for r in rows), log[-3000:]


@pytest.mark.slow
def test_a_dry_run_with_address_plans_on_the_clusters_resources(tmp_path):
    """`--address` with `--dry-run`: the trials at once come from the cluster's CPUs (head and worker together,
    not this machine's), nothing is written to storage, and the driver only connected: the dry run ends, and the
    cluster still runs with both nodes."""
    storage = tmp_path / "runs"
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=3)
        cluster.add_worker(num_cpus=2)
        log = tmp_path / "dry-run.log"
        driver = cluster.popen(sweep_command(cluster, str(storage), "--preset", "smoke", "--num-samples", "8",
                                             "--dry-run", "--no-measure"), log)
        assert driver.wait(timeout=180) == 0, log.read_text()[-3000:]
        out = log.read_text()
        assert f"trials: 8, 5 at once (the cluster at {cluster.address} has 5 CPUs and 0 GPUs" in out, out[-3000:]
        assert not storage.exists() or not any(storage.iterdir())
        assert all(node.proc.poll() is None for node in cluster.nodes)
