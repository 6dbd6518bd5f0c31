"""A sweep's budgets, as value types that the search spaces (presets) and the sweep spec share: how many samples
each FID takes (`FIDSettings`) and when ASHA compares trials (`ASHASettings`). Every value is checked on
construction, in one line that names it."""
from __future__ import annotations

import dataclasses
import math

from sweeps.errors import UsageError

FID_NETWORKS = ("inception", "standin")  # TF 2015-12-05 Inception (comparable to papers) | a cheap smoke stand-in


def require(ok: bool, message: str) -> None:
    """UsageError(message) unless ok: the one-line check of every field of the sweep's settings."""
    if not ok:
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class FIDSettings:
    """Sample FID budgets: `ladder[i]` samples (and `step_fractions[i]` of a sampler's steps) at ASHA rung i, and
    `final` samples at the end of every completed trial. FID is biased by n: only equal-n values are compared."""
    network: str
    ladder: tuple[int, ...]
    final: int
    step_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    weights_path: str | None = None  # an Inception weights file, for machines that cannot download it
    rfid: bool = True  # reconstruction FID at the end of a trial, for models that reconstruct

    def __post_init__(self) -> None:
        object.__setattr__(self, "ladder", tuple(self.ladder))
        object.__setattr__(self, "step_fractions", tuple(self.step_fractions))
        require(self.network in FID_NETWORKS, f"FID network must be one of {', '.join(FID_NETWORKS)}, "
                                               f"got {self.network!r}")
        require(len(self.ladder) > 0 and all(isinstance(n, int) and n >= 2 for n in self.ladder),
                 f"FID ladder must be sample counts of at least 2, got {self.ladder!r}")
        require(len(self.step_fractions) > 0 and all(0 < f <= 1 for f in self.step_fractions),
                 f"FID step fractions must be in (0, 1], got {self.step_fractions!r}")
        require(isinstance(self.final, int) and self.final >= 2,
                 f"--final-fid-samples must be at least 2, got {self.final!r}")
        require(self.weights_path is None or isinstance(self.weights_path, str),
                 f"FID weights path must be a path or None, got {self.weights_path!r}")
        require(isinstance(self.rfid, bool), f"rfid must be true or false, got {self.rfid!r}")


@dataclasses.dataclass(frozen=True)
class ASHASettings:
    """ASHA's stopping schedule; `milestones` are the epochs at which it compares trials, computed as Ray Tune's
    ASHAScheduler places its rungs (grace_period * reduction_factor**k up to max_t), so the FID ladder scores trials
    exactly where ASHA reads them."""
    max_t: int  # the trials' epochs
    grace_period: int
    reduction_factor: int

    def __post_init__(self) -> None:
        require(isinstance(self.max_t, int) and self.max_t >= 1, f"max_t must be at least 1, got {self.max_t!r}")
        require(isinstance(self.grace_period, int) and 1 <= self.grace_period <= self.max_t,
                 f"grace_period must be in [1, max_t={self.max_t}], got {self.grace_period!r}")
        require(isinstance(self.reduction_factor, int) and self.reduction_factor >= 2,
                 f"reduction_factor must be at least 2, got {self.reduction_factor!r}")

    @property
    def milestones(self) -> tuple[int, ...]:
        rungs = int(math.log(self.max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
        return tuple(self.grace_period * self.reduction_factor ** k for k in range(rungs))
