"""`python -m gpu_check.graphs_on MODULE [ARGS...]`: `python -m MODULE ARGS...` with train.cuda_graphs on by default.

CUDA graphs are off by default (genmodels/config.py) until a GPU check shows them sound, and the GPU check is what
has to measure them: bench all's benchmarks that train through the engine with the preset's config (`bench train`'s
training row, `bench trial`) would otherwise measure the eager step. A config that sets cuda_graphs (bench train's
`cuda_graphs=False` row, `bench pack --cuda-graphs`, `bench profile --cuda-graphs`) keeps its own value. Processes
that such a benchmark spawns start without this (pack's trials set the value themselves).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import runpy
import sys
from types import ModuleType
from typing import Any, Iterator, Sequence

MODULE = "gpu_check.graphs_on"


def turn_on() -> None:
    """From now on, in this process, a TrainConfig that does not set cuda_graphs has it on."""
    from genmodels.config import TrainConfig

    init = TrainConfig.__init__
    if getattr(init, "graphs_on", False):
        return
    position = [f.name for f in dataclasses.fields(TrainConfig)].index("cuda_graphs")

    @functools.wraps(init)
    def graphs_on(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) <= position:
            kwargs.setdefault("cuda_graphs", True)
        init(self, *args, **kwargs)

    graphs_on.graphs_on = True  # type: ignore[attr-defined]
    TrainConfig.__init__ = graphs_on  # type: ignore[method-assign]


def command_with_graphs_on(command: Sequence[str]) -> list[str]:
    """`python -m bench ...` as `python -m gpu_check.graphs_on bench ...`; any other command as it is."""
    command = list(command)
    if len(command) >= 3 and command[1] == "-m" and command[2] == "bench":
        return [command[0], "-m", MODULE, *command[2:]]
    return command


@contextlib.contextmanager
def with_graphs_on(run_all: ModuleType) -> Iterator[None]:
    """While open, the benchmarks bench.run_all starts (each `python -m bench NAME` in a process group of its own)
    run under this module."""
    run_group = run_all.run_group

    def run(command: Sequence[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return run_group(command_with_graphs_on(command), *args, **kwargs)

    run_all.run_group = run
    try:
        yield
    finally:
        run_all.run_group = run_group


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(f"usage: python -m {MODULE} MODULE [ARGS...]")
    turn_on()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
