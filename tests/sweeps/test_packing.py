"""sweeps/packing.py: --gpus-per-trial auto, the worst-case configs it probes, and whether MPS is running."""


def test_gpus_per_trial_auto_falls_back_to_cpu_with_one_line(capsys):
    from sweeps import cli
    from sweeps.packing import auto_gpus_per_trial

    assert cli.parse("run", ["--gpus-per-trial", "auto"]).gpus_per_trial == "auto"
    assert cli.parse("run", ["--gpus-per-trial", "0.25"]).gpus_per_trial == 0.25
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


def test_mps_is_seen_where_its_control_pipe_is(tmp_path):
    from sweeps.packing import mps_running

    assert not mps_running({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    (tmp_path / "control").touch()
    assert mps_running({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
