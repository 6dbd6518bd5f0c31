"""How `bench all` (and the GPU check in .ci/gpu_check/) run a benchmark, so that one that runs over its time leaves
nothing behind and loses nothing it measured:

- `run_group`: a command in a process group of its own (setpgid, in the caller's session: whatever ends the
  session still ends it), stopped at its limit with SIGTERM to the whole group, then SIGKILL after a grace period;
  members left once the leader has ended (workers it spawned) are ended too. `subprocess.run(timeout=)` kills only
  the direct child.
- `append_rows`: rows as JSON lines appended to the file named by $GENSWEEP_BENCH_ROWS, flushed and fsynced as each
  is measured, so a kill keeps every row written before it (`read_rows` skips a line cut short by the kill).
- `stop_mps`: a CUDA MPS control daemon started for a run (it daemonizes: it escapes any process group) asked to
  quit, then any process still carrying its pipe folder in its environment ended.
- `end_processes`: the one SIGTERM-then-SIGKILL loop that the three above share.

No torch here: a step's child imports this before it knows what it will run, and the tests use it on plain Pythons.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from genmodels.io import json_lines

ROWS_ENV = "GENSWEEP_BENCH_ROWS"  # the JSON-lines file every benchmark appends its rows to, as it measures them
STEP_ENV = "GENSWEEP_BENCH_STEP"  # the step a row was measured in (written into each row)
MPS_DIR_ENV = "GENSWEEP_MPS_DIR"  # where pack starts its MPS daemon (pipe/, log/), so the runner can stop it
MPS_CONTROL = "nvidia-cuda-mps-control"

_live_groups: set[int] = set()


# ------------------------------------------------------------------------------------------------ rows

def append_rows(rows: Iterable[dict[str, Any]], benchmark: str | None = None, path: str | Path | None = None) -> int:
    """Append `rows` to `path` (default $GENSWEEP_BENCH_ROWS; nothing when neither is set) as JSON lines, each
    tagged with the benchmark, the step ($GENSWEEP_BENCH_STEP) and the time; flushed and fsynced before returning.
    Returns the rows written."""
    path = path or os.environ.get(ROWS_ENV)
    rows = list(rows)
    if not path or not rows:
        return 0
    step = os.environ.get(STEP_ENV)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            tags = {"benchmark": benchmark, "step": step, "t": round(time.time(), 3)}
            f.write(json.dumps({**{k: v for k, v in tags.items() if v is not None}, **row}, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return len(rows)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every whole row of a rows file (none when there is no file yet); a last line cut short by a kill is
    skipped."""
    try:
        return json_lines(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []


# ------------------------------------------------------------------------------------------------ ending processes

def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_processes(alive: Callable[[], list[int]], grace_s: float, kill_wait_s: float | None = None,
                  send: Callable[[Sequence[int], int], None] = _signal_pids) -> list[tuple[str, list[int]]]:
    """SIGTERM to the processes `alive()` lists, then SIGKILL to those still listed `grace_s` later, waiting
    `kill_wait_s` (default `grace_s`) for them to go. `send(pids, signal)` delivers a signal (default: to each
    pid; a process group passes its own). Returns the signals sent, each with the pids it went to."""
    sent: list[tuple[str, list[int]]] = []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s if kill_wait_s is None else kill_wait_s)):
        left = alive()
        if not left:
            break
        send(left, sig)
        sent.append((signal.Signals(sig).name, left))
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    return sent


# ------------------------------------------------------------------------------------------------ process groups

def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc; where there is no /proc, [pgid] while
    signal 0 still reaches the group."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_group(pgid: int, grace_s: float) -> int:
    """SIGTERM to every live member of the group, SIGKILL to those still alive after `grace_s`. Returns how many
    members were alive when it began."""
    alive = group_members(pgid)
    if alive:
        end_processes(lambda: group_members(pgid), grace_s, kill_wait_s=5.0,
                      send=lambda pids, sig: _signal_group(pgid, sig))
    _live_groups.discard(pgid)
    return len(alive)


def run_group(command: Sequence[str], timeout_s: float, log: str | Path | None = None,
              env: dict[str, str] | None = None, cwd: str | Path | None = None,
              grace_s: float = 5.0, stop_when: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run `command` in a process group of its own, its output (stdout and stderr) to `log`, and end it at
    `timeout_s`, or earlier once `stop_when()` (asked every 0.2 s) is true: the whole group gets SIGTERM (Python
    children run their `finally` blocks, e.g. quit an MPS daemon), and SIGKILL `grace_s` later (at most a fifth
    of `timeout_s`) if it is still there. When the leader ends on its own, members it left behind are ended the
    same way. Returns status ("ok", "failed", "timed out"), rc, seconds, `left_behind` (group members ended after
    the leader) and the group's id."""
    grace = max(0.0, min(grace_s, 0.2 * timeout_s))
    start = time.monotonic()
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, **group)
    finally:
        if log:
            out.close()
    pgid = proc.pid  # the group's leader: its pid is the group's id
    _live_groups.add(pgid)
    status = "ok"
    try:
        _wait(proc, start + max(0.0, timeout_s), stop_when)
    except subprocess.TimeoutExpired:
        status = "timed out"
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
    finally:
        if proc.returncode is None:  # interrupted ourselves (SIGTERM to the runner): end the group on the way out
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
        left = end_group(pgid, grace_s=min(grace or 1.0, 2.0))
    if status == "ok" and proc.returncode != 0:
        status = "failed"
    return {"status": status, "rc": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "left_behind": left, "pgid": pgid}


def _wait(proc: subprocess.Popen, deadline: float, stop_when: Callable[[], bool] | None) -> None:
    """Wait for `proc` until `deadline`, or until `stop_when()`; TimeoutExpired when it is still running then."""
    while stop_when is not None and proc.poll() is None and time.monotonic() < deadline:
        if stop_when():
            raise subprocess.TimeoutExpired(proc.args, 0)
        time.sleep(0.2)
    proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def end_all_groups() -> None:
    """End every group `run_group` started and has not yet seen end (on the runner's own way out)."""
    for pgid in list(_live_groups):
        end_group(pgid, grace_s=1.0)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit in the main thread, so `finally` blocks (the groups' ends, the MPS
    daemon's quit, the output's last write) run when the runner itself is stopped."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def tail(path: str | Path, lines: int = 20) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------------ CUDA MPS

def processes_with_env(key: str, value: str, prefix: bool = False) -> list[int]:
    """Processes (other than this one) whose environment has `key=value` (`prefix`: a value that starts with
    `value`): the ones a run started with that setting, daemons included, found by what they were given rather than
    by a name."""
    wanted = f"{key}={value}".encode()
    found = []
    if not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] in "ZX":
            continue
        if any(v == wanted or (prefix and v.startswith(wanted)) for v in environ.split(b"\0")):
            found.append(int(entry))
    return found


def mps_dirs(base: str | Path) -> tuple[Path, Path]:
    """The pipe and log folders of the MPS daemon a run starts under `base`."""
    return Path(base) / "pipe", Path(base) / "log"


def stop_mps(base: str | Path, grace_s: float = 3.0) -> list[str]:
    """Stop the MPS daemon started with its folders under `base`: `quit` through its control pipe (where the
    control program is on PATH and the pipe exists), then SIGTERM and SIGKILL to every process still carrying that
    pipe folder in its environment (the daemon and its server); the pipe folder goes once none is left. Returns
    what it did, one line each."""
    pipe, log = mps_dirs(base)
    notes: list[str] = []
    control = shutil.which(MPS_CONTROL)
    if control and (pipe / "control").exists():
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
        try:
            subprocess.run([control], input="quit\n", text=True, capture_output=True, env=env, timeout=15)
            notes.append(f"asked the MPS daemon at {pipe} to quit")
        except (subprocess.TimeoutExpired, OSError) as e:
            notes.append(f"MPS quit at {pipe} did not answer ({type(e).__name__})")

    def left() -> list[int]:
        return processes_with_env("CUDA_MPS_PIPE_DIRECTORY", str(pipe))

    deadline = time.monotonic() + grace_s  # the daemon's own way out after quit, first
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    for name, pids in end_processes(left, grace_s):
        notes.append(f"{name} to {len(pids)} MPS process(es) still running: {pids}")
    if not left():
        shutil.rmtree(pipe, ignore_errors=True)  # nothing listens there now; the log stays
    return notes
