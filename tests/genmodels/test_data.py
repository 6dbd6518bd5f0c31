import struct

import numpy as np
import pytest
import torch

from genmodels.data import (
    Batches,
    DataUnavailable,
    dequantize,
    load_images,
    synthetic_images,
)


def test_cifar_fixture_loads_through_torchvision(cifar_dir):
    train = load_images("cifar10", "train", cifar_dir, download=False)
    test = load_images("cifar10", "test", cifar_dir, download=False)
    assert train.shape == (30, 3, 32, 32) and test.shape == (10, 3, 32, 32)
    assert train.dtype == torch.uint8
    # channel-first layout of the pickled rows: the first 1024 bytes of a row are the red plane
    import pickle
    with open(cifar_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"]
    assert torch.equal(test[0, 0].flatten(), torch.as_tensor(raw[0, :1024]))
    assert torch.equal(test[0, 2].flatten(), torch.as_tensor(raw[0, 2048:]))


def test_fashion_mnist_raw_files_are_padded_to_32(tmp_path):
    # The layout `apt-get install dataset-fashion-mnist` + gunzip gives: <data-dir>/FashionMNIST/raw/*-ubyte
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 5), ("t10k", 3)]:
        imgs = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
        labels = rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels)
    x = load_images("fashion_mnist", "train", tmp_path, download=False)
    assert x.shape == (5, 1, 32, 32)
    assert x[:, :, :2].sum() == 0 and x[:, :, :, -2:].sum() == 0  # 2-pixel zero border
    assert (x[:, :, 2:30, 2:30] > 0).all()
    assert load_images("fashion_mnist", "test", tmp_path, download=False).shape == (3, 1, 32, 32)


def test_missing_data_offline_says_data_dir(tmp_path):
    with pytest.raises(DataUnavailable, match="--data-dir"):
        load_images("cifar10", "train", tmp_path, download=False)


def test_failed_download_is_one_line_naming_data_dir(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as cifar

    def no_network(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    with pytest.raises(DataUnavailable) as e:
        load_images("cifar10", "train", tmp_path, download=True)
    assert "download" in str(e.value) and "--data-dir" in str(e.value) and "\n" not in str(e.value)


def test_synthetic_is_deterministic_and_varied():
    a, b = synthetic_images(64, seed=3), synthetic_images(64, seed=3)
    assert torch.equal(a, b) and a.shape == (64, 3, 32, 32)
    assert not torch.equal(a, synthetic_images(64, seed=4))
    assert a.float().std(0).mean() > 20  # images differ from each other
    assert len(torch.unique(a.flatten(1), dim=0)) == 64


def test_synthetic_images_do_not_depend_on_the_chunk_they_are_painted_in():
    whole = synthetic_images(40, seed=5, chunk=40)
    assert all(torch.equal(whole, synthetic_images(40, seed=5, chunk=c)) for c in (1, 7, 512))


def test_batches_cover_epoch_and_flip():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone()
    x[:, :, :, 1] += 100  # left/right halves differ, so a flip is visible
    b = Batches(x, 3, shuffle=True, flip=True, seed=0)
    batches = list(b.epoch())
    assert len(batches) == 3  # ragged tail dropped in training
    seen = torch.cat(batches)[:, 0, 0, :].min(1).values
    assert len(set(seen.tolist())) == 9
    flipped = torch.cat(batches)[:, 0, 0, 0] >= 100
    assert 0 < flipped.sum() < 9
    ordered = Batches(x, 4, shuffle=False, flip=False)
    assert torch.equal(torch.cat(list(ordered.epoch())), x)  # test split: everything, in order


def test_batches_fixed_steps_cycle():
    x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    assert len(list(Batches(x, 4).epoch(steps=7))) == 7


def test_dequantize_stays_in_bin():
    x = torch.tensor([0, 17, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    d = dequantize(x)
    assert torch.all(d * 256 >= x.float()) and torch.all(d * 256 < x.float() + 1)
