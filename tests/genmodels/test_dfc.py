"""DFC-VAE: VGG-19 layer slicing, weights resolution, the perceptual loss, and training on a random VGG."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import make_trainer
from torch import nn

from genmodels.data import synthetic_images
from genmodels.errors import ResourceUnavailable
from genmodels.models.dfc import DFCVAE
from genmodels.networks import vgg as dfc
from genmodels.networks.vgg import (
    LAYER_SETS,
    PerceptualLoss,
    load_vgg19,
    vgg19_features,
    vgg19_layer_names,
)
from genmodels.registry import trial_config

TINY = {"arch": "conv-small", "width": 4, "latent": 8, "eval_k": 2, "vgg_weights": "random"}


def torchvision_relu_names() -> dict[int, str]:
    """reluB_C for each ReLU of torchvision's own vgg19().features, numbered by walking its modules."""
    with torch.device("meta"):  # the real module list, no memory, no weights
        features = torchvision.models.vgg19().features
    names, block, conv = {}, 1, 0
    for i, m in enumerate(features):
        if isinstance(m, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(m, nn.Conv2d):
            conv += 1
        elif isinstance(m, nn.ReLU):
            assert isinstance(features[i - 1], nn.Conv2d)
            names[i] = f"relu{block}_{conv}"
    return names


def test_layer_names_match_torchvision_vgg19_features():
    tv = torchvision_relu_names()
    ours = vgg19_layer_names()
    assert {i: n for i, n in enumerate(ours) if n.startswith("relu")} == tv
    for layer_set, names in LAYER_SETS.items():
        for name in names:
            assert tv[ours.index(name)] == name, (layer_set, name)
    assert [ours.index(n) for n in LAYER_SETS["123"]] == [1, 6, 11]
    assert [ours.index(n) for n in LAYER_SETS["345"]] == [11, 20, 29]
    assert [ours.index(n) for n in LAYER_SETS["seed"]] == [3, 8, 17]


@pytest.mark.parametrize("layers,channels,sides", [("123", [64, 128, 256], [32, 16, 8]),
                                                   ("345", [256, 512, 512], [8, 4, 2]),
                                                   ("seed", [64, 128, 256], [32, 16, 8])])
def test_perceptual_features_come_from_the_named_layers(layers, channels, sides):
    loss = PerceptualLoss(layers, "random")
    assert len(loss.net) == max(loss.indices) + 1  # cut after the deepest layer used
    assert isinstance(loss.net[-1], nn.ReLU)
    feats = loss.features(torch.rand(2, 3, 32, 32))
    assert [f.shape[1] for f in feats] == channels and [f.shape[-1] for f in feats] == sides
    assert all((f >= 0).all() for f in feats)  # post-ReLU activations


def test_perceptual_loss_is_zero_for_equal_images_and_normalised_per_layer():
    loss = PerceptualLoss("123", "random")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loss(x, x), torch.zeros(3))
    y = torch.rand(3, 3, 32, 32)
    expected = sum(0.5 * ((a - b) ** 2).mean(dim=(1, 2, 3)) for a, b in zip(loss.features(y), loss.features(x)))
    torch.testing.assert_close(loss(y, x), expected)
    gray = torch.rand(2, 1, 32, 32)  # one channel is repeated to three
    torch.testing.assert_close(loss(gray, gray * 0.5), loss(gray.repeat(1, 3, 1, 1), gray.repeat(1, 3, 1, 1) * 0.5))


def test_imagenet_normalisation_is_applied():
    loss = PerceptualLoss("123", "random")
    x = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor(dfc.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(dfc.IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (x - mean) / std
    torch.testing.assert_close(loss.features(x)[0], loss.net[:2](normalised))


def test_weights_from_a_path_load_and_missing_layers_fail(tmp_path):
    saved = vgg19_features(11)  # enough for layer set 123 only
    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in saved.state_dict().items()}, path)  # as vgg19().state_dict() names
    net = load_vgg19(str(path), 11)
    torch.testing.assert_close(net[10].weight, saved[10].weight)
    assert not any(p.requires_grad for p in net.parameters())
    DFCVAE.prepare(trial_config({"vgg_weights": str(path)}, "dfc"))
    with pytest.raises(ResourceUnavailable, match="lack 12.bias"):
        load_vgg19(str(path), 20)


def test_missing_weights_fail_in_one_line_naming_the_flag(tmp_path, monkeypatch):
    with pytest.raises(ResourceUnavailable, match="--vgg-weights") as e:
        DFCVAE.prepare(trial_config({"vgg_weights": str(tmp_path / "nope.pth")}, "dfc"))
    assert "\n" not in str(e.value)
    # default weights, no network: the download fails (a file:// URL that does not exist stands in for it)
    monkeypatch.setattr(dfc, "vgg19_weights_url", lambda: "file:///nonexistent/vgg19-dcbb9e9d.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ResourceUnavailable, match="--vgg-weights") as e:
        DFCVAE.prepare(trial_config({"vgg_weights": ""}, "dfc"))
    assert "\n" not in str(e.value)
    DFCVAE.prepare(trial_config({"vgg_weights": "random"}, "dfc"))  # nothing to fetch


def test_default_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    source = tmp_path / "served" / "vgg19-0123abcd.pth"
    source.parent.mkdir()
    torch.save({f"features.{k}": v for k, v in vgg19_features(11).state_dict().items()}, source)
    monkeypatch.setattr(dfc, "vgg19_weights_url", lambda: source.as_uri())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ResourceUnavailable, match="--vgg-weights"):  # the hash in the name is checked
        DFCVAE.prepare(trial_config({}, "dfc"))
    good = source.with_name("vgg19-nohash.pth")
    source.rename(good)
    monkeypatch.setattr(dfc, "vgg19_weights_url", lambda: good.as_uri())
    DFCVAE.prepare(trial_config({}, "dfc"))
    assert (tmp_path / "hub" / "checkpoints" / "vgg19-nohash.pth").is_file()
    model = DFCVAE(DFCVAE.Config(**{**TINY, "vgg_weights": ""}), 3)
    torch.testing.assert_close(model.perceptual.net[0].weight, torch.load(good)["features.0.weight"])


def test_dfc_training_step_on_random_vgg_changes_weights_but_not_the_vgg():
    images = synthetic_images(16, seed=0)
    trainer = make_trainer("dfc", {**TINY, "batch_size": 8, "epochs": 1, "steps_per_epoch": 2, "ema_decay": 0.9,
                                   "pixel_weight": 1.0}, images, images[:8], device="cpu")
    model = trainer.model
    vgg = model.perceptual.net
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vgg_before = [p.clone() for p in vgg.parameters()]
    metrics = trainer.train_epoch()
    assert metrics["train_perceptual"] > 0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder") for k in changed) and any(k.startswith("decoder") for k in changed)
    assert "log_scale" in changed  # learn_scale: the decoder sigma is fitted for the likelihood metrics
    assert all(torch.equal(a, b) for a, b in zip(vgg.parameters(), vgg_before))
    assert all(p.grad is None for p in vgg.parameters())
    # the VGG is not part of the checkpoint, the parameters, or a copy of the model
    assert not any("perceptual" in k or "vgg" in k for k in model.state_dict())
    n_vgg = sum(p.numel() for p in vgg.parameters())
    assert all(p.numel() != n_vgg for p in model.parameters())
    assert trainer.ema.model.perceptual is model.perceptual
    assert copy.deepcopy(model).perceptual.net is vgg
    metrics = trainer.evaluate()
    for key in ("test_bpd", "test_iwae_bpd", "test_perceptual", "test_active_units"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def test_perceptual_gradient_reaches_the_reconstruction_only():
    loss = PerceptualLoss("seed", "random")
    x_hat = torch.rand(2, 3, 32, 32, requires_grad=True)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss(x_hat, x).sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert x.grad is None


def test_dfc_config_checks():
    with pytest.raises(ValueError, match="layer set"):
        DFCVAE(DFCVAE.Config(**{**TINY, "layers": "234"}), 3)
