"""Which hyperparameters mattered: Optuna's PED-ANOVA importances of the searched values for the ranking metric.

Trials are compared at one milestone, never across: the deepest of ASHA's milestones (or the last epoch) that at
least MIN_TRIALS trials reached, each trial with the ranking metric it reported there, so an ASHA-stopped trial
counts at the rung it reached, and an FID only beside FIDs of the same sample count. Those trials, with that value
as their value, make an in-memory Optuna study that `optuna.importance` and Optuna's plots read.

PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator, Optuna's default) because fANOVA and mean decrease in
impurity need scikit-learn, which gensweep does not install. It asks, per parameter, how differently the best
trials' values are spread from all trials' values: a parameter whose best values sit in one corner of its range
matters. It needs at least two trials in "the best" and more trials than that in all, so MIN_TRIALS = 4: with
three, the best would be one trial, a point whose density only says where that trial happened to sit. (The count of
parameters does not enter: each is judged on its own, not fitted together as a regression would.)
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import optuna

from sweeps.distributions import direction, quiet_optuna, search_distributions, within
from sweeps.spaces import SMOKE_NOTE
from sweeps.spec import SweepSpec
from sweeps.study import milestone_values

MIN_TRIALS = 4
FEW_TRIALS = 20  # below this many trials compared, one more or less can reorder the shares: said beside them
TOP_QUANTILE = 0.1  # Optuna's default "best": the top 10% ...
MAX_TOP = 5  # ... but at least min(5, half) trials, Optuna's advice for a stable density (smoke sweeps are small)


@dataclasses.dataclass
class Comparison:
    metric: str
    epoch: int | None = None  # the milestone the trials are compared at
    n: int | None = None  # the FID sample count of the values there; None for other metrics
    study: optuna.Study | None = None  # those trials, each with its value there
    top: int = 0  # how many of them count as the best
    importances: dict[str, float] = dataclasses.field(default_factory=dict)  # shares, summing to 1, largest first
    reason: str = ""  # why there are no importances
    caveats: list[str] = dataclasses.field(default_factory=list)  # what the shares cannot be taken for

    @property
    def evaluator(self) -> optuna.importance.PedAnovaImportanceEvaluator:
        # Optuna keeps the best ceil(quantile * count): half a trial below `top` stays clear of rounding
        return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=(self.top - 0.5) /
                                                             len(self.study.trials))


def compare(trials: list[dict[str, Any]], spec: SweepSpec, min_trials: int = MIN_TRIALS) -> Comparison:
    """The importances of the searched values for spec.metric over the sweep's stored trials
    (sweep_results.sweep_trials), or, in `reason`, why there are none."""
    out = Comparison(spec.metric)
    distributions = {k: d for k, d in search_distributions(spec).items() if not d.single()}
    if not distributions:
        out.reason = "nothing was searched (every value is fixed)"
        return out
    points = sorted({*spec.milestones, spec.max_epochs}, reverse=True)
    best = (0, points[-1])  # the most trials at any point, for the message when even that is too few
    for epoch in points:
        at: dict[int | None, list[tuple[dict, float]]] = {}
        for t in trials:
            params = {k: t["config"].get(k) for k in distributions}
            got = milestone_values([*t["history"], t["last"]], spec.metric, (epoch,)).get(epoch)
            if got and all(within(distributions[k], v) for k, v in params.items()):
                at.setdefault(got[1], []).append((params, got[0]))
        n, group = max(at.items(), key=lambda kv: (len(kv[1]), kv[0] or 0), default=(None, []))
        best = max(best, (len(group), epoch))
        if len(group) >= min_trials:
            out.epoch, out.n = epoch, n
            out.study = _study(group, distributions, spec)
            break
    if out.study is None:
        out.reason = (f"too few trials to tell: at most {best[0]} reported {spec.metric} at one milestone (epoch "
                      f"{best[1]}), and PED-ANOVA needs {min_trials}")
        return out
    count = len(out.study.trials)
    out.top = max(math.ceil(TOP_QUANTILE * count), min(MAX_TOP, count // 2))
    with quiet_optuna(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA warns of small regimes: the count is printed instead
        raw = optuna.importance.get_param_importances(out.study, evaluator=out.evaluator, normalize=False)
    total = sum(raw.values())
    if total <= 0:
        out.reason = (f"no parameter stands out: the best {out.top} of the {count} trials at epoch {out.epoch} are "
                      f"spread like all of them")
        return out
    out.importances = {k: v / total for k, v in sorted(raw.items(), key=lambda kv: -kv[1])}
    if count < FEW_TRIALS:
        out.caveats.append(f"only {count} trials compared: with fewer than {FEW_TRIALS}, one trial more or less can "
                           f"reorder these shares")
    if spec.preset == "smoke":
        out.caveats.append(SMOKE_NOTE)
    return out


def _study(group: list[tuple[dict, float]], distributions: dict, spec: SweepSpec) -> optuna.Study:
    with quiet_optuna():
        study = optuna.create_study(direction=direction(spec), study_name=f"{spec.name}@{spec.metric}")
    study.add_trials([optuna.trial.create_trial(params=p, distributions=distributions, value=v) for p, v in group])
    return study


def describe(c: Comparison) -> list[str]:
    """The importances as printed by the leaderboard and the report: a header, then a line a parameter, the top
    one first with its share; or one line saying why there are none."""
    if not c.importances:
        return [f"parameter importances for {c.metric}: {c.reason}"]
    at = f"epoch {c.epoch}" + (f", n={c.n}" if c.n else "")
    lines = [f"parameter importances for {c.metric} (Optuna PED-ANOVA: the best {c.top} of the "
             f"{len(c.study.trials)} trials compared at {at}, against all of them):"]
    names = short_names(list(c.importances))
    width = max(len(n) for n in names.values())
    for key, share in c.importances.items():
        lines.append(f"  {names[key].ljust(width)}  {share:4.0%}  {'#' * round(share * 40)}")
    return lines + [f"  note: {caveat}" for caveat in c.caveats]


def short_names(keys: list[str]) -> dict[str, str]:
    """`model.beta` as `beta`, as the leaderboard's columns, unless two keys would then read the same."""
    tails = [k.split(".")[-1] for k in keys]
    return {k: t if tails.count(t) == 1 else k for k, t in zip(keys, tails)}
