"""What the GPU check (gpu_check.py beside this) adds to bench/processes.py, for a machine that a later call may find
still holding what an earlier one left, and whose output folder comes back only in part:

- `clean_earlier_work`: what an earlier, killed call left (its processes, MPS daemon and work folder) ended.
- `write_fake_mps_control`: a stand-in MPS daemon, for rehearsing on a CPU.
- `finish_output`: the output folder kept to the call's own files, everything else in one tarball.

No torch here, as in bench/processes.py.
"""
from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Sequence

from bench.processes import MPS_CONTROL, end_processes, processes_with_env, stop_mps
from genmodels.io import write_atomic

MAX_OUTPUT_FILES = 8  # the files a device call brings back: the only place this limit is written
WORK_PREFIX = "gensweep-gpu-check-"  # work folders under the temp dir; a later call cleans up what one left
WORK_ENV = "GENSWEEP_GPU_CHECK_WORK"  # the work folder of the run that started a process (in its environment)


def clean_earlier_work(keep: str | Path | None = None) -> list[str]:
    """A machine kept between calls can hold what an earlier, killed call left: its processes (they carry its work
    folder in their environment) are ended, its MPS daemon stopped and its work folder removed (every WORK_PREFIX
    folder in the temp dir other than `keep`)."""
    notes = []
    base = str(Path(tempfile.gettempdir()) / WORK_PREFIX)
    mine = set(processes_with_env(WORK_ENV, str(keep))) if keep is not None else set()
    for name, pids in end_processes(lambda: [p for p in processes_with_env(WORK_ENV, base, prefix=True)
                                             if p not in mine], grace_s=1.0):
        notes.append(f"{name} to {len(pids)} process(es) an earlier call left: {pids}")
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

    def write_tarball(f) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            for path in sorted(p for p in work_dir.rglob("*") if p.is_file() and not p.is_symlink()):
                name = str(path.relative_to(work_dir))
                if "mps/pipe/" in name.replace(os.sep, "/"):
                    continue  # the MPS daemon's pipes (its log is kept)
                if path.stat().st_size > limit:
                    with open(path, "rb") as src:
                        src.seek(-limit, os.SEEK_END)
                        info = tar.gettarinfo(str(path), arcname=name)
                        info.size = limit
                        tar.addfile(info, src)
                else:
                    tar.add(path, arcname=name)
                members.append(name)

    write_atomic(out_dir / tarball, write_tarball)
    files = sorted(p.name for p in out_dir.iterdir())
    return {"files": files, "tarball": members, "stray_moved": [p.name for p in stray]}
