"""Every way a sweep's driver is stopped ends well: Ctrl-C (then --resume with a trial mid-way), SIGTERM, Ctrl-C while
Ray starts, a storage that fills up. Each checks the exit code, the last line, that no process of the sweep outlives
the driver, and that nothing finished is lost or misreported; each says how much work the fault cost."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from ray_cluster import descendants, kill, start_time

pytestmark = pytest.mark.slow

SMOKE = [sys.executable, "sweeps/run.py", "--space", "vae", "--preset", "smoke", "--no-wandb"]
MILESTONES, EPOCHS = (1, 2, 4), 4  # the smoke preset's ASHA rungs and epochs


def results(folder: Path) -> dict[str, list[dict]]:
    """Each trial's reports as Tune wrote them to storage."""
    rows = {}
    for path in sorted(folder.glob("*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            rows[path.parent.name] = lines
    return rows


def start(args: list[str], log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([*prefix, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(condition, timeout: float = 120, every: float = 0.1) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(every)


def stop_and_wait(driver: subprocess.Popen, sig: int, timeout: float = 60) -> tuple[int, float, dict[int, str]]:
    """Send `sig`; return the exit code, the seconds it took and the driver's processes still alive 5 s after."""
    processes = descendants(driver.pid)
    sent = time.time()
    driver.send_signal(sig)
    code = driver.wait(timeout=timeout)
    took = time.time() - sent
    time.sleep(5)  # Ray's processes are told to stop as the driver exits: give them the time they take
    alive = {p: t for p, t in processes.items() if start_time(p) == t}
    kill(alive)
    return code, took, alive


def last_line(log: Path) -> str:
    return log.read_text().strip().splitlines()[-1]


def test_ctrl_c_then_resume_loses_no_epoch_and_reports_how_each_trial_ended(tmp_path, capsys):
    """Ctrl-C with a trial mid-way: exit 130 within seconds, the board and the --resume line; then --resume: every
    trial's epochs reported once each in order (those trained again after the stop only where the first report had no
    checkpoint), each trial completed or stopped by ASHA at a milestone, and no process left behind either time."""
    storage, name = tmp_path / "runs", "interrupted"
    args = [*SMOKE, "--num-samples", "3", "--max-concurrent", "1", "--storage-path", str(storage), "--name", name,
            "--fixed", "steps_per_epoch=30"]
    driver = start(args, tmp_path / "driver.log")
    wait_for(lambda: results(storage / name))
    code, took, alive = stop_and_wait(driver, signal.SIGINT)
    log = (tmp_path / "driver.log").read_text()
    assert code == 130 and took < 30 and not alive, (code, took, alive, log[-3000:])
    assert f"Leaderboard of {name}" in log and f"--resume {name}" in last_line(tmp_path / "driver.log"), log[-3000:]
    before = {t: [r["epoch"] for r in rs] for t, rs in results(storage / name).items()}

    resumed = start([sys.executable, "sweeps/run.py", "--resume", name, "--storage-path", str(storage)],
                    tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-5000:]
    rows = results(storage / name)
    retrained = 0
    for trial, reports in rows.items():
        epochs = [r["epoch"] for r in reports]
        assert epochs[:len(before.get(trial, []))] == before.get(trial, []), (trial, epochs, before)
        assert sorted(set(epochs)) == list(range(1, max(epochs) + 1)), (trial, epochs)  # none missing
        first = {}
        for r in reports:
            first.setdefault(r["epoch"], r)
        again = [e for e in set(epochs) if epochs.count(e) > 1]
        assert all(first[e]["checkpointed"] == 0 for e in again), (trial, reports)
        retrained += len(epochs) - len(set(epochs))
        assert max(epochs) in MILESTONES, (trial, epochs)  # ASHA stops at a milestone, a completed trial at the end
    board = (tmp_path / "resume.log").read_text()
    board = board[board.index(f"Leaderboard of {name}"):]
    for trial, reports in rows.items():
        line = next(line for line in board.splitlines() if line.split()[1:2] == [trial])
        status = "completed" if reports[-1]["epoch"] == EPOCHS else "stopped (ASHA)"
        assert line.rstrip().endswith(status) and f" {reports[-1]['epoch']} " in line, (line, reports[-1])
    with capsys.disabled():
        print(f"\nCtrl-C after {before}: stopped in {took:.1f} s; epochs trained again on --resume: {retrained}")


def test_sigterm_stops_as_ctrl_c_does_and_exits_143(tmp_path, capsys):
    """SIGTERM (`ray job stop`, Slurm, Kubernetes): state saved, the board and the --resume line, no process left
    behind, exit 143; before, Ray's own handler aborted the driver (exit 134) and left its workers running."""
    storage, name = tmp_path / "runs", "terminated"
    driver = start([*SMOKE, "--num-samples", "3", "--max-concurrent", "1", "--storage-path", str(storage), "--name",
                    name, "--fixed", "steps_per_epoch=30"], tmp_path / "driver.log")
    wait_for(lambda: results(storage / name))
    reported = sum(map(len, results(storage / name).values()))
    code, took, alive = stop_and_wait(driver, signal.SIGTERM)
    log = (tmp_path / "driver.log").read_text()
    assert code == 143 and took < 30 and not alive, (code, took, alive, log[-3000:])
    assert f"Leaderboard of {name}" in log and f"--resume {name}" in last_line(tmp_path / "driver.log"), log[-3000:]
    assert sum(map(len, results(storage / name).values())) >= reported  # what was reported stays
    with capsys.disabled():
        print(f"\nSIGTERM: stopped in {took:.1f} s")


def group_members(pgid: int) -> list[int]:
    """PIDs of the processes still in process group `pgid` (zombies aside)."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(pid))
    return members


def test_sigterm_to_the_whole_process_group_ends_as_sigterm_to_the_driver(tmp_path, capsys):
    """`kill -TERM -- -PGID` (a shell's job control, Slurm's scancel, supervisors) reaches the local Ray's GCS and
    raylet too; before, the driver waited a minute for the dead GCS and died with exit 1 and no board."""
    storage, name = tmp_path / "runs", "group"
    with open(tmp_path / "driver.log", "w") as f:  # a session of its own: the group signalled is the sweep's alone
        driver = subprocess.Popen([*SMOKE, "--num-samples", "3", "--max-concurrent", "1", "--storage-path",
                                   str(storage), "--name", name, "--fixed", "steps_per_epoch=30"], cwd=ROOT, stdout=f,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  start_new_session=True)
    wait_for(lambda: results(storage / name))
    sent = time.time()
    os.killpg(driver.pid, signal.SIGTERM)
    code = driver.wait(timeout=60)
    took = time.time() - sent
    time.sleep(2)
    left = group_members(driver.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    log = (tmp_path / "driver.log").read_text()
    assert code == 143 and took < 15 and not left, (code, took, left, log[-3000:])
    assert f"Leaderboard of {name}" in log and f"--resume {name}" in last_line(tmp_path / "driver.log"), log[-3000:]
    with capsys.disabled():
        print(f"\nSIGTERM to the process group: stopped in {took:.1f} s")


def test_ctrl_c_while_ray_starts_is_one_line_exit_130_and_leaves_no_folder(tmp_path):
    storage, name = tmp_path / "runs", "starting"
    log = tmp_path / "driver.log"
    driver = start([*SMOKE, "--storage-path", str(storage), "--name", name], log)
    wait_for(lambda: "gensweep: space=" in log.read_text(), every=0.02)  # the last line before Ray starts
    time.sleep(0.3)
    code, took, alive = stop_and_wait(driver, signal.SIGINT)
    out = log.read_text()
    assert code == 130 and not alive, (code, alive, out[-3000:])
    assert "Traceback" not in out and "Segmentation fault" not in out, out[-3000:]
    assert last_line(log) == "gensweep: stopped while Ray was starting; nothing ran: run the same command again", out
    assert not (storage / name).exists()  # the same command starts it again


def can_mount_tmpfs() -> bool:
    return (os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True).returncode == 0)


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a small tmpfs in a mount namespace")
def test_a_storage_that_fills_up_stops_the_sweep_in_one_line_and_loses_nothing(tmp_path, capsys):
    """The sweep's storage is a 96 MiB tmpfs; once the first trial has reported, a file fills it to 3 MiB of free
    space. The sweep stops as Ctrl-C stops it (no `No space left on device` traceback from Tune, no cut-short
    state), exit 1, the last line names the full storage and the resume command, nothing outlives the driver; the
    leaderboard reads it; with the space freed, --resume finishes it with every epoch reported."""
    mount = tmp_path / "disk"
    mount.mkdir()
    script = f"""set -e
mount -t tmpfs -o size=96m tmpfs {mount}
{' '.join(SMOKE)} --storage-path {mount} --name full --fixed steps_per_epoch=10 > {tmp_path}/driver.log 2>&1 &
driver=$!
until [ -s "$(ls {mount}/full/*/result.json 2>/dev/null | head -1)" ]; do sleep 0.1; done
free=$(df -B1 --output=avail {mount} | tail -1)
fallocate -l $((free - 3 * 1048576)) {mount}/filler
set +e; wait $driver; echo $? > {tmp_path}/driver.code
{sys.executable} sweeps/leaderboard.py --name full --storage-path {mount} > {tmp_path}/board.log 2>&1
echo $? > {tmp_path}/board.code
rm {mount}/filler
{sys.executable} sweeps/run.py --resume full --storage-path {mount} > {tmp_path}/resume.log 2>&1
echo $? > {tmp_path}/resume.code
cp -r {mount}/full {tmp_path}/full
"""
    namespace = subprocess.Popen(["unshare", "-m", "bash", "-c", script], cwd=ROOT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
    processes: dict[int, str] = {}
    while namespace.poll() is None:  # every process the namespace ever had, to check none outlives it
        processes.update(descendants(namespace.pid))
        time.sleep(0.5)
    time.sleep(5)
    alive = {p: t for p, t in processes.items() if start_time(p) == t}
    kill(alive)
    driver_log = (tmp_path / "driver.log").read_text()
    assert (tmp_path / "driver.code").read_text().strip() == "1", driver_log[-5000:]
    assert not alive, alive
    assert "No space left on device" not in driver_log and "Traceback" not in driver_log, driver_log[-5000:]
    line = last_line(tmp_path / "driver.log")
    assert line.startswith(f"gensweep: the storage of {mount}/full is full") and "--resume full" in line, line
    board = (tmp_path / "board.log").read_text()
    assert (tmp_path / "board.code").read_text().strip() == "0" and "Leaderboard of full" in board, board
    resume_log = (tmp_path / "resume.log").read_text()
    code = (tmp_path / "resume.code").read_text().strip()
    assert code == "0", resume_log[-5000:]
    rows = results(tmp_path / "full")
    for trial, reports in rows.items():
        epochs = [r["epoch"] for r in reports]
        assert sorted(set(epochs)) == list(range(1, max(epochs) + 1)), (trial, epochs)
    with capsys.disabled():
        print(f"\nfull storage: resumed exit {code}; reports per trial {[len(r) for r in rows.values()]}")
