"""gensweep's own benchmarks (not part of the installed package): `python -m bench NAME ...` from the repository's
root. See bench/__main__.py for the subcommands and docs/PERFORMANCE.md for what they measured."""
