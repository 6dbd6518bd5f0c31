"""Smoke sweeps of the FID-ranked spaces through Ray: the ladder feeds ASHA, the leaderboard ranks by FID and names
the FID network, and a trained NCSN checkpoint can be swept for sampling settings alone."""
import pytest
from conftest import run_cli


def leaderboard(out: str, name: str) -> tuple[str, list[str], list[str]]:
    board = out[out.index(f"Leaderboard of {name}"):].splitlines()
    rows = [line for line in board[3:] if line[:1].isdigit()]
    return board[0], board[1].replace(" (min)", "").split(), rows


def column(header: list[str], rows: list[str], name: str) -> list[str]:
    i = header.index(name)
    return [r.split()[i] for r in rows]


@pytest.mark.slow
def test_ncsn_smoke_ranked_by_fid_then_sampling_only_sweep(tmp_path):
    r = run_cli(["sweeps/run.py", "--space", "ncsn", "--preset", "smoke", "--num-samples", "3", "--no-wandb",
                 "--storage-path", str(tmp_path), "--name", "ncsn"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    title, header, rows = leaderboard(r.stdout, "ncsn")
    assert "FID network: standin" in title and "not comparable to published FIDs" in title
    fids = [(-int(n), float(v)) for n, v in zip(column(header, rows, "n"), column(header, rows, "fid"))]
    assert len(fids) == 3 and fids == sorted(fids)  # by the deepest rung's sample count, then by FID
    assert "fid_256" in header  # the final FID, named by its sample count

    # a completed trial's last checkpoint (checkpoints come at milestones and the end: the highest number)
    checkpoint = sorted((tmp_path / "ncsn").glob("ncsn_*/checkpoint_*/state.pt"), key=lambda p: p.parent.name)[-1]
    r = run_cli(["sweeps/run.py", "--space", "ncsn-sampling", "--preset", "smoke", "--num-samples", "2",
                 "--no-wandb", "--storage-path", str(tmp_path), "--name", "sampling", "--checkpoint",
                 str(checkpoint)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    title, header, rows = leaderboard(r.stdout, "sampling")
    assert {"langevin_steps", "langevin_eps", "denoise", "init"} <= set(header)
    assert len(rows) == 2 and all(float(v) > 0 for v in column(header, rows, "fid"))


@pytest.mark.slow
def test_vqvae_smoke_shows_perplexity_and_fid(tmp_path):
    r = run_cli(["sweeps/run.py", "--space", "vqvae", "--preset", "smoke", "--num-samples", "2", "--no-wandb",
                 "--storage-path", str(tmp_path), "--name", "vq"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    title, header, rows = leaderboard(r.stdout, "vq")
    assert "fid" in header and "test_perplexity" in header
    assert all(float(v) >= 1 for v in column(header, rows, "test_perplexity"))


@pytest.mark.slow
def test_sampling_space_needs_a_checkpoint(tmp_path):
    r = run_cli(["sweeps/run.py", "--space", "ncsn-sampling", "--preset", "smoke", "--no-wandb",
                 "--storage-path", str(tmp_path)], timeout=120)
    assert r.returncode == 2 and "--checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1
