"""`--warm-start NAME`: a new sweep's TPE starts from what an earlier sweep of the same space and metric learned.

    python sweeps/run.py --space vae --preset smoke --name vae-smoke
    python sweeps/run.py --space vae --preset full --warm-start vae-smoke      # smoke -> full: its best rerun first
    python sweeps/run.py --space vae --preset smoke --num-samples 32 --warm-start vae-smoke   # same budgets: told

How depends on whether the old sweep's values mean what the new sweep's will (SEED-NOTES, mistake 1):
- **Same budgets** (every fixed value, the FID settings and ASHA's milestones equal; the seed may differ): the old
  trials are *told* to the new sweep's Optuna study, Optuna's own way (a study handed to Tune's OptunaSearch through
  its storage): completed trials with their values, ASHA-stopped ones as pruned with their milestone values, as the
  old sweep's optuna.db holds them. Nothing is rerun: TPE begins where the old sweep stopped.
- **Other budgets** (smoke -> full, CPU -> GPU, more epochs, other data): a value at other budgets ranks nothing
  here, so the old sweep's best trials (as its leaderboard ranks them) are *rerun* first, as the new sweep's first
  trials (Tune's points_to_evaluate), at most a quarter of them; TPE learns their values at the new budgets. A
  hyperparameter the old sweep fixed and the new one searches takes the old fixed value.
The leaderboard marks rerun trials and says how many were told. Everything is checked before Ray starts, in one
line: an unknown sweep, another space or metric, a point outside the new sweep's domains.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sweeps.rows import rank_rows, trial_row
from sweeps.spec import SweepSpec, UsageError
from sweeps.sweep_results import is_number, sweep_trials

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

RERUN_SHARE = 4  # rerun at most 1/RERUN_SHARE of the new sweep's trials: the rest is TPE's to explore
NOT_BUDGETS = ("train.seed", "data.data_dir")  # fixed values that may differ between told sweeps: noise, a path


@dataclasses.dataclass(frozen=True)
class Source:
    """The old sweep, checked against the new one: where it lives, its spec and stored trials
    (sweep_results.sweep_trials)."""
    storage: str
    spec: SweepSpec
    trials: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class WarmStart:
    source: str  # the old sweep's name
    told: tuple[FrozenTrial, ...] = ()  # same budgets: added to the new sweep's study
    rerun: tuple[dict[str, Any], ...] = ()  # other budgets: the new sweep's first trials
    why_rerun: str = ""  # which budgets differ

    def record(self) -> dict[str, Any]:
        """What gensweep_sweep.json keeps (SweepSpec.warm_start): the leaderboard reads it."""
        return {"sweep": self.source, "told": len(self.told), "rerun": [dict(p) for p in self.rerun]}

    def describe(self) -> str:
        if self.told:
            return (f"gensweep: warm start from {self.source}: its {len(self.told)} ended trials told to TPE (same "
                    f"budgets; nothing rerun)")
        return (f"gensweep: warm start from {self.source}: its best {len(self.rerun)} trial(s) rerun first, at this "
                f"sweep's budgets ({self.why_rerun} differ)")

    def study_storage(self, spec: SweepSpec, study_name: str) -> optuna.storages.BaseStorage:
        """An in-memory Optuna storage holding the study Tune's OptunaSearch loads (load_if_exists): the told
        trials, under the name and directions the searcher asks for."""
        import optuna

        from sweeps.distributions import direction, quiet_optuna

        storage = optuna.storages.InMemoryStorage()
        with quiet_optuna():
            study = optuna.create_study(storage=storage, study_name=study_name,
                                        directions=[direction(spec)] * len(spec.objectives))
        study.add_trials(list(self.told))
        return storage


def load(storage: str, name: str, spec: SweepSpec) -> Source:
    """The old sweep NAME under `storage`, or UsageError (one line) when it cannot warm-start `spec`: none by that
    name, another space or ranking metric, nothing searched now, no trial reported."""
    flag = f"--warm-start {name}"
    if not spec.searched:
        raise UsageError(f"{flag}: this sweep searches nothing (--seed-defaults or --fixed pin every value), so "
                         f"there is no search to warm-start; drop one of them")
    try:
        old = SweepSpec.load(storage, name)
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None
    if old.space != spec.space:
        raise UsageError(f"{flag}: that sweep searched space {old.space!r}, this one {spec.space!r}; warm-start "
                         f"from a sweep of the same space")
    if old.objectives != spec.objectives:
        raise UsageError(f"{flag}: that sweep ranked by {','.join(old.objectives)}, this one by "
                         f"{','.join(spec.objectives)}; pass the same --metric/--objectives, or start without it")
    try:
        trials = sweep_trials(storage, old)
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None
    return Source(storage, old, trials)


def plan(source: Source, spec: SweepSpec) -> WarmStart:
    """Tell or rerun (module docstring), from the new sweep's final spec (the values prepare derived included).
    UsageError when a point lies outside the new sweep's domains, or nothing ended that could be used."""
    from sweeps.distributions import search_distributions
    from sweeps.study import study_trials

    old, name = source.spec, source.spec.name
    configs = {t["trial"]: t["config"] for t in source.trials}
    distributions = search_distributions(spec)
    differ = budgets_that_differ(old, spec)
    if not differ and set(old.searched) == set(spec.searched):
        from optuna.trial import TrialState

        ended = [t for t in study_trials(source.storage, old, source.trials) if t.state in (TrialState.COMPLETE,
                                                                                 TrialState.PRUNED)]
        require_some(ended, name, "ended (completed or stopped by ASHA)")
        # the values as the trials ran them: the old study leaves out a value outside the old domains
        points = [_point(name, t.user_attrs["trial"], configs, spec, distributions) for t in ended]
        return WarmStart(name, told=tuple(_with(t, p, distributions) for t, p in zip(ended, points)))
    ranked = [r for r in rank_rows([trial_row(t, old) for t in source.trials], old.mode) if is_number(r["value"])]
    ranked.sort(key=lambda r: -r["epochs"])  # the trials that ran furthest first (stable: then the leaderboard's order)
    best = ranked[:max(1, spec.num_samples // RERUN_SHARE)]
    require_some(best, name, "with a value of its ranking metric")
    points = [_point(name, row["trial"], configs, spec, distributions) for row in best]
    return WarmStart(name, rerun=tuple(points), why_rerun=", ".join(differ) or "the searched hyperparameters")


def budgets_that_differ(old: SweepSpec, new: SweepSpec) -> list[str]:
    """What makes the old sweep's values mean something else here: fixed values (the seed and data path aside),
    the FID's network, ladder and sample counts, ASHA's milestones."""
    keys = sorted(k for k in {*old.constants, *new.constants} - set(NOT_BUDGETS)
                  if old.constants.get(k) != new.constants.get(k))
    fid = [f"fid.{f}" for f in ("network", "ladder", "final", "step_fractions", "rfid")
           if getattr(old.fid, f) != getattr(new.fid, f)]
    return keys + fid + (["ASHA's milestones"] if old.milestones != new.milestones else [])


def require_some(points: list, name: str, what: str) -> None:
    if not points:
        raise UsageError(f"--warm-start {name}: that sweep has no trial {what}; resume it (--resume {name}) or "
                         f"start without --warm-start")


def _point(name: str, trial: str, configs: dict[str, dict], spec: SweepSpec, distributions: dict) -> dict[str, Any]:
    """The trial's values of the new sweep's searched keys, each checked against the new sweep's domain."""
    from sweeps.distributions import within

    point = {k: configs[trial].get(k) for k in spec.searched}
    for key, value in point.items():
        if key in distributions and not within(distributions[key], value):
            raise UsageError(f"--warm-start {name}: its trial {trial} has {key}={value!r}, outside this sweep's "
                             f"domain ({_domain(distributions[key])}); warm-start from a sweep whose values it "
                             f"covers (the same preset), or start without it")
    return point


def _with(trial: FrozenTrial, point: dict[str, Any], distributions: dict) -> FrozenTrial:
    """The old trial with its values under the new sweep's distributions (what TPE models new suggestions with)."""
    import optuna

    params = {k: v for k, v in point.items() if k in distributions}
    return optuna.trial.create_trial(state=trial.state, params=params,
                                     distributions={k: distributions[k] for k in params},
                                     values=trial.values, intermediate_values=trial.intermediate_values,
                                     user_attrs={**trial.user_attrs, "warm_start": True})


def _domain(distribution) -> str:
    choices = getattr(distribution, "choices", None)
    return f"one of {list(choices)}" if choices is not None else f"{distribution.low:g} to {distribution.high:g}"
