"""`python -m genmodels.train` as users run it: progress lines during every long phase, the expensive estimates only
where a flag asks, the final metrics in metrics.jsonl, and one-line errors (exit 2, no traceback) for a corrupt
dataset copy, a bad checkpoint to resume from, and an --out that cannot be written."""
import json
import os
import pickle
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_trainer, run_cli

from genmodels.data import DataUnavailable, load_images, synthetic_images
from genmodels.train import Log, heartbeat, main

TINY = ["--dataset", "synthetic", "--train-size", "64", "--arch", "conv-small", "--width", "8", "--batch-size", "8",
        "--epochs", "1", "--test-size", "16", "--eval-k", "2", "--final-eval-k", "2"]


def assert_one_line_error(result, *words: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not re.search(r"^epoch \d", result.stdout, re.M), result.stdout  # failed before training started
    return lines[0]


@pytest.mark.slow
def test_progress_lines_come_before_the_first_epoch_line(tmp_path):
    result = run_cli(["-m", "genmodels.train", *TINY, "--out", str(tmp_path / "run")],
                     env={"GENSWEEP_PROGRESS_S": "0.001"}, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1 "))
    before = lines[:first_epoch]
    assert any(re.fullmatch(r"epoch 1: step \d+/8 \(\d+%\), [\d.]+ steps/s, [\d.]+ s left", x) for x in before)
    assert any(x.startswith("loading synthetic") and " done in " in x for x in before)
    assert "epoch 1: evaluating on 16 test images ..." in before
    assert any(re.fullmatch(r"epoch 1: evaluating on 16 test images: done in [\d.]+ s", x) for x in before)
    assert "epoch 1: sampling grids ..." in before
    # TINY asks for both bounds: each evaluation's 2 batches of 8 get a line after the first (none after the last)
    assert any(re.fullmatch(r"epoch 1: evaluating: batch 1/2 \(50%\), [\d.]+ s left", x) for x in before)
    after = lines[first_epoch:]
    assert "final evaluation and images ..." in after
    assert any(re.fullmatch(r"final evaluation: batch 1/2 \(50%\), [\d.]+ s left", x) for x in after)
    assert any(x.startswith("final evaluation and images: done in ") for x in after)


SMALL = ["--dataset", "synthetic", "--train-size", "64", "--test-size", "16", "--arch", "conv-small", "--width", "8",
         "--batch-size", "8"]


def metrics_lines(out: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl's epoch lines and final lines."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if not x.get("final")], [x for x in lines if x.get("final")]


def test_bounds_run_only_when_asked_and_the_final_line_is_in_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SMALL, "--epochs", "1", "--out", str(out)]) == 0
    assert "no per-epoch bound (--eval-k K adds it); no final bound (--final-eval-k K adds it)" in \
        capsys.readouterr().out
    (epoch,), (final,) = metrics_lines(out)
    assert "test_bpd" in epoch and not [k for k in epoch if "iwae" in k]  # the cheap metrics on the whole split
    assert final == {"final": True, "epoch": 1, "step": 8}
    # Asked for on a resume; the next resume goes on with what the run was asked for; 0 turns each off again.
    assert main(["--resume", "--out", str(out), "--epochs", "2", "--eval-k", "2", "--final-eval-k", "3"]) == 0
    assert "final: final_test_iwae_bpd=" in capsys.readouterr().out
    assert main(["--resume", "--out", str(out), "--epochs", "3"]) == 0
    assert main(["--resume", "--out", str(out), "--epochs", "4", "--eval-k", "0", "--final-eval-k", "0"]) == 0
    epochs, finals = metrics_lines(out)
    assert [x["epoch"] for x in epochs] == [x["epoch"] for x in finals] == [1, 2, 3, 4]
    assert [sorted(k for k in x if "iwae" in k) for x in epochs] == [[], *[["test_iwae_bpd", "test_iwae_bpd_k2",
                                                                            "test_iwae_nll"]] * 2, []]
    assert [sorted(k for k in x if "iwae" in k) for x in finals] == [
        [], *[["final_test_iwae_bpd", "final_test_iwae_bpd_k3"]] * 2, []]
    assert all(x["final_test_iwae_bpd"] > 0 for x in finals[1:3])


def test_eval_subset_evaluates_the_epochs_before_the_last_on_a_subset(tmp_path):
    out = tmp_path / "run"
    assert main([*SMALL, "--epochs", "2", "--eval-subset", "8", "--out", str(out)]) == 0
    (first, last), _ = metrics_lines(out)
    assert first["subset_images"] == 8 and "subset_test_bpd" in first and "test_bpd" not in first
    assert "test_bpd" in last and "subset_test_bpd" not in last


def test_resuming_a_checkpoint_of_the_old_cli_runs_no_bound(checkpoint, tmp_path, capsys):
    """A checkpoint written before the CLI recorded what was asked (final_eval_k 1000 in its config): none asked."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(checkpoint.read_bytes())
    assert main(["--resume", "--out", str(out)]) == 0
    assert "no final bound" in capsys.readouterr().out
    epochs, (final,) = metrics_lines(out)
    assert [x["epoch"] for x in epochs] == [1, 2] and not [k for x in epochs for k in x if "iwae" in k]
    assert final == {"final": True, "epoch": 2, "step": 16}


def test_heartbeat_fills_a_silent_phase_and_stops_with_it(capsys):
    log = Log()
    with heartbeat(log, 0.0):  # at least 1 s without a line
        log("final evaluation and images ...")
        time.sleep(1.4)
        log("final evaluation and images: done in 1.4 s")
    time.sleep(1.2)  # stopped: no line after the block
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "final evaluation and images ..." and lines[-1].endswith("done in 1.4 s"), lines
    assert lines[1:-1] == ["final evaluation and images: still running, 1 s so far"], lines


def test_trainer_is_quiet_unless_progress_is_set(capsys):
    images = synthetic_images(64)
    trainer = make_trainer("vae", {"arch": "conv-small", "width": 8, "batch_size": 8, "eval_k": 2}, images,
                           images[:8], device="cpu")
    trainer.train_epoch()
    trainer.evaluate()
    assert capsys.readouterr().out == ""
    lines: list[str] = []
    trainer.progress, trainer.progress_every = lines.append, 0.0
    trainer.train_epoch()
    trainer.evaluate()
    assert [x for x in lines if x.startswith("epoch 2: step ")][-1].startswith("epoch 2: step 8/8 (100%)")
    assert lines[-2:][0] == "epoch 2: evaluating on 8 test images ..." and "done in" in lines[-1]


def write_garbage_cifar(root: Path, truncate: bool = False) -> Path:
    """A folder with the real CIFAR-10 file names holding garbage (or the start of a real pickle)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        blob = pickle.dumps({"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 6})
        (folder / name).write_bytes(blob[:len(blob) // 2] if truncate else os.urandom(1000))
    return folder


@pytest.mark.slow
def test_corrupt_cifar_copy_is_one_line(tmp_path):
    folder = write_garbage_cifar(tmp_path)
    result = run_cli(["-m", "genmodels.train", "--model", "vae", "--data-dir", str(tmp_path)],
                     env={"GENSWEEP_OFFLINE": "1"}, timeout=60)
    assert_one_line_error(result, "corrupt", str(folder), "data_batch_1", "checksum", "--data-dir")


def test_truncated_cifar_batch_without_md5_is_corrupt(cifar_dir):
    batch = cifar_dir / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataUnavailable, match=r"corrupt: data_batch_3 cannot be read") as e:
        load_images("cifar10", "train", cifar_dir, download=False)
    assert "\n" not in str(e.value)


def test_truncated_fashion_mnist_raw_file_is_corrupt(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in [("train", 5), ("t10k", 3)]:
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + bytes(n * 784))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(n))
    (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:-100])
    with pytest.raises(DataUnavailable, match=r"FashionMNIST/raw is corrupt: train-images-idx3-ubyte cannot be read"):
        load_images("fashion_mnist", "train", tmp_path, download=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real conv-small checkpoint of a tiny synthetic run (not trained: only its format matters here)."""
    from genmodels.experiment import make_experiment

    settings = {"dataset": "synthetic", "train_size": 64, "test_size": 16, "arch": "conv-small", "width": 8,
                "batch_size": 8, "epochs": 2}
    images = synthetic_images(64)
    out = tmp_path_factory.mktemp("run")
    make_experiment("vae", settings, images, images[:16], device="cpu").save(out / "state.pt")
    return out / "state.pt"


def unwritable(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o500)
        return folder / "run"
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root (permission bits do not bind) and no read-only /sys to write to")
    return Path("/sys/kernel/gensweep-run")  # sysfs refuses new folders even to root


@pytest.mark.parametrize("case", ["truncated", "not_torch", "torch_list", "other_arch", "out_is_file",
                                  "out_unwritable"])
@pytest.mark.slow
def test_bad_resume_or_out_is_one_line_before_training(case, checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    args, words = ["--resume", "--out", str(run)], [str(run / "state.pt")]
    if case == "truncated":
        (run / "state.pt").write_bytes(checkpoint.read_bytes()[:5000])
        words.append("truncated")
    elif case == "not_torch":
        (run / "state.pt").write_text("not a checkpoint\n")
        words.append("not a gensweep checkpoint")
    elif case == "torch_list":
        torch.save([1, 2, 3], run / "state.pt")
        words.append("not a gensweep checkpoint")
    elif case == "other_arch":
        (run / "state.pt").write_bytes(checkpoint.read_bytes())
        args += ["--arch", "conv"]
        words.append("arch='conv-small'")
    elif case == "out_is_file":
        (tmp_path / "file").write_text("")
        args, words = [*TINY, "--out", str(tmp_path / "file")], [str(tmp_path / "file"), "is a file"]
    else:
        out = unwritable(tmp_path)
        args, words = [*TINY, "--out", str(out)], [str(out), "is not writable"]
    result = run_cli(["-m", "genmodels.train", "--model", "vae", *args], timeout=60)
    assert_one_line_error(result, *words)
