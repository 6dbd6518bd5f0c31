"""The Optuna side of a sweep's search space: each searched key's distribution, as Tune's OptunaSearch samples it
(the study on disk, importances and --warm-start tell Optuna trials in these terms), the study's direction, and
Optuna kept quiet while gensweep builds studies."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

from sweeps.spec import SweepSpec
from sweeps.sweep_results import is_number


def search_distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    """Optuna's distribution of each searched key, from the sweep's Ray Tune domains: the spec's own on a new sweep;
    a loaded spec has none (Tune keeps them), so they are rebuilt from its space and preset, as from_args built
    them. A domain Optuna cannot express is left out (its values then are not in the study)."""
    domains = dict(spec.domains)
    if not domains:
        from genmodels.registry import qualified
        from sweeps.domains import to_tune
        from sweeps.spaces import SPACES

        space = SPACES.get(spec.space)
        if space is not None and spec.preset in space.presets:
            domains = {**qualified(space.model, to_tune(space.params)),
                       **qualified(space.model, to_tune(space.presets[spec.preset].config))}
    out = {k: to_distribution(domains[k]) for k in spec.searched if k in domains}
    return {k: d for k, d in out.items() if d is not None}


def to_distribution(domain: Any) -> BaseDistribution | None:
    """A Ray Tune domain as the Optuna distribution Tune's OptunaSearch samples it from (randint's upper bound is
    exclusive, Optuna's inclusive)."""
    sampler = domain.get_sampler() if isinstance(domain, (Float, Integer, Categorical)) else None
    step = None
    if isinstance(sampler, Quantized):
        step, sampler = sampler.q, sampler.get_sampler()
    log = isinstance(sampler, LogUniform)
    if isinstance(domain, Categorical):
        return CategoricalDistribution(list(domain.categories))
    if isinstance(domain, Float):
        return FloatDistribution(domain.lower, domain.upper, log=log, step=None if log else step)
    if isinstance(domain, Integer):
        return IntDistribution(domain.lower, domain.upper - (0 if step else 1), log=log and not step,
                               step=int(step or 1))
    return None


def within(distribution: BaseDistribution, value: Any) -> bool:
    """Whether a trial's value lies in the distribution (create_trial refuses one that does not)."""
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return is_number(value) and distribution.low <= value <= distribution.high


def direction(spec: SweepSpec) -> str:
    return "minimize" if spec.mode == "min" else "maximize"


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines ("A new study created ...") and experimental-API warnings kept off the sweep's output."""
    import warnings

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
