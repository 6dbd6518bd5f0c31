"""What the GPU check (genmodels/bench/gpu_check.py) and `bench all` run their steps with, so that a step that runs
over its time leaves nothing behind and loses nothing it measured:

- `run_group`: a command in a process group of its own (setpgid, in the caller's session: whatever ends the
  session still ends it), stopped at its limit with SIGTERM to the whole group, then SIGKILL after a grace period;
  members left once the leader has ended (workers it spawned) are ended too. `subprocess.run(timeout=)` kills only
  the direct child. Each child carries $GENSWEEP_GPU_CHECK_WORK, so a later call can end what a killed one left.
- `append_rows`: rows as JSON lines appended to the file named by $GENSWEEP_BENCH_ROWS, flushed and fsynced as each
  is measured, so a kill keeps every row written before it (`read_rows` skips a line cut short by the kill).
- `stop_mps`: a CUDA MPS control daemon started for a run (it daemonizes: it escapes any process group) asked to
  quit, then any process still carrying its pipe folder in its environment ended.
- `finish_output`: the output folder kept to a few files (the device tool returns 8 at most), the rest in a tarball.

No torch here: a step's child imports this before it knows what it will run, and the tests use it on plain Pythons.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROWS_ENV = "GENSWEEP_BENCH_ROWS"  # the JSON-lines file every benchmark appends its rows to, as it measures them
STEP_ENV = "GENSWEEP_BENCH_STEP"  # the step a row was measured in (written into each row)
MPS_DIR_ENV = "GENSWEEP_MPS_DIR"  # where pack starts its MPS daemon (pipe/, log/), so the runner can stop it
MPS_CONTROL = "nvidia-cuda-mps-control"
WORK_PREFIX = "gensweep-gpu-check-"  # work folders under the temp dir; a later call cleans up what one left
WORK_ENV = "GENSWEEP_GPU_CHECK_WORK"  # the work folder of the run that started a process (in its environment)
MAX_OUTPUT_FILES = 6

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
    """Every whole row of a rows file; a last line cut short by a kill is skipped."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_json_atomic(path: str | Path, data: Any) -> None:
    """`data` as JSON at `path`, written to a temporary file beside it and renamed: a reader (or a kill) never sees
    half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


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
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
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
    deadline = time.monotonic() + grace_s
    while (left := processes_with_env("CUDA_MPS_PIPE_DIRECTORY", str(pipe))) and time.monotonic() < deadline:
        time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = processes_with_env("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
        if not left:
            break
        notes.append(f"{signal.Signals(sig).name} to {len(left)} MPS process(es) still running: {left}")
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while processes_with_env("CUDA_MPS_PIPE_DIRECTORY", str(pipe)) and time.monotonic() < deadline:
            time.sleep(0.1)
    if not processes_with_env("CUDA_MPS_PIPE_DIRECTORY", str(pipe)):
        shutil.rmtree(pipe, ignore_errors=True)  # nothing listens there now; the log stays
    return notes


def clean_earlier_work(keep: str | Path | None = None) -> list[str]:
    """A warm machine can hold what an earlier, killed call left: its processes (they carry its work folder in
    their environment) are ended, its MPS daemon stopped and its work folder removed (every WORK_PREFIX folder in
    the temp dir other than `keep`)."""
    notes = []
    base = str(Path(tempfile.gettempdir()) / WORK_PREFIX)
    mine = str(keep) if keep is not None else None
    left = [pid for pid in processes_with_env(WORK_ENV, base, prefix=True)
            if mine is None or pid not in processes_with_env(WORK_ENV, mine)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if left:
            notes.append(f"{signal.Signals(sig).name} to {len(left)} process(es) an earlier call left: {left}")
            time.sleep(1.0)
        left = [pid for pid in left if pid in processes_with_env(WORK_ENV, base, prefix=True)]
    for folder in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        if keep is not None and folder.resolve() == Path(keep).resolve():
            continue
        notes += stop_mps(folder / "mps", grace_s=1.0)
        shutil.rmtree(folder, ignore_errors=True)
        notes.append(f"removed {folder} (an earlier call's)")
    return notes


def write_fake_mps_control(bin_dir: str | Path, stubborn: bool = False) -> Path:
    """A stand-in for nvidia-cuda-mps-control, for rehearsing on a CPU: `-d` starts a daemon that leaves its
    session (as the real one does, so no process-group kill reaches it) with the caller's environment, and makes a
    `control` file in $CUDA_MPS_PIPE_DIRECTORY; `quit` on stdin ends it, unless `stubborn` (then only stop_mps's
    kill by environment does)."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / MPS_CONTROL
    daemon = "import time; time.sleep(3600)"  # started in a session of its own, as a daemon is
    script.write_text(f"""#!{sys.executable}
import os, signal, subprocess, sys
pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
if sys.argv[1:] == ["-d"]:
    proc = subprocess.Popen([sys.executable, "-c", {daemon!r}], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    open(os.path.join(pipe, "fake.pid"), "w").write(str(proc.pid))
    open(os.path.join(pipe, "control"), "w").close()
    sys.exit(0)
if sys.stdin.read().strip() == "quit" and not {stubborn!r}:
    try:
        os.kill(int(open(os.path.join(pipe, "fake.pid")).read()), signal.SIGTERM)
        os.unlink(os.path.join(pipe, "control"))
    except (OSError, ValueError):
        pass
""")
    script.chmod(0o755)
    return script


# ------------------------------------------------------------------------------------------------ output folder

def finish_output(out_dir: str | Path, work_dir: str | Path, tarball: str, keep: Sequence[str],
                  max_file_mib: float = 4.0) -> dict[str, Any]:
    """Keep the output folder to `keep` (the call's JSON, log and rows) and one tarball: every file of `work_dir`,
    and any file in `out_dir` that is not kept (moved into the tarball), as `tarball` in `out_dir`. Files above
    `max_file_mib` go in cut to their last `max_file_mib`. Returns the folder's files and the tarball's members."""
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    stray = [p for p in out_dir.iterdir() if p.name not in {*keep, tarball}]
    if stray:
        extra = work_dir / "out-extra"
        extra.mkdir(parents=True, exist_ok=True)
        for p in stray:
            shutil.move(str(p), extra / p.name)
    limit = int(max_file_mib * 2 ** 20)
    members = []
    tmp = out_dir / f".{tarball}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(p for p in work_dir.rglob("*") if p.is_file() and not p.is_symlink()):
            name = str(path.relative_to(work_dir))
            if "mps/pipe/" in name.replace(os.sep, "/"):
                continue  # the MPS daemon's pipes (its log is kept)
            if path.stat().st_size > limit:
                cut = work_dir / ".cut"
                with open(path, "rb") as f:
                    f.seek(-limit, os.SEEK_END)
                    cut.write_bytes(f.read())
                tar.add(cut, arcname=name)
                cut.unlink()
            else:
                tar.add(path, arcname=name)
            members.append(name)
    os.replace(tmp, out_dir / tarball)
    files = sorted(p.name for p in out_dir.iterdir())
    return {"files": files, "tarball": members, "stray_moved": [p.name for p in stray]}
