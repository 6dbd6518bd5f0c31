"""VQ-VAE: EMA codebook, dead-code restarts, straight-through gradients, the PixelCNN prior and the stage switch."""
from __future__ import annotations

import pytest
import torch
from conftest import make_trainer

from genmodels.data import synthetic_images
from genmodels.models.vqvae import VQVAE
from genmodels.networks.pixelcnn import GatedPixelCNN
from genmodels.networks.quantizer import VectorQuantizer, perplexity
from genmodels.registry import build_model

TINY = dict(width=8, res_blocks=1, codebook_size=16, code_dim=8, prior_width=8, prior_layers=4, restart_window=5)


def clustered(centres: torch.Tensor, n: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """n points around random centres, as (n, D, 1, 1) 'encoder outputs'."""
    idx = torch.randint(len(centres), (n,), generator=g)
    return (centres[idx] + noise * torch.randn(n, centres.shape[1], generator=g))[:, :, None, None]


def usage(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    return torch.bincount(q.codes(z).flatten(), minlength=q.num_codes)


def test_ema_codebook_converges_to_cluster_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 3
    q = VectorQuantizer(8, 4, mode="ema", decay=0.9)
    with torch.no_grad():  # start each code off its centre, near enough that the assignment is right from step 1
        q.codebook.copy_(centres + 0.5 * torch.randn(8, 4, generator=g))
        q.code_sum.copy_(q.codebook)
    start = (q.codebook - centres).norm(dim=1).max().item()
    q.train()
    for _ in range(100):
        q(clustered(centres, 512, 0.1, g))
    error = (q.codebook - centres).norm(dim=1).max().item()
    # The EMA is a running mean of assigned points: error shrinks from ~1 to the noise of a cluster mean (~0.01).
    assert start > 0.5
    assert error < 0.05


def test_ema_with_restarts_finds_every_centre_from_the_default_init():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(8, 4, generator=g) * 3
    torch.manual_seed(1)
    q = VectorQuantizer(8, 4, mode="ema", decay=0.9, restart_window=5).train()
    for _ in range(300):
        q(clustered(centres, 512, 0.1, g))
        q.restart_dead_codes()
    nearest_code = torch.cdist(centres, q.codebook).min(dim=1).values
    assert nearest_code.max().item() < 0.1  # every centre has a code on it, not just the few nearest the origin


@pytest.mark.parametrize("seed", range(4))
def test_restarts_cover_every_cluster_from_a_codebook_far_from_the_data(seed):
    """Codes start far from well-separated clusters: at first one code takes every vector (at their mean) and
    all others are dead. Restarts drawn far from the nearest code (k-means++ style, one at a time) must leave a
    code near every centre; re-seeding at random outputs of the batch lets two codes share one cluster while a
    code serving several clusters at their mean stays "in use"."""
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(12, 4, generator=g)  # pairwise ~14 apart, noise 0.1
    torch.manual_seed(seed)
    q = VectorQuantizer(16, 4, mode="ema", decay=0.9, restart_window=5).train()
    with torch.no_grad():
        q.codebook.add_(100.0)
        q.code_sum.copy_(q.codebook)
    for _ in range(200):
        q(clustered(centres, 256, 0.1, g))
        q.restart_dead_codes()
    nearest_code = torch.cdist(centres, q.codebook).min(dim=1).values
    assert nearest_code.max().item() < 0.5, nearest_code


@pytest.mark.parametrize("mode", ["ema", "loss"])
def test_restarts_revive_codes_where_a_plain_codebook_collapses(mode):
    g = torch.Generator().manual_seed(2)
    # Clusters that share one direction away from the origin, like encoder outputs at init: to a small random
    # codebook they all look alike, so the one or two codes pointing that way take every vector.
    centres = 3 + 0.5 * torch.randn(16, 8, generator=g)
    test = clustered(centres, 2048, 0.1, g)

    def run(restarts: bool) -> torch.Tensor:
        torch.manual_seed(0)
        q = VectorQuantizer(32, 8, mode=mode, decay=0.9, restart_window=5).train()
        opt = torch.optim.Adam(q.parameters(), lr=1e-2) if mode == "loss" else None
        for _ in range(150):
            _, _, terms = q(clustered(centres, 256, 0.1, g))
            if opt:
                opt.zero_grad()
                terms["codebook"].backward()
                opt.step()
            if restarts:
                q.restart_dead_codes()
        return usage(q, test)

    plain, restarted = run(False), run(True)
    assert (plain > 0).sum() <= 4 and perplexity(plain) < 4  # the few codes nearest the data take everything
    assert (restarted > 0).sum() >= 16 and perplexity(restarted) > 12


def test_restarts_raise_codebook_usage_of_the_model():
    train, test = synthetic_images(256, 0), synthetic_images(64, 1)
    perplexities = {}
    for restarts in (False, True):
        cfg = {**TINY, "codebook_size": 32, "restarts": restarts, "stage1_epochs": 1,
               "epochs": 1, "steps_per_epoch": 40, "batch_size": 32, "lr": 2e-3}
        trainer = make_trainer("vqvae", cfg, train, test, device="cpu")
        before = trainer.evaluate()
        trainer.train_epoch()
        perplexities[restarts] = trainer.evaluate()["test_perplexity"]
    assert before["test_dead_codes"] > 16  # the seed's problem: at init most codes are never chosen
    assert perplexities[True] > 2 * perplexities[False]


def test_kmeans_init_spreads_the_codebook_over_the_first_batch():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(16, 8, generator=g) * 3
    torch.manual_seed(0)
    q = VectorQuantizer(16, 8, mode="ema", kmeans_init=True).train()
    first = clustered(centres, 1024, 0.1, g)
    q(first)
    assert bool(q.initialised)
    assert perplexity(usage(q, first)) > 10  # without k-means every vector goes to the 1-2 codes nearest the data
    before = q.codebook.clone()
    q(first)  # k-means runs once only
    assert torch.allclose(q.codebook, before, atol=0.05)


def test_straight_through_gradient_reaches_the_encoder():
    q = VectorQuantizer(16, 4).train()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    codebook = q.codebook.clone()  # the quantised output uses the codebook before this step's EMA update
    z_st, codes, _ = q(z_e)
    assert torch.allclose(z_st.detach(), codebook[codes].permute(0, 3, 1, 2), atol=1e-6)  # forward: quantised
    weights = torch.randn_like(z_st)
    (z_st * weights).sum().backward()
    assert torch.allclose(z_e.grad, weights)  # backward: the identity

    torch.manual_seed(0)
    model = build_model("vqvae", {**TINY, "commitment": 0.0}, channels=3).train()  # no commitment gradient
    loss, _ = model.loss(synthetic_images(4))
    loss.backward()
    first_conv = model.encoder[0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0


def test_pixelcnn_is_causal_without_blind_spot():
    torch.manual_seed(0)
    prior = GatedPixelCNN(num_codes=5, dim=8, layers=4)
    e = torch.randn(1, 8, 8, 8, requires_grad=True)  # (N, H, W, dim) embeddings, fed in place of embed(codes)
    prior.embed.register_forward_hook(lambda module, inputs, output: e)
    logits = prior(torch.zeros(1, 8, 8, dtype=torch.long))
    for p in range(64):
        i, j = divmod(p, 8)
        (grad,) = torch.autograd.grad(logits[0, :, i, j].sum(), e, retain_graph=True)
        depends = grad[0].abs().sum(-1).flatten() > 0
        assert not depends[p:].any(), f"position {p} sees positions >= itself"
        assert depends[:p].all(), f"position {p} is blind to some earlier position"


def test_pixelcnn_learns_and_samples_two_patterns():
    torch.manual_seed(0)
    patterns = torch.randint(6, (2, 4, 4))
    prior = GatedPixelCNN(num_codes=6, dim=16, layers=2)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(100):
        batch = patterns[torch.randint(2, (32,))]
        loss = prior.nll(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = prior.sample(16, (4, 4))
    # The first code decides the pattern, every later code follows from the earlier ones: a sampler that fed
    # the wrong context (or read a code before drawing it) would mix the two.
    matches = (samples[:, None] == patterns[None]).flatten(2).all(-1)
    assert matches.any(1).float().mean() >= 0.9


def test_samples_are_valid_codes_and_images():
    torch.manual_seed(0)
    model = build_model("vqvae", TINY, channels=3).eval()
    codes = model.prior.sample(5, model.grid)
    assert codes.shape == (5, 8, 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < TINY["codebook_size"]
    images = model.sample(5)
    assert images.shape == (5, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    recon = model.reconstruct(synthetic_images(3))
    assert recon.shape == (3, 3, 32, 32) and recon.min() >= 0 and recon.max() <= 1


@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_stage_switch_freezes_the_autoencoder(codebook):
    cfg = {**TINY, "codebook": codebook, "stage1_epochs": 1, "epochs": 2, "steps_per_epoch": 3,
           "batch_size": 16}
    trainer = make_trainer("vqvae", cfg, synthetic_images(64, 0), synthetic_images(16, 1), device="cpu")
    model = trainer.model
    snapshot = lambda module: {k: v.clone() for k, v in module.state_dict().items()}  # noqa: E731
    prior_at_init, encoder_at_init = snapshot(model.prior), model.encoder[0].weight.detach().clone()

    trainer.train_epoch()  # stage 1: the prior is not in the loss, so it has no grads and Adam skips it
    assert all(torch.equal(v, model.prior.state_dict()[k]) for k, v in prior_at_init.items())
    stage1 = {name: snapshot(m) for name, m in [("encoder", model.encoder), ("quantizer", model.quantizer),
                                               ("decoder", model.decoder)]}
    assert not torch.equal(stage1["encoder"]["0.weight"], encoder_at_init)  # the autoencoder did train

    metrics = trainer.train_epoch()  # stage 2
    assert model.stage == 2 and "train_prior_bits_per_code" in metrics
    for name, before in stage1.items():
        after = getattr(model, name).state_dict()
        for k, v in before.items():  # weights, EMA codebook buffers and usage counters: bit-identical
            assert torch.equal(v, after[k]), f"{name}.{k} changed in stage 2"
    assert not all(torch.equal(v, model.prior.state_dict()[k]) for k, v in prior_at_init.items())
    assert not model.quantizer.training and not model.encoder.training and model.prior.training


def test_evaluate_reports_usage_and_prior_bits():
    torch.manual_seed(0)
    model = build_model("vqvae", TINY, channels=3).eval()
    model.start_epoch(model.cfg.stage1_epochs)  # stage 2 begun: the prior's metrics are due
    m = model.evaluate([synthetic_images(8, 1)])
    for key in ("test_mse", "test_psnr", "test_perplexity", "test_dead_codes", "test_prior_bits_per_code",
                "test_prior_bpd", "dead_codes", "codes_restarted"):
        assert key in m
    assert 1 <= m["test_perplexity"] <= TINY["codebook_size"]
    # An untrained prior is close to uniform: about log2(K) bits per code, 64 codes spread over 3072 dims.
    assert abs(m["test_prior_bits_per_code"] - 4.0) < 0.5
    assert m["test_prior_bpd"] == pytest.approx(m["test_prior_bits_per_code"] * 64 / 3072)


def test_a_run_shorter_than_stage_1_says_so_and_reports_no_prior():
    from genmodels.registry import trial_config

    short = trial_config({**TINY, "stage1_epochs": 3, "epochs": 2}, "vqvae")
    assert "no prior" in VQVAE.training_plan(short)
    assert "prior for 2" in VQVAE.training_plan(trial_config({**TINY, "stage1_epochs": 3, "epochs": 5}, "vqvae"))
    trainer = make_trainer("vqvae", {**TINY, "stage1_epochs": 3, "epochs": 2, "steps_per_epoch": 2, "batch_size": 8},
                           synthetic_images(32, 0), synthetic_images(8, 1))
    trainer.train_epoch()
    trainer.train_epoch()
    metrics = trainer.evaluate()
    assert "test_mse" in metrics and not any("prior" in k for k in metrics)
    assert not trainer.eval_model.can_sample  # an untrained prior draws nothing a grid or an FID should show


def test_vqvae_space_presets_are_consistent():
    from sweeps.spaces import SPACES

    space = SPACES["vqvae"]
    assert space.model == "vqvae" and space.metric == "fid"
    for preset in space.presets.values():
        config = {**space.params, **preset.config}
        assert config["epochs"] > config["stage1_epochs"]  # both stages run
        assert preset.grace_period == config["stage1_epochs"] + 1  # ASHA's first cut sees a trained prior


def test_resume_inside_stage_1_and_across_the_boundary_is_exact(tmp_path):
    cfg = {**TINY, "kmeans_init": True, "stage1_epochs": 2, "epochs": 3, "steps_per_epoch": 4,
           "batch_size": 32, "ema_decay": 0.9}
    data = synthetic_images(128, 0), synthetic_images(32, 1)
    straight = make_trainer("vqvae", cfg, *data, device="cpu")
    for _ in range(3):
        straight.train_epoch()
    first = make_trainer("vqvae", cfg, *data, device="cpu")
    first.train_epoch()
    first.save(tmp_path / "state.pt")
    resumed = make_trainer("vqvae", cfg, *data, device="cpu")
    resumed.load(tmp_path / "state.pt")
    resumed.train_epoch()  # k-means must not run again on the resumed model's first batch
    resumed.train_epoch()  # the stage comes back from the epoch
    assert resumed.model.stage == 2
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_cheap_evaluation_is_the_full_one():
    torch.manual_seed(0)
    model = build_model("vqvae", TINY, channels=3).eval()
    model.start_epoch(model.cfg.stage1_epochs)  # with the prior's metrics
    batches = list(synthetic_images(16, 1).split(8))
    assert model.evaluate(batches, full=False) == model.evaluate(batches)
