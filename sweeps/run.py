"""Run a hyperparameter sweep (the CLI is sweeps/cli.py; `--help` lists every flag):

    python sweeps/run.py --space vae --preset smoke
    python sweeps/run.py --resume NAME
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.ray_env import configure_environment  # noqa: E402

# Before anything imports Ray: some of its settings are read at import. A cluster address means Ray is not local.
configure_environment(local=not any(a.startswith("--address") for a in sys.argv[1:]) and not os.environ.get(
    "RAY_ADDRESS"))

from sweeps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
