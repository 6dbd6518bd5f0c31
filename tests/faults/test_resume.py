"""`run.py --resume` after the driver dies keeps every trial's searched values: a real interrupted ncsn-sampling
sweep, whose trials override the checkpoint's sampler settings with their own."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT
from ray_cluster import LocalCluster, kill_when, stop, stored_results, tune_state


def tiny_ncsn_checkpoint(tmp_path: Path) -> Path:
    """A trained NCSN whose own sampler settings (T=7, eps=3e-5, no denoising) differ from every searched value."""
    import subprocess

    out = tmp_path / "ncsn"
    subprocess.run([sys.executable, "-m", "genmodels.train", "--model", "ncsn", "--dataset", "synthetic",
                    "--train-size", "64", "--test-size", "64", "--width", "8", "--unet-blocks", "1",
                    "--num-levels", "3", "--langevin-steps", "7", "--langevin-eps", "3e-5", "--denoise", "false",
                    "--epochs", "1", "--batch-size", "32", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    return out / "state.pt"


@pytest.mark.slow
def test_resumed_sampling_sweep_keeps_the_searched_sampler_values(tmp_path):
    storage, name, num_samples = tmp_path / "runs", "sampling", 3
    checkpoint = tiny_ncsn_checkpoint(tmp_path)
    driver = None
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=1)
        command = [sys.executable, "sweeps/run.py", "--address", cluster.address, "--storage-path", str(storage),
                   "--no-wandb"]
        try:
            driver = cluster.popen([*command, "--space", "ncsn-sampling", "--preset", "smoke", "--name", name,
                                    "--num-samples", str(num_samples), "--checkpoint", str(checkpoint)],
                                   tmp_path / "driver.log")
            kill_when(driver, lambda: any(s["status"] == "TERMINATED"
                                           for s in (tune_state(storage, name) or {}).values()))
            driver = cluster.popen([*command, "--resume", name], tmp_path / "resume.log")
            driver.wait(timeout=240)
        finally:
            stop(driver)
    log = (tmp_path / "resume.log").read_text()
    assert driver.returncode == 0, log[-5000:]
    state, results = tune_state(storage, name), stored_results(storage, name)
    assert len(state) == num_samples and all(s["status"] == "TERMINATED" for s in state.values()), log[-3000:]
    for trial_id, s in state.items():
        reported = results[trial_id][-1]
        # What the trial sampled with is its own searched T and eps, not the checkpoint's 7 and 3e-5.
        assert reported["langevin_steps"] == s["config"]["model.langevin_steps"] != 7, (trial_id, reported)
        assert reported["langevin_eps"] == pytest.approx(s["config"]["model.langevin_eps"]), (trial_id, reported)
        assert "fid" in reported
