"""`gensweep spaces [NAME]`: the search spaces, and one space's searched domains, fixed values, presets, ranking
metrics and seed defaults, read from sweeps/spaces.py without starting Ray or importing torch."""
from __future__ import annotations

import textwrap
from typing import Any

from sweeps.domains import is_searched
from sweeps.errors import UsageError
from sweeps.spaces import FID_SETTINGS, SPACES, Space


def command(args) -> int:
    if args.space is None:
        print("search spaces (gensweep spaces NAME: one in full):")
        for s in SPACES.values():
            print(textwrap.fill(s.description, 118, initial_indent=f"  {s.name:14} ", subsequent_indent=" " * 17))
        return 0
    if args.space not in SPACES:
        raise UsageError(f"unknown space {args.space!r}; choose one of {', '.join(SPACES)}")
    print("\n".join(describe(SPACES[args.space])))
    return 0


def describe(space: Space) -> list[str]:
    metrics = space.metrics or (space.metric,)
    lines = [f"{space.name}: {space.description}", f"  model: {space.model}",
             f"  ranking metric: {space.metric} ({space.mode}); --metric may choose: {', '.join(metrics)}"]
    if space.needs_checkpoint:
        lines.append("  evaluates a trained model: pass --checkpoint PATH (state.pt)")
    lines += ["", "  searched (every preset; a preset may narrow one):", *_values(space.params, searched=True)]
    fixed = _values(space.params, searched=False)
    if fixed:
        lines += ["", "  fixed:", *fixed]
    for name, preset in space.presets.items():
        fid = preset.fid or FID_SETTINGS[name]
        lines += ["", f"  preset {name}: {preset.num_samples} trials; ASHA grace period {preset.grace_period} "
                      f"epoch(s), reduction factor {preset.reduction_factor}; FID network {fid.network}, "
                      f"ladder {list(fid.ladder)} samples, {fid.final} at a trial's end",
                  *_values(preset.config)]
    if space.seed_defaults:
        lines += ["", "  seed defaults (--seed-defaults): " + ", ".join(f"{k}={v}" for k, v in
                                                                        space.seed_defaults.items())]
    return lines


def _values(values: dict[str, Any], searched: bool | None = None) -> list[str]:
    shown = {k: v for k, v in values.items() if searched is None or is_searched(v) == searched}
    width = max(map(len, shown), default=0)
    return [f"    {k.ljust(width)}  {v}" for k, v in shown.items()]
