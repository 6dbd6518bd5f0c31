"""What a search space searches, in gensweep's own terms: `choice` and `loguniform`, declared without importing Ray
(seconds of import for `gensweep spaces` and `--help`). `to_tune` turns them into Ray Tune's domains where a sweep's
param space is built (sweeps/param_space.py); a Ray domain given directly passes through unchanged."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def to_tune(self):
        from ray import tune

        return tune.choice(list(self.values))

    def __str__(self) -> str:
        return "{" + ", ".join(map(str, self.values)) + "}"


@dataclasses.dataclass(frozen=True)
class LogUniform:
    lower: float
    upper: float

    def to_tune(self):
        from ray import tune

        return tune.loguniform(self.lower, self.upper)

    def __str__(self) -> str:
        return f"log-uniform [{self.lower:g}, {self.upper:g}]"


SEARCHED = (Choice, LogUniform)


def choice(values: list[Any]) -> Choice:
    return Choice(tuple(values))


def loguniform(lower: float, upper: float) -> LogUniform:
    return LogUniform(lower, upper)


def is_searched(value: Any) -> bool:
    """A domain declared here, or one of Ray Tune's (checked by name, so that no Ray import is needed)."""
    return isinstance(value, SEARCHED) or any(c.__name__ == "Domain" and c.__module__.startswith("ray.tune")
                                              for c in type(value).__mro__)


def to_tune(values: dict[str, Any]) -> dict[str, Any]:
    """The same dict with every domain declared here as Ray Tune's."""
    return {k: v.to_tune() if isinstance(v, SEARCHED) else v for k, v in values.items()}
