"""gensweep's own benchmarks (not part of the installed package): `python -m bench NAME ...` from the repository's
root. See bench/__main__.py for the subcommands and docs/PERFORMANCE.md for what they measured."""
import importlib

# a subcommand with a module of its own; the rest are bench/suite.py's
SUBCOMMANDS = {"all": "bench.run_all", "trial": "bench.trial", "overhead": "bench.overhead", "scale": "bench.scale",
               "forecast": "bench.forecast"}


def module(name: str):
    """The module that runs subcommand `name` (its main(argv)) and builds its parser (parser())."""
    return importlib.import_module(SUBCOMMANDS.get(name, "bench.suite"))


def parse(argv: list[str]):
    """`python -m bench ...`'s arguments, parsed as the subcommand parses them (tests/test_docs.py)."""
    name = argv[0]
    return module(name).parser().parse_args(argv if name not in SUBCOMMANDS else argv[1:])
