import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # 2-core CI machine; Ray tests run trials beside pytest


@pytest.fixture(autouse=True)
def restore_environment():
    """Tests that call a CLI's main() in-process get the environment it sets (Ray's, W&B's) undone afterwards: Ray
    reads some of it once, and a later in-process Ray must not start with a half-changed environment."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """A tiny CIFAR-10 folder in the real on-disk format (pickled batches), loadable by torchvision.

    torchvision checks md5s of the real files; the class's file lists are patched to md5=None.
    """
    import torchvision.datasets as tvd

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    train_list, test_list = [], []
    for name, n in [*((f"data_batch_{i}", 6) for i in range(1, 6)), ("test_batch", 10)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(rng.integers(0, 10, n))}, f)  # str keys, as the real files
        (test_list if name == "test_batch" else train_list).append([name, None])
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": None})
    return tmp_path


def run_cli(args, env=None, timeout=600):
    """Run a CLI of the project as users do, in a fresh interpreter."""
    import os
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def make_trainer(model_name, settings, train, test, device="cpu"):
    """The Trainer of an Experiment built from flat settings, as the tests below drive it epoch by epoch."""
    from genmodels.experiment import make_experiment

    return make_experiment(model_name, settings, train, test, device=device).trainer


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def write_fashion_mnist(root, n_train: int, n_test: int) -> str:
    """A Fashion-MNIST folder in torchvision's on-disk format (root/FashionMNIST/raw/*-ubyte, IDX files) with the
    first n images of each split: the real images where Debian's dataset-fashion-mnist package is installed, else
    procedural 28x28 stand-ins in the same format. Returns which ('real' or 'synthetic')."""
    import gzip

    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    real = DEBIAN_FASHION_MNIST.is_dir()
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        if real:
            with gzip.open(DEBIAN_FASHION_MNIST / f"{split}-images-idx3-ubyte.gz") as f:
                f.read(16)
                pixels = np.frombuffer(f.read(n * 28 * 28), dtype=np.uint8).reshape(n, 28, 28)
        else:
            from genmodels.data import synthetic_images

            pixels = synthetic_images(n, seed=seed)[:, 0, 2:30, 2:30].numpy()
        header = np.array([0x0803, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + pixels.tobytes())
        labels = np.array([0x0801, n], dtype=">i4").tobytes() + bytes(n)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(labels)
    return "real" if real else "synthetic"


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """One real smoke sweep of the vae space (6 trials, ASHA stops, W&B offline), shared by the tests that read a
    finished sweep: (storage, stdout)."""
    storage = tmp_path_factory.mktemp("runs")
    r = run_cli(["sweeps/run.py", "--space", "vae", "--preset", "smoke", "--storage-path", str(storage),
                 "--name", "smoke", "--num-samples", "6"], env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (storage / "driver.stderr").write_text(r.stderr)
    # the logs of the Ray session this sweep started (the newest), for the tests of what Ray did
    sessions = sorted(Path(tempfile.gettempdir(), "ray").glob("session_2*"), key=lambda p: p.stat().st_mtime)
    if sessions:
        (storage / "ray_logs").symlink_to(sessions[-1] / "logs")
    return storage, r.stdout


def saved_spec_of(name="s", space="ncsn", objectives=("fid",), searched=("model.sigma_max",), max_epochs=2, **changes):
    """A small SweepSpec, as a sweep of `space` would save it (for the leaderboard and report without a sweep)."""
    from sweeps.spec import ASHASettings, FIDSettings, SweepSpec

    model = "ncsn" if space.startswith("ncsn") else space
    return SweepSpec(name=name, space=space, preset="smoke", model_name=model,
                     constants={"model_name": model, "train.epochs": max_epochs}, searched=searched,
                     objectives=objectives, mode="min", asha=ASHASettings(max_epochs, 1, 2),
                     fid=FIDSettings(network="standin", ladder=(128, 256), final=256),
                     resources={"cpu": 1.0, "gpu": 0.0}, num_samples=2, **changes)
