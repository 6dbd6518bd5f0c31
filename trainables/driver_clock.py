"""What gensweep's own code costs the driver: the time spent in each of its Tune callbacks and in the searcher's
hooks, per hook, summed over the sweep. Tune runs these on its event loop, which meanwhile starts no trial and
processes no result, so their total is what gensweep adds to a sweep's wall time (written to `<sweep>/driver.json`
and printed in one line at the end; `python -m bench scale` reads it)."""
from __future__ import annotations

import functools
import time
from collections import defaultdict

SECONDS: dict[str, float] = defaultdict(float)  # "Class.hook" -> seconds in this process
CALLS: dict[str, int] = defaultdict(int)


def clocked(cls: type) -> type:
    """The class with each of its Tune hooks (`on_*`, and a searcher's `suggest`) timed into SECONDS and CALLS."""
    for name, fn in list(vars(cls).items()):
        if callable(fn) and (name.startswith("on_") or name == "suggest"):
            setattr(cls, name, _timed(f"{cls.__name__}.{name}", fn))
    return cls


def _timed(key: str, fn):
    @functools.wraps(fn)
    def hook(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[key] += time.perf_counter() - start
            CALLS[key] += 1

    return hook


def totals() -> dict[str, dict[str, float]]:
    """{class: {"s": seconds, "calls": n}} of every clocked class, dearest first."""
    out: dict[str, dict[str, float]] = {}
    for key, seconds in SECONDS.items():
        entry = out.setdefault(key.split(".")[0], {"s": 0.0, "calls": 0})
        entry["s"] += seconds
        entry["calls"] += CALLS[key]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["s"]))


def per_hook() -> dict[str, dict[str, float]]:
    """{"Class.hook": {"s": seconds, "calls": n}}, dearest first."""
    return {k: {"s": s, "calls": CALLS[k]} for k, s in sorted(SECONDS.items(), key=lambda kv: -kv[1])}


def reset() -> None:
    SECONDS.clear()
    CALLS.clear()
