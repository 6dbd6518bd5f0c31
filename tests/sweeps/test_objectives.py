"""Multi-objective sweeps and sample FID for the VAE family: the Pareto front, drawn at one FID sample count."""
from __future__ import annotations

import pytest
from conftest import run_cli

from sweeps.leaderboard import pareto_front


def row(name: str, fid: float, n: int, bpd: float) -> dict:
    return {"trial": name, "params": {}, "objectives": {"fid": {"value": fid, "n": n, "best": fid},
                                                         "test_iwae_bpd": {"value": bpd, "n": None, "best": bpd}}}


def test_pareto_front_keeps_the_undominated_at_the_deepest_fid_count():
    rows = [row("sharp", 5.0, 256, 9.0), row("tight", 9.0, 256, 7.0), row("dominated", 9.5, 256, 9.5),
            row("middle", 7.0, 256, 8.0), row("early", 1.0, 128, 1.0)]  # a low-count FID is not comparable
    front, where = pareto_front(rows, ["fid", "test_iwae_bpd"], "min")
    assert [r["trial"] for r in front] == ["sharp", "middle", "tight"] and where == "fid at n=256"
    front, _ = pareto_front(rows, ["fid", "test_iwae_bpd"], "max")
    assert [r["trial"] for r in front] == ["dominated"]


@pytest.mark.slow
def test_vae_sweep_ranked_by_fid_and_by_two_objectives(tmp_path):
    r = run_cli(["sweeps/run.py", "--space", "vae", "--preset", "smoke", "--objectives", "fid,test_iwae_bpd",
                 "--num-samples", "4", "--storage-path", str(tmp_path), "--name", "front", "--no-rfid"],
                env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "Pareto front of fid, test_iwae_bpd (min) compared fid at n=256" in out
    board = out[out.index("Leaderboard of front"):].splitlines()
    header = board[1].replace(" (min)", "").split()
    rows = [line.split() for line in board[3:] if line[:1].isdigit()]
    assert len(rows) == 4 and "rfid_256" not in header  # --no-rfid: no reconstruction FID at the end
    fid, n, epochs = header.index("fid"), header.index("n"), header.index("epochs")
    for cells in rows:  # every trial that reached a milestone has that milestone's FID
        assert cells[fid] != "None" and int(cells[n]) == (128 if int(cells[epochs]) == 1 else 256), cells
    assert list((tmp_path / "front").glob("wandb/offline-run-*")), "no W&B run for the front"
