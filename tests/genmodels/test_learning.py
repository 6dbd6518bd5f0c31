"""Models learn: a small VAE trained briefly on a Fashion-MNIST subset (real images where Debian's package is
installed, stand-ins in the same on-disk format elsewhere) beats its own untrained self on bits/dim and on the FID
of its samples. A change that stops models from learning fails here, in CI."""
from __future__ import annotations

from conftest import write_fashion_mnist

from genmodels.data import load_images
from genmodels.experiment import make_experiment
from genmodels.metrics.fid import FIDScorer


def test_a_briefly_trained_vae_beats_an_untrained_one_on_bpd_and_sample_fid(tmp_path):
    source = write_fashion_mnist(tmp_path, n_train=2048, n_test=256)
    train = load_images("fashion_mnist", "train", tmp_path, download=False)
    test = load_images("fashion_mnist", "test", tmp_path, download=False)
    assert train.shape == (2048, 1, 32, 32) and test.shape == (256, 1, 32, 32)
    exp = make_experiment("vae", {"arch": "conv-small", "width": 16, "latent": 16, "likelihood_scale": 0.2,
                                  "learn_scale": True, "eval_k": 4, "lr": 2e-3, "batch_size": 64, "epochs": 3},
                          train, test, device="cpu")
    scorer = FIDScorer("standin")
    ref = scorer.reference_from_features(scorer.features(test), key="test", total=len(test))

    def quality() -> tuple[float, float]:
        bpd = exp.evaluate()["test_bpd"]
        return bpd, scorer.sample_fid(exp.eval_model.eval(), 256, ref, seed=0)["fid"]

    untrained = quality()
    exp.run(lambda metrics: None)
    trained = quality()
    print(f"{source} Fashion-MNIST, bits/dim and standin FID_256: untrained {untrained}, trained {trained}")
    assert trained[0] < untrained[0] - 1.0, (untrained, trained)  # bits/dim
    assert trained[1] < 0.8 * untrained[1], (untrained, trained)  # samples look more like the test images
