"""`--seed` with `--reproducible` fixes the whole sweep, two trials at once: the same configs, the same ASHA
decisions and the same leaderboard, whatever order the trials happen to reach a milestone in."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

ARGS = [sys.executable, "sweeps/run.py", "--space", "vae", "--preset", "smoke", "--no-wandb", "--num-samples", "5",
        "--max-concurrent", "2", "--seed", "7", "--reproducible"]


def sweep(storage: Path, name: str) -> tuple[list[str], list[tuple]]:
    """The leaderboard's rows without the trial ids (Tune draws new ones each run), and each trial's searched values
    with the epochs it reported, in the order the trials were made."""
    out = subprocess.run([*ARGS, "--storage-path", str(storage), "--name", name], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    board = out.stdout[out.stdout.index(f"Leaderboard of {name}"):].splitlines()[3:]
    rows = [re.sub(r"\bvae_[0-9a-f]{8}\b", "", line) for line in board if re.match(r"\d+ ", line)]
    trials = []
    for path in sorted((storage / name).glob("*/result.json"), key=lambda p: p.stat().st_ctime):
        reports = [json.loads(line) for line in path.read_text().splitlines()]
        config = reports[0]["config"]
        trials.append((tuple(sorted((k, v) for k, v in config.items() if k.startswith("model."))),
                       tuple(r["epoch"] for r in reports)))
    return rows, sorted(trials)


def test_the_same_seed_twice_gives_the_same_sweep_with_two_trials_at_once(tmp_path, capsys):
    first, second = sweep(tmp_path / "runs", "first"), sweep(tmp_path / "runs", "second")
    assert len(first[0]) == 5 and first == second, (first, second)
    epochs = [e for _, e in first[1]]
    assert any(max(e) < 4 for e in epochs) and any(max(e) == 4 for e in epochs)  # ASHA stopped some, not all
    with capsys.disabled():
        print(f"\n--reproducible twice: the same leaderboard; epochs per trial {[max(e) for e in epochs]}")
