"""Run a hyperparameter sweep: `gensweep run` as a script (`--help` lists every flag).

    python sweeps/run.py --space vae --preset smoke
    python sweeps/run.py --resume NAME
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.script("run", argv, prog="run.py")


if __name__ == "__main__":
    sys.exit(main())
