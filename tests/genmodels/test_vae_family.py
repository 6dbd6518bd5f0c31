"""ResNet-VAE, IWAE (and DReG), the VAE family's IWAE-NLL evaluation, and latent tools.

The bounds are checked on a linear-Gaussian model, p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I), whose marginal
p(x) = N(b, WW^T + s^2 I) is known in closed form; it plugs linear encode/decode into the IWAE model, so the code
under test is the same `log_weights` / `iwae_bound` / `iwae_bpd` / `loss` the conv and resnet models use.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genmodels.data import synthetic_images
from genmodels.metrics.latent import (
    interpolate,
    latent_grids,
    linear_path,
    slerp_path,
    traversal,
)
from genmodels.metrics.likelihood import gaussian_log_prob, kl_standard_normal
from genmodels.models.base import GenerativeModel
from genmodels.models.iwae import IWAE, IWAEConfig
from genmodels.models.vae import VAE, VAEConfig
from genmodels.networks.convnets import PreActResBlock, resnet_decoder, resnet_encoder
from genmodels.registry import build_model


class LinearGaussian(IWAE):
    """Linear decoder with Gaussian noise and a linear Gaussian encoder q(z|x) = N(Ax + c, diag(exp(q_logvar)))."""

    def __init__(self, W, b, s, A, c, q_logvar, k=10, estimator="iwae"):
        GenerativeModel.__init__(self, IWAEConfig(k=k, estimator=estimator), channels=1)
        self.W, self.b = nn.Parameter(W.clone()), nn.Parameter(b.clone())
        self.A, self.c, self.q_logvar = nn.Parameter(A.clone()), nn.Parameter(c.clone()), nn.Parameter(q_logvar.clone())
        self.log_scale = nn.Buffer(torch.tensor(math.log(s)))
        self.dims = W.shape[0]

    def encode(self, x):
        return x @ self.A.T + self.c, self.q_logvar.expand(len(x), -1)

    def decode(self, z):
        return z @ self.W.T + self.b

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.log_scale.exp() ** 2 * torch.eye(self.dims)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def analytic_elbo(self, x):
        mu, logvar = self.encode(x)
        trace = ((self.W ** 2) @ logvar.exp().T).T.sum(1)  # E_q ||W(z - mu)||^2
        recon = gaussian_log_prob(x, self.decode(mu), self.log_scale) - 0.5 * trace / self.log_scale.exp() ** 2
        return recon - kl_standard_normal(mu, logvar)

    def exact_posterior(self):
        """Set q to the true posterior N(S W^T (x - b) / s^2, S), S = (I + W^T W / s^2)^-1, for W with orthogonal
        columns (then S is diagonal, as q is)."""
        s2 = self.log_scale.exp() ** 2
        S = torch.linalg.inv(torch.eye(self.W.shape[1]) + self.W.T @ self.W / s2)
        assert torch.allclose(S, torch.diag(torch.diagonal(S)))
        with torch.no_grad():
            self.A.copy_(S @ self.W.T / s2)
            self.c.copy_(-(S @ self.W.T @ self.b) / s2)
            self.q_logvar.copy_(torch.diagonal(S).log())


def linear_gaussian(seed=0, D=3, L=2, **kw) -> LinearGaussian:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, L, generator=g) * 0.3
    A = torch.randn(L, D, generator=g) * 0.5  # a poor encoder: the bounds are strictly below log p(x)
    return LinearGaussian(W, torch.full((D,), 0.5), 0.1, A, torch.zeros(L), torch.full((L,), -2.0), **kw)


def tiny(name="vae", **cfg):
    params = {"arch": "conv-small", "width": 4, "latent": 8, "norm": "group", "eval_k": 4, **cfg}
    return build_model(name, params, channels=3)


# ---------------------------------------------------------------- the bound on a model with a known log p(x)

def test_iwae_bound_between_elbo_and_log_marginal_and_rises_with_k():
    torch.manual_seed(0)
    model = linear_gaussian().requires_grad_(False)
    x = torch.rand(4, 3)
    reps = 100
    log_p, elbo = model.log_marginal(x), model.analytic_elbo(x)
    assert (elbo < log_p - 1).all()  # the test needs a real gap to see L_k move through it
    means, ses = [], []
    for k in (1, 4, 32, 256):
        lk = model.iwae_bound(x.repeat(reps, 1), k, chunk_decodes=1000).view(reps, 4)  # many chunks at large k
        means.append(lk.mean(0))
        ses.append(lk.std(0) / math.sqrt(reps))
    # L_1 is the ELBO (single-sample estimate of the analytic one)
    assert ((means[0] - elbo).abs() < 4 * ses[0] + 1e-3).all()
    for (m_lo, s_lo), (m_hi, s_hi) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        rises = m_hi > m_lo + 2 * (s_lo + s_hi)
        assert (rises | (m_hi > log_p - 0.05)).all()  # up, unless already at log p(x)
        assert (m_hi <= log_p + 4 * s_hi + 1e-3).all()
    assert ((log_p - means[-1]) < 0.2 * (log_p - elbo)).all()  # converging toward log p(x)


def test_exact_posterior_makes_every_bound_tight():
    W = torch.tensor([[0.3, 0.0], [0.0, 0.2], [0.0, 0.0]])
    model = LinearGaussian(W, torch.full((3,), 0.5), 0.1, torch.zeros(2, 3), torch.zeros(2), torch.zeros(2))
    model.exact_posterior()
    x = torch.rand(5, 3)
    torch.testing.assert_close(model.analytic_elbo(x), model.log_marginal(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.iwae_bound(x, 7), model.log_marginal(x), atol=1e-4, rtol=0)


def test_iwae_bpd_is_bits_per_dim_of_the_discrete_data():
    """1-D data: P(v) = Phi((v+1)/256) - Phi(v/256) under the Gaussian marginal; the dequantised bound in bpd must
    match -log2 P(v) (a missing +8, a natural log or a wrong dims would be off by bits)."""
    model = LinearGaussian(torch.tensor([[0.08]]), torch.tensor([0.5]), 0.06, torch.zeros(1, 1), torch.zeros(1),
                           torch.zeros(1))
    model.exact_posterior()
    values = torch.tensor([100, 120, 128, 131, 140, 160], dtype=torch.uint8)
    marginal = torch.distributions.Normal(0.5, math.sqrt(0.08 ** 2 + 0.06 ** 2))
    probs = marginal.cdf((values.double() + 1) / 256) - marginal.cdf(values.double() / 256)
    true_bpd = (-probs.log2()).mean().item()
    torch.manual_seed(0)
    x = values.repeat(400).view(-1, 1)
    model.train()
    bpd = model.iwae_bpd([x[:1200], x[1200:]], k=3)
    assert model.training  # restored after evaluating in eval mode
    assert 5 < true_bpd < 7
    assert bpd == pytest.approx(true_bpd, abs=0.01)


# ---------------------------------------------------------------- IWAE training and DReG

def test_dreg_and_iwae_same_bound_same_decoder_gradient_same_expected_encoder_gradient():
    torch.manual_seed(0)
    x = (torch.rand(4, 3) * 255).round().to(torch.uint8).repeat(5000, 1)
    results = {}
    for estimator in ("iwae", "dreg"):
        model = linear_gaussian(k=10, estimator=estimator)
        torch.manual_seed(1)
        loss, logs = model.loss(x)
        loss.backward()
        enc = torch.cat([model.A.grad.flatten(), model.c.grad, model.q_logvar.grad])
        results[estimator] = (loss.detach(), logs["bound_nats"], torch.cat([model.W.grad.flatten(), model.b.grad]), enc)
    (l_i, b_i, dec_i, enc_i), (l_d, b_d, dec_d, enc_d) = results["iwae"], results["dreg"]
    assert l_i == l_d and b_i == b_d  # the same bound value
    torch.testing.assert_close(dec_d, dec_i)  # DReG changes the encoder's estimator only
    assert (enc_d - enc_i).norm() < 0.03 * enc_i.norm()  # both unbiased for the same gradient


def test_iwae_training_step_on_images_improves_the_bound():
    torch.manual_seed(0)
    x = synthetic_images(8, seed=3)
    for estimator in ("iwae", "dreg"):
        model = tiny("iwae", k=3, estimator=estimator)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        before = model.loss(x)[0].item()
        for _ in range(8):
            loss, logs = model.loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert 1 <= logs["ess"].item() <= 3
        assert model.loss(x)[0].item() < before


def test_iwae_rejects_batch_norm_and_bad_settings():
    with pytest.raises(ValueError, match="model.norm must be one of group, none"):
        tiny("iwae", norm="batch")
    with pytest.raises(ValueError, match="estimator"):
        tiny("iwae", estimator="vimco")
    with pytest.raises(ValueError, match="model.beta must be >= 1"):
        tiny("iwae", beta=0.5)
    assert IWAEConfig().norm == "group"


# ---------------------------------------------------------------- evaluation of the whole family

@pytest.mark.parametrize("name,cfg", [("vae", {"norm": "batch"}), ("vae", {"arch": "resnet"}), ("iwae", {}),
                                      ("dfc", {"vgg_weights": "random"})])
def test_every_vae_family_model_reports_iwae_bpd_elbo_bpd_and_active_units(name, cfg):
    torch.manual_seed(0)
    model = tiny(name, **cfg).eval()
    x = synthetic_images(12, seed=2)
    m = model.evaluate([x[:8], x[8:]])
    for key in ("test_bpd", "test_iwae_bpd", "test_iwae_bpd_k4", "test_active_units"):
        assert math.isfinite(m[key]), key
    assert m["test_iwae_bpd"] == m["test_iwae_bpd_k4"]
    assert m["test_iwae_bpd"] < m["test_bpd"]  # an untrained model has a wide ELBO gap for k = 4 to close
    assert 0 <= m["test_active_units"] <= 8


def test_active_units_counts_latents_whose_posterior_mean_varies():
    model = linear_gaussian(D=3, L=3)
    with torch.no_grad():  # unit 0 follows x strongly, unit 1 barely (var < 1e-2), unit 2 not at all
        model.A.copy_(torch.tensor([[2.0, 0, 0], [0, 0.05, 0], [0, 0, 0]]))
    x = (torch.rand(200, 3) * 255).round().to(torch.uint8)
    assert model.evaluate([x])["test_active_units"] == 1.0


def test_iwae_bpd_chunks_large_k_and_tightens():
    torch.manual_seed(0)
    model = tiny("vae")
    x = synthetic_images(4, seed=5)
    torch.manual_seed(1)
    assert model.iwae_bpd([x], k=200) < model.iwae_bpd([x], k=1)


# ---------------------------------------------------------------- ResNet-VAE

@pytest.mark.parametrize("c_in,c_out,resample", [(8, 8, "none"), (8, 16, "down"), (16, 8, "up")])
def test_resblock_does_not_mutate_its_input(c_in, c_out, resample):
    block = PreActResBlock(c_in, c_out, "group", resample)
    x = torch.randn(2, c_in, 8, 8)  # negative values: an in-place (leaky) ReLU would change them
    before = x.clone()
    y = block(x)
    assert torch.equal(x, before)
    side = {"none": 8, "down": 4, "up": 16}[resample]
    assert y.shape == (2, c_out, side, side)


def test_resblock_skip_carries_the_raw_input():
    block = PreActResBlock(8, 8, "group")
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.conv2.bias)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(block(x), x)  # not ReLU(x): the skip path is the untouched input


def test_resnet_encoder_and_decoder_are_residual_and_sized_by_width_and_blocks():
    enc, shape = resnet_encoder(3, 8, 2, "group")
    dec = resnet_decoder(3, 8, 2, "group")
    assert shape == (64, 4, 4)
    assert sum(isinstance(m, PreActResBlock) for m in enc) == 6 and sum(isinstance(m, PreActResBlock) for m in dec) == 6
    z = enc(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, *shape) and dec(z).shape == (2, 3, 32, 32)
    model = tiny("vae", arch="resnet", blocks=2)
    assert model.sample(3).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="blocks"):
        tiny("vae", arch="conv", blocks=2)


def test_default_architectures_match_the_seeds_sizes():
    counts = {arch: sum(p.numel() for p in VAE(VAEConfig(arch=arch), 3).parameters())
              for arch in ("conv-small", "conv", "resnet")}
    assert 0.9e6 < counts["conv-small"] < 1.1e6  # VAE seed ~0.98M
    assert 3.0e6 < counts["resnet"] < 4.0e6  # ResNet-VAE seed ~3.5M (with a non-residual decoder)


# ---------------------------------------------------------------- latent tools

def test_interpolation_endpoints_decode_the_two_encodings():
    torch.manual_seed(0)
    model = tiny("vae").eval()
    x = synthetic_images(6, seed=4)
    x0, x1 = x[:3], x[3:]
    with torch.no_grad():
        d0, d1 = model.decode(model.encode(x0.float() / 255)[0]), model.decode(model.encode(x1.float() / 255)[0])
    for kind in ("linear", "slerp"):
        path = interpolate(model, x0, x1, steps=5, kind=kind)
        assert path.shape == (3, 5, 3, 32, 32)
        torch.testing.assert_close(path[:, 0], d0, atol=1e-6, rtol=0)
        torch.testing.assert_close(path[:, -1], d1, atol=1e-6, rtol=0)
        assert not torch.allclose(path[:, 2], d0, atol=1e-3)


def test_paths_are_exact_at_the_ends_and_slerp_keeps_the_norm():
    z0, z1 = torch.randn(4, 16), torch.randn(4, 16)
    z1 = z1 / z1.norm(dim=1, keepdim=True) * z0.norm(dim=1, keepdim=True)
    for path in (linear_path(z0, z1, 7), slerp_path(z0, z1, 7)):
        assert torch.equal(path[:, 0], z0) and torch.equal(path[:, -1], z1)
    norms = slerp_path(z0, z1, 7).norm(dim=2)
    torch.testing.assert_close(norms, z0.norm(dim=1, keepdim=True).expand(-1, 7))
    torch.testing.assert_close(linear_path(z0, z1, 3)[:, 1], (z0 + z1) / 2)
    parallel = slerp_path(z0, 2 * z0, 3)  # nearly parallel pairs fall back to linear
    torch.testing.assert_close(parallel[:, 1], 1.5 * z0)


def test_traversal_moves_the_most_active_unit_only():
    model = linear_gaussian(D=3, L=3)
    with torch.no_grad():
        model.A.copy_(torch.tensor([[0.1, 0, 0], [0, 0, 0], [0, 0, 3.0]]))
    images = (torch.rand(50, 3) * 255).round().to(torch.uint8)
    decoded, dims = traversal(model, images, n_dims=2, steps=5)
    assert dims.tolist() == [2, 0]
    # decode is linear: successive columns of row 0 differ by a multiple of W[:, 2]
    step = decoded[0, 1] - decoded[0, 0]
    torch.testing.assert_close(step, model.W[:, 2].detach() * 1.5)


def test_latent_grids_write_pngs_and_best_weight_reconstruction_for_iwae(tmp_path):
    torch.manual_seed(0)
    images = synthetic_images(20, seed=6)
    vae_paths = latent_grids(tiny("vae", arch="resnet"), images, tmp_path / "vae", n_pairs=4, steps=6)
    assert set(vae_paths) == {"interp_linear", "interp_slerp", "traversal"}
    iwae = tiny("iwae")
    iwae_paths = latent_grids(iwae, images, tmp_path / "iwae", n_pairs=4, steps=6,
                              best_weight=iwae.importance_weighted)
    assert set(iwae_paths) == set(vae_paths) | {"best_weight_recon"}
    for p in [*vae_paths.values(), *iwae_paths.values()]:
        assert p.exists() and p.read_bytes()[:4] == b"\x89PNG"


def test_best_weight_sample_has_the_largest_importance_weight():
    from genmodels.metrics.latent import best_weight_reconstruction

    model = linear_gaussian()
    x = (torch.rand(3, 3) * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    best = best_weight_reconstruction(model, x, k=50)
    torch.manual_seed(0)  # the same draws: dequantisation noise, then the k samples
    from genmodels.data import dequantize

    xd = dequantize(x)
    mu, logvar = model.encode(xd)
    log_w, z = model.log_weights(xd, mu, logvar, 50)
    with torch.no_grad():
        candidates = model.decode(z.flatten(0, 1)).view(50, 3, -1)
        dist = (candidates - best.unsqueeze(0)).norm(dim=2)
    assert dist.argmin(0).tolist() == log_w.argmax(0).tolist()


# ---------------------------------------------------------------- the cheap evaluation between ASHA's milestones

@pytest.mark.parametrize("name,cfg", [("vae", {"norm": "batch"}), ("iwae", {}), ("dfc", {"vgg_weights": "random"})])
def test_cheap_evaluation_is_the_full_one_without_the_importance_weighted_bound(name, cfg):
    torch.manual_seed(0)
    model = tiny(name, **cfg).eval()
    x = synthetic_images(8, seed=2)  # one batch: with more, the bound's draws shift the next batch's dequantisation
    torch.manual_seed(1)
    full = model.evaluate([x])
    torch.manual_seed(1)
    cheap = model.evaluate([x], full=False)
    assert set(cheap) == set(full) - {"test_iwae_nll", "test_iwae_bpd", "test_iwae_bpd_k4"}
    assert cheap == {key: full[key] for key in cheap}


def count_host_reads(monkeypatch) -> list[str]:
    """Log every tensor-to-Python read (each one a host sync on a GPU) from here on."""
    reads = []
    for method in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def counted(tensor, *args, _original=getattr(torch.Tensor, method), _method=method):
            reads.append(_method)
            return _original(tensor, *args)
        monkeypatch.setattr(torch.Tensor, method, counted)
    return reads


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("name,cfg", [("vae", {}), ("iwae", {}), ("dfc", {"vgg_weights": "random"})])
def test_evaluation_reads_the_host_as_often_for_six_batches_as_for_two(name, cfg, full, monkeypatch):
    torch.manual_seed(0)
    model = tiny(name, **cfg).eval()
    x = synthetic_images(12, seed=3)
    reads = count_host_reads(monkeypatch)
    model.evaluate(x.split(6), full=full)
    two = len(reads)
    model.evaluate(x.split(2), full=full)
    assert 0 < two and len(reads) - two == two
