"""Where sweeps live: a local folder (one machine, or a shared NFS mount) or a cloud URI (s3://, gs://) that every
node of a cluster can reach. Files are read and written through pyarrow.fs, as Ray Tune does with its own."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SWEEP_FILE = "gensweep_sweep.json"  # what --resume, the leaderboard and the report need to know about a sweep


def default_storage() -> Path:
    """Where sweeps go unless --storage-path says otherwise."""
    return Path(os.environ.get("GENSWEEP_RESULTS", Path.home() / "gensweep-runs"))


def is_uri(storage: str) -> bool:
    return "://" in storage


def resolve(storage: str) -> str:
    """An absolute local path, or the URI unchanged."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def join(storage: str, *parts: str) -> str:
    """`storage/part/...` for paths and URIs alike (pathlib would turn s3://b into s3:/b)."""
    return "/".join([storage.rstrip("/"), *parts])


def write_text(path: str, text: str) -> None:
    """Write a small text file at a local path or URI, creating its folder. Written beside it, then moved over it:
    a driver killed mid-write leaves the old file whole, not an empty one that --resume cannot read."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(resolve(path))
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    partial = f"{fs_path}.partial-{os.getpid()}"
    with fs.open_output_stream(partial) as f:
        f.write(text.encode())
    fs.move(partial, fs_path)


def read_text(path: str) -> str | None:
    """The text of a file at a local path or URI; None when there is no such file."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(resolve(path))
    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(fs_path) as f:
        return f.read().decode()


def write_sweep_info(storage: str, name: str, info: dict[str, Any]) -> None:
    write_text(join(storage, name, SWEEP_FILE), json.dumps(info, indent=1, default=str))


def read_sweep_info(storage: str, name: str) -> dict[str, Any]:
    """The sweep's saved settings; FileNotFoundError (one line) when there is no such sweep."""
    text = read_text(join(storage, name, SWEEP_FILE))
    if text is None:
        raise FileNotFoundError(f"no sweep named {name!r} under {storage}; pass --storage-path if it lives elsewhere")
    return json.loads(text)


def check_writable(storage: str) -> None:
    """OSError (one line) unless the local results root can hold sweeps; URIs are checked by Ray when it writes."""
    if is_uri(storage):
        return
    root = Path(storage)
    if root.exists() and not root.is_dir():
        raise OSError(f"--storage-path {root} is a file, not a folder; pass a folder for the results")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".gensweep-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"--storage-path {root} is not writable ({e.strerror or type(e).__name__}); pass a folder "
                      f"you can write to") from None


class SweepLock:
    """One driver per sweep: an exclusive lock on `<sweep>/.driver.lock`, held while the driver runs (released by
    the OS when its process dies, so a killed driver never leaves a stale lock). Local storage only: on a cloud
    URI two drivers cannot be told apart, and README says so."""

    def __init__(self, storage: str, name: str):
        self.path = None if is_uri(storage) else Path(storage) / name / ".driver.lock"
        self._file = None

    def acquire(self) -> None:
        """OSError (one line) when another driver holds the sweep."""
        if self.path is None:
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise OSError(f"sweep {self.path.parent.name!r} is being run by another driver ({holder}); wait for it "
                          f"or stop it, or start a new sweep with another --name") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {os.uname().nodename}")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
