"""Where sweeps live: a local folder (one machine, or a shared NFS mount) or a cloud URI (s3://, gs://) that every
node of a cluster can reach. Files are read and written through pyarrow.fs, as Ray Tune does with its own."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from filelock import FileLock, Timeout

from genmodels.io import writable_folder, write_text_atomic


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
    """Write a small text file at a local path or URI, creating its folder, so that a driver killed mid-write
    leaves the old file whole, not an empty one that --resume cannot read."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(resolve(path))
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        write_text_atomic(fs_path, text)
        return
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(fs_path) as f:  # an object store's put is atomic: readers see the old or the new
        f.write(text.encode())


def read_text(path: str) -> str | None:
    """The text of a file at a local path or URI; None when there is no such file. Bytes a crash or a full disk
    garbled decode as U+FFFD, so only their line fails to parse, not the whole file."""
    data = read_bytes(path)
    return None if data is None else data.decode(errors="replace")


def read_bytes(path: str) -> bytes | None:
    """The bytes of a file at a local path or URI; None when there is no such file."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(resolve(path))
    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(fs_path) as f:
        return f.read()


def check_writable(storage: str, timeout_s: float = 20.0) -> None:
    """OSError (one line) unless the results root can hold sweeps: a local folder this process can write to, or a
    bucket that answers within `timeout_s` and takes a file (a bucket that cannot be reached would otherwise fail
    as a traceback from inside Ray, or, on gs://, retry for minutes)."""
    if not is_uri(storage):
        writable_folder(storage, "--storage-path")
        return
    outcome: list[BaseException | None] = []

    def probe() -> None:
        import pyarrow.fs

        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(storage)
            fs.create_dir(path, recursive=True)  # a file:// root need not exist yet; on a bucket: a no-op
            with fs.open_output_stream(f"{path}/.gensweep-write-test") as f:
                f.write(b"")
            fs.delete_file(f"{path}/.gensweep-write-test")
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ...: each becomes one line
            outcome.append(e)

    # a daemon thread: a probe stuck in the cloud client's retries must not hold up this process's exit
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise OSError(f"--storage-path {storage} did not answer within {timeout_s:g} s; check the bucket's name, "
                      f"the network and the credentials, or pass a local --storage-path")
    if outcome[0] is not None:
        reason = str(outcome[0]).strip().splitlines()[0] if str(outcome[0]).strip() else type(outcome[0]).__name__
        raise OSError(f"--storage-path {storage} cannot be written ({reason}); check the bucket's name, the "
                      f"network and the credentials, or pass a local --storage-path")


class SweepLock:
    """One driver per sweep: a file lock on `<sweep>/.driver.lock`, taken without waiting and held while the driver
    runs (an OS lock, released when its process dies, so a killed driver never leaves a stale lock). Who holds it is
    in `.driver.holder`, a file of its own: a contender opens the lock file to try it, and must not be able to clear
    the holder's name. Local storage only: on a cloud URI two drivers cannot be told apart (docs/faults.md says so)."""

    def __init__(self, storage: str, name: str):
        self.folder = Path(storage) / name
        self.holder = self.folder / ".driver.holder"
        # timeout=0: a second driver fails at once; thread_local=False: the lock is the driver's, not one thread's
        self._lock = None if is_uri(storage) else FileLock(self.folder / ".driver.lock", timeout=0, thread_local=False)

    def acquire(self) -> None:
        """OSError (one line) when another driver holds the sweep."""
        if self._lock is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            try:
                holder = self.holder.read_text().strip()
            except FileNotFoundError:  # not written yet, or the holder is letting go
                holder = ""
            raise OSError(f"sweep {self.folder.name!r} is being run by another driver ({holder or 'another process'});"
                          f" wait for it or stop it, or start a new sweep with another --name") from None
        write_text_atomic(self.holder, f"pid {os.getpid()} on {os.uname().nodename}")

    def release(self) -> None:
        """Let go; a sweep folder that holds nothing but the lock (a driver stopped before the sweep was saved)
        goes too, so that the same command can start the sweep again."""
        if self._lock is not None and self._lock.is_locked:
            self.holder.unlink(missing_ok=True)  # while still locked: never another driver's name
            self._lock.release()
            with contextlib.suppress(OSError):  # another driver got in first: the folder is its now
                if {p.name for p in self.folder.iterdir()} <= {".driver.lock"}:
                    (self.folder / ".driver.lock").unlink(missing_ok=True)
                    self.folder.rmdir()
