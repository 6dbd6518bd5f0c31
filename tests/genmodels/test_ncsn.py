"""NCSN: sigma schedules, the Langevin sampler against analytic scores, the DSM loss, networks, checkpoints."""
import json
import math

import pytest
import torch
from conftest import make_trainer

from genmodels.data import synthetic_images
from genmodels.experiment import Experiment
from genmodels.io import load_checkpoint
from genmodels.models.ncsn import NCSN, NCSNConfig, dsm_loss
from genmodels.networks.unet import LogSigmaEmbedding
from genmodels.registry import trial_config
from genmodels.samplers import sigmas as schedules
from genmodels.samplers.langevin import annealed_langevin
from genmodels.samplers.sigmas import NoiseSchedule

TINY = dict(arch="unet", width=8, unet_blocks=1, sigma_1=20.0, sigma_L=0.01, num_levels=3, langevin_steps=2,
            langevin_eps=1e-5)


def criterion_eps(T: int, schedule: NoiseSchedule) -> float:
    return schedules.ncsnv2_step_sizes([T], schedule.sigma_L, schedule.gamma)[0]


def gaussian_score(mean: torch.Tensor, cov: torch.Tensor, sigmas: list[float]):
    """Score of N(mean, cov + sigma^2 I), the Gaussian data distribution perturbed at each level."""
    eye = torch.eye(len(mean), dtype=cov.dtype)
    precisions = torch.stack([torch.linalg.inv(cov + s ** 2 * eye) for s in sigmas])
    return lambda x, levels: -torch.einsum("nd,nde->ne", x - mean, precisions[levels])


# ------------------------------------------------------------------------------------------------ schedules

def test_ncsnv2_gamma_for_cifar_dimension():
    gamma = schedules.ncsnv2_gamma(3072)
    assert gamma == pytest.approx(0.963, abs=1e-3)
    assert schedules.shell_overlap(gamma, 3072) == pytest.approx(0.5, abs=1e-9)
    sigmas = schedules.ncsnv2(50.0, 0.01, 3072)
    assert len(sigmas) == 228  # the paper took 232 for CIFAR-10
    assert sigmas[0] == 50.0 and sigmas[-1] == 0.01
    assert gamma <= schedules.ratio(sigmas) < gamma + 2e-4  # the fewest levels that keep neighbours that close


def test_ncsnv2_step_criterion_reproduces_the_paper():
    # CIFAR-10: 50 -> 0.01 in 232 levels, T = 5, eps = 6.2e-6 in NCSNv2's step convention, twice that in ours
    gamma = schedules.ratio(schedules.geometric(50.0, 0.01, 232))
    eps, eps_1 = schedules.ncsnv2_step_sizes([5, 1], 0.01, gamma)
    assert eps == pytest.approx(2 * 6.2e-6, rel=0.02)
    at = schedules.langevin_variance_ratio(eps, 5, 0.01, gamma)
    assert at < schedules.langevin_variance_ratio(eps * 1.2, 5, 0.01, gamma)
    assert at < schedules.langevin_variance_ratio(eps / 1.2, 5, 0.01, gamma)
    assert eps_1 > eps  # one step per level has to go further


def test_variance_ratio_matches_langevin_on_a_point_mass():
    # Proposition 3's premise: data = one point, so p_sigma = N(0, sigma^2 I); run T steps at one level from the
    # previous level's distribution and compare the empirical variance with the closed form.
    sigma_prev, sigma, sigma_L, eps, T = 1.0, 0.8, 0.1, 2e-3, 4
    g = torch.Generator().manual_seed(0)
    x = sigma_prev * torch.randn(200_000, generator=g)
    alpha = eps * sigma ** 2 / sigma_L ** 2
    for _ in range(T):
        x = x + alpha / 2 * (-x / sigma ** 2) + math.sqrt(alpha) * torch.randn(x.shape, generator=g)
    expected = schedules.langevin_variance_ratio(eps, T, sigma_L, sigma / sigma_prev)
    assert x.var().item() / sigma ** 2 == pytest.approx(expected, rel=0.01)


def test_geometric_schedule_and_levels_for_ratio():
    sigmas = schedules.geometric(1.0, 0.01, 10)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.01 and len(sigmas) == 10
    assert schedules.ratio(sigmas) == pytest.approx(0.01 ** (1 / 9))
    assert all(b / a == pytest.approx(schedules.ratio(sigmas)) for a, b in zip(sigmas, sigmas[1:]))
    assert schedules.levels_for_ratio(1.0, 0.01, 0.1) == 3  # exactly 1, 0.1, 0.01
    assert schedules.levels_for_ratio(50.0, 0.01, 0.6) == 18


def test_max_pairwise_distance_and_its_cache(tmp_path):
    x = torch.rand(700, 12)
    assert schedules.max_pairwise_distance(x, n_sub=1000) == pytest.approx(torch.cdist(x, x).max().item(), rel=1e-5)
    images = synthetic_images(64)
    full = torch.cdist(images.float().flatten(1) / 255, images.float().flatten(1) / 255).max().item()
    assert schedules.max_pairwise_distance(images) == pytest.approx(full, rel=1e-5)
    assert schedules.max_pairwise_distance(images, n_sub=16) <= full + 1e-4

    first = schedules.cached_max_pairwise_distance(images, cache_dir=tmp_path)
    assert first == pytest.approx(full, rel=1e-5)
    cache = tmp_path / "sigma_1.json"
    stored = json.loads(cache.read_text())
    stored[f"{schedules.content_key(images)}:2000"] = 123.0  # a second call must read the cache, not recompute
    cache.write_text(json.dumps(stored))
    assert schedules.cached_max_pairwise_distance(images, cache_dir=tmp_path) == 123.0


def test_the_sigma_1_cache_is_keyed_by_content(tmp_path):
    """Two training sets of one dataset and size (another --train-size subset, a changed copy) get their own
    sigma_1; the same images, another tensor, hit the cache."""
    a, b = synthetic_images(64, seed=0), synthetic_images(64, seed=1)
    first = schedules.cached_max_pairwise_distance(a, cache_dir=tmp_path)
    other = schedules.cached_max_pairwise_distance(b, cache_dir=tmp_path)
    assert other != first and other == pytest.approx(schedules.max_pairwise_distance(b), rel=1e-6)
    assert len(json.loads((tmp_path / "sigma_1.json").read_text())) == 2  # both kept
    assert schedules.content_key(a.clone()) == schedules.content_key(a) != schedules.content_key(a.float())
    assert schedules.cached_max_pairwise_distance(a.clone(), cache_dir=tmp_path) == first


# ------------------------------------------------------------------------------------------------- sampler

@pytest.mark.parametrize("init", ["uniform", "gaussian"])
def test_annealed_langevin_reproduces_a_gaussian(init):
    mean = torch.tensor([0.3, 0.5, 0.7])
    a = torch.tensor([[0.12, 0.0, 0.0], [0.05, 0.1, 0.0], [-0.03, 0.04, 0.08]])
    cov = a @ a.T  # eigenvalues 0.004 ... 0.02
    sigmas = schedules.geometric(1.0, 0.01, 10)
    x = annealed_langevin(gaussian_score(mean, cov, sigmas), NoiseSchedule(sigmas, T=100, eps=1e-4), (20_000, 3),
                          init=init, generator=torch.Generator().manual_seed(0))
    target = cov + sigmas[-1] ** 2 * torch.eye(3)  # the chains sample p_sigma_L
    assert (x.mean(0) - mean).abs().max() < 0.005  # a few percent of the smallest standard deviation, 0.06
    sample_cov = torch.cov(x.T)
    assert ((sample_cov - target).norm() / target.norm()).item() < 0.05
    assert (sample_cov.diagonal() / target.diagonal() - 1).abs().max().item() < 0.05


def test_final_denoising_step_is_tweedie():
    mean, cov = torch.tensor([0.4, 0.6]), torch.tensor([[0.02, 0.005], [0.005, 0.01]])
    sigmas = schedules.geometric(1.0, 0.05, 4)
    score = gaussian_score(mean, cov, sigmas)
    kw = dict(schedule=NoiseSchedule(sigmas, T=3, eps=1e-3), shape=(64, 2))
    x = annealed_langevin(score, **kw, generator=torch.Generator().manual_seed(1))
    x_denoised = annealed_langevin(score, **kw, denoise=True, generator=torch.Generator().manual_seed(1))
    # E[x_0 | x] for Gaussian data: mean + cov (cov + sigma_L^2 I)^-1 (x - mean)
    gain = cov @ torch.linalg.inv(cov + sigmas[-1] ** 2 * torch.eye(2))
    torch.testing.assert_close(x_denoised, mean + (x - mean) @ gain.T, rtol=1e-5, atol=1e-6)


def test_sampler_is_seeded():
    score = lambda x, levels: -x  # noqa: E731
    schedule = NoiseSchedule([1.0, 0.5], T=3, eps=0.1)
    run = lambda seed: annealed_langevin(score, schedule, (8, 3),  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


# ------------------------------------------------------------------------------------------------ DSM loss

def test_dsm_loss_at_the_optimal_score_of_a_gaussian():
    # data N(m, S), x~ = x + sigma z: the optimal score is -(S + sigma^2)^-1 (x~ - m), and then
    # sigma s + z = S (S + sigma^2)^-1 z - sigma (S + sigma^2)^-1 S^1/2 u, whose expected squared norm is
    # tr(S (S + sigma^2)^-1) = sum_j lambda_j / (lambda_j + sigma^2). The loss averages 1/2 of that over levels.
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.2, 0.4, 0.6, 0.8])
    a = torch.randn(4, 4, generator=g) * 0.15
    cov = a @ a.T + 0.005 * torch.eye(4)
    sigmas = schedules.geometric(1.0, 0.01, 8)
    x = mean + torch.randn(400_000, 4, generator=g) @ torch.linalg.cholesky(cov).T
    lam = torch.linalg.eigvalsh(cov)
    closed_form = sum(0.5 * (lam / (lam + s ** 2)).sum().item() for s in sigmas) / len(sigmas)
    schedule = NoiseSchedule(sigmas, T=1)
    optimal = dsm_loss(gaussian_score(mean, cov, sigmas), x, schedule, generator=g).mean().item()
    assert optimal == pytest.approx(closed_form, rel=0.01)
    # any other score does worse, e.g. the clean data's score at every level, or the optimum halved
    clean = dsm_loss(gaussian_score(mean, cov, [0.0] * len(sigmas)), x, schedule, generator=g).mean().item()
    shrunk = dsm_loss(lambda y, lv: 0.5 * gaussian_score(mean, cov, sigmas)(y, lv), x, schedule,
                      generator=g).mean().item()
    assert clean > 1.1 * closed_form and shrunk > 1.05 * closed_form


def test_dsm_loss_is_zero_for_a_point_mass():
    # one data point m: p_sigma = N(m, sigma^2 I), the score -(x~ - m) / sigma^2 makes sigma s + z vanish
    x = torch.full((16, 3, 4, 4), 0.3)
    loss = dsm_loss(lambda y, lv: -(y - 0.3) / torch.tensor([2.0, 0.1])[lv].view(-1, 1, 1, 1) ** 2, x,
                    NoiseSchedule([2.0, 0.1], T=1))
    assert loss.abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- networks

@pytest.mark.parametrize("arch", ["unet", "refinenet"])
@pytest.mark.parametrize("channels", [3, 1])
def test_score_network_shapes_and_one_over_sigma_scaling(arch, channels):
    torch.manual_seed(0)
    model = NCSN(NCSNConfig(**{**TINY, "arch": arch, "sigma_1": 50.0, "num_levels": 5}), channels)
    x0 = torch.rand(4, channels, 32, 32)
    norms = []
    for level in (0, 2, 4):  # sigma = 50, 0.7, 0.01
        sigma = model.schedule.sigmas[level]
        levels = torch.full((4,), level)
        s = model.score(x0 + sigma * torch.randn_like(x0), levels)
        assert s.shape == x0.shape and s.dtype == torch.float32
        norms.append(s.flatten(1).norm(dim=1).mean().item() * sigma.item())
    # ||s|| spans 5000x from sigma = 50 to 0.01, sigma * ||s|| stays within 2x: the output is divided by sigma
    assert max(norms) / min(norms) < 2


def test_log_sigma_embedding_separates_neighbouring_large_sigmas():
    embed = LogSigmaEmbedding(32)
    e = lambda s: embed(torch.tensor([s]))[0]  # noqa: E731
    gamma = 0.963  # NCSNv2's neighbouring levels
    near_top = (e(50.0) - e(50.0 * gamma)).norm().item()
    near_bottom = (e(0.01 / gamma) - e(0.01)).norm().item()
    assert near_top == pytest.approx(near_bottom, rel=1e-3)  # equally distinct at both ends of the schedule
    assert near_top > 0.2 * e(50.0).norm().item()
    assert (e(50.0) - e(0.01)).norm().item() > near_top  # and far levels are further apart than neighbours


def test_unet_output_depends_on_sigma_through_the_embedding():
    torch.manual_seed(0)
    model = NCSN(NCSNConfig(**TINY), 3)
    for p in model.net.parameters():  # at init the zeroed residual convs hide the conditioning: randomise them
        torch.nn.init.normal_(p, std=0.2)
    x = torch.rand(2, 3, 32, 32)
    out = lambda s: model.net(x, torch.zeros(2, dtype=torch.long), torch.full((2,), s))  # noqa: E731
    # 0.01 and 0.01/0.963 scale the input alike (by 1/sqrt(sigma^2 + 0.25^2), 0.01% apart), so a change in the
    # output comes from the log-sigma embedding
    assert (out(0.01) - out(0.01 / 0.963)).abs().mean() > 1e-2 * out(0.01).abs().mean()


# ------------------------------------------------------------------------------------------------ the model

def test_schedules_in_the_model():
    model = NCSN(NCSNConfig(**{**TINY, "sigma_schedule": "ncsnv2", "data_sigma_1": 40.0}), 3)
    schedule = model.schedule
    assert schedule.sigmas[0].item() == pytest.approx(40.0) and schedule.sigma_1 == 40.0 and schedule.L > 200
    assert schedule.L == len(schedule.sigmas) and schedule.sigma_L == 0.01 == pytest.approx(schedule.sigmas[-1].item())
    assert schedule.gamma == pytest.approx(schedules.ncsnv2_gamma(3072), abs=2e-4)
    with pytest.raises(ValueError, match="data_sigma_1"):
        NCSN(NCSNConfig(**{**TINY, "sigma_schedule": "ncsnv2"}), 3)
    by_ratio = NCSN(NCSNConfig(**{**TINY, "num_levels": None, "gamma": 0.6}), 3)
    assert by_ratio.schedule.L == schedules.levels_for_ratio(20.0, 0.01, 0.6)
    with pytest.raises(ValueError, match="gamma"):
        NCSN(NCSNConfig(**{**TINY, "num_levels": None}), 3)
    auto = NCSN(NCSNConfig(**{**TINY, "langevin_eps": None, "langevin_steps": 5}), 3)
    assert auto.schedule.eps == pytest.approx(criterion_eps(5, auto.schedule))


def test_fewer_steps_take_larger_but_bounded_steps():
    schedule = NCSN(NCSNConfig(**{**TINY, "langevin_steps": 100, "langevin_eps": 2e-6}), 3).schedule
    assert schedule.eps == 2e-6 and schedule.eps_for(100) == 2e-6 and schedule.eps_for(200) == 2e-6
    short = schedule.eps_for(5)
    assert 2e-6 < short <= 2e-6 * 100 / 5
    assert short <= max(2e-6, criterion_eps(5, schedule)) * (1 + 1e-9)
    assert schedule.alphas(5) == pytest.approx([short * (s / 0.01) ** 2 for s in schedule.sigmas.tolist()])


def test_evaluate_is_repeatable_and_reports_the_schedule():
    torch.manual_seed(0)
    model = NCSN(NCSNConfig(**TINY), 3).eval()
    batches = list(synthetic_images(24).split(8))
    first, second = model.evaluate(batches), model.evaluate(batches)
    assert first == second
    assert first["test_dsm_loss"] > 0 and first["num_levels"] == 3
    assert first["sigma_1"] == pytest.approx(20.0) and first["sigma_L"] == pytest.approx(0.01)
    assert first["gamma"] == pytest.approx((0.01 / 20) ** 0.5) and first["langevin_eps"] == 1e-5


def test_ema_checkpoint_round_trip_samples_identically(tmp_path):
    params = {**TINY, "ema_decay": 0.9, "epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "lr": 1e-2}
    train, test = synthetic_images(32), synthetic_images(8, seed=1)
    trainer = make_trainer("ncsn", params, train, test, device="cpu")
    trainer.train_epoch()
    path = trainer.save(tmp_path / "state.pt")
    restored = make_trainer("ncsn", params, train, test, device="cpu")
    restored.load(path)

    def draw(model):
        torch.manual_seed(123)
        return model.eval().sample(4)

    samples = draw(trainer.eval_model)
    assert samples.shape == (4, 3, 32, 32) and 0 <= samples.min() and samples.max() <= 1
    assert torch.equal(draw(restored.eval_model), samples)
    assert not torch.equal(draw(restored.model), samples)  # the EMA weights, not the raw ones, were sampled


def test_a_searched_eps_changes_the_step_at_every_rung():
    """Two trials whose eps differ take different steps with fewer Langevin steps too. (A cap at the criterion's
    eps once gave both the same step, so their rung-0 samples and grids were identical.)"""
    def step(eps: float, steps: int) -> float:
        return NCSN(NCSNConfig(**{**TINY, "langevin_steps": 5, "langevin_eps": eps}), 3).schedule.eps_for(steps)

    c1 = criterion_eps(1, NCSN(NCSNConfig(**{**TINY, "langevin_steps": 5}), 3).schedule)
    low, high = 0.3 * c1, 0.6 * c1  # both 5x above the one-step criterion: the old cap made them equal
    assert step(low, 1) != step(high, 1)
    assert step(high, 1) / step(low, 1) == pytest.approx(2.0)  # the rung keeps the trials' own ratio
    assert step(low, 5) == low


def test_the_step_size_search_runs_once_per_schedule(monkeypatch):
    """NCSNv2's criterion (a golden-section search) runs when a NoiseSchedule is built, for every T it may need,
    and never again in an epoch, an evaluation or a sample at any budget."""
    calls = []
    search = schedules.ncsnv2_step_sizes
    monkeypatch.setattr(schedules, "ncsnv2_step_sizes", lambda *a, **kw: calls.append(a) or search(*a, **kw))
    params = {**TINY, "langevin_eps": None, "langevin_steps": 4, "ema_decay": 0.9, "epochs": 1, "steps_per_epoch": 2,
              "batch_size": 8}
    trainer = make_trainer("ncsn", params, synthetic_images(32), synthetic_images(8, seed=1), device="cpu")
    assert len(calls) == 1 and list(calls[0][0]) == [1, 2, 3, 4]  # one model built (the EMA copy is a copy)
    calls.clear()
    trainer.train_epoch()
    trainer.evaluate()
    for model in (trainer.model, trainer.eval_model):
        model.sample(2, budget=0.25)
        model.sample(2)
        model.sample(2, T=7)
    assert calls == []


def test_runs_that_stored_0_for_unset_settings_load_and_mean_the_same(tmp_path):
    """Configs written before num_levels, gamma, data_sigma_1 and langevin_eps took None (a checkpoint's flat config,
    a sweep's param space) hold 0 for "not set", and checkpoints hold the sigmas at the model's top level."""
    legacy = {"model.num_levels": 0, "model.gamma": 0.5, "model.data_sigma_1": 0.0, "model.langevin_eps": 0.0}
    cfg = trial_config({**legacy, "model.langevin_steps": 3}, "ncsn").model
    assert (cfg.num_levels, cfg.gamma, cfg.data_sigma_1, cfg.langevin_eps) == (None, 0.5, None, None)
    assert cfg == trial_config({"num_levels": "none", "gamma": 0.5, "langevin_eps": None, "langevin_steps": 3},
                               "ncsn").model

    params = {**TINY, "num_levels": None, "gamma": 0.5, "langevin_eps": None, "ema_decay": 0.9, "epochs": 1,
              "steps_per_epoch": 2, "batch_size": 8}
    train, test = synthetic_images(32), synthetic_images(8, seed=1)
    trainer = make_trainer("ncsn", params, train, test, device="cpu")
    trainer.train_epoch()
    trainer.save(tmp_path / "state.pt")
    state = load_checkpoint(tmp_path / "state.pt")
    state["config"].update(legacy)
    for weights in (state["model"], state["ema"]):
        weights["sigmas"] = weights.pop("schedule.sigmas")
    torch.save(state, tmp_path / "legacy.pt")

    def draw(path):
        model = Experiment.from_checkpoint(path, train, test, {"model.init": "gaussian"}, device="cpu").eval_model
        torch.manual_seed(0)
        return model.schedule, model.eval().sample(2)

    (schedule, samples), (legacy_schedule, legacy_samples) = draw(tmp_path / "state.pt"), draw(tmp_path / "legacy.pt")
    assert legacy_schedule.L == schedule.L == schedules.levels_for_ratio(20.0, 0.01, 0.5)
    assert legacy_schedule.eps == schedule.eps == pytest.approx(criterion_eps(2, schedule))
    assert torch.equal(legacy_samples, samples)


def test_a_checkpoint_of_other_sigmas_does_not_load():
    model = NCSN(NCSNConfig(**TINY), 3)
    other = NCSN(NCSNConfig(**{**TINY, "sigma_1": 10.0}), 3)
    with pytest.raises(ValueError, match="sigmas"):
        other.load_state_dict(model.state_dict())


def test_prepare_derives_sigma_1_for_the_ncsnv2_schedule_only(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSWEEP_DATA", str(tmp_path))
    images = synthetic_images(64)
    assert NCSN.prepare(trial_config({}, "ncsn"), images) == {}  # geometric: nothing needs the data
    ncsnv2 = trial_config({"sigma_schedule": "ncsnv2"}, "ncsn")
    derived = NCSN.prepare(ncsnv2, images)
    assert derived == {"data_sigma_1": pytest.approx(schedules.max_pairwise_distance(images), rel=1e-6)}
    assert NCSN.prepare(ncsnv2.replace("model", **derived), images) == {}  # already resolved


def test_cheap_evaluation_is_the_full_one():
    torch.manual_seed(0)
    model = NCSN(NCSNConfig(**TINY), 3).eval()
    batches = list(synthetic_images(24).split(8))
    assert model.evaluate(batches, full=False) == model.evaluate(batches)
