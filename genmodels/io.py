"""Files that must never be seen half-written: checkpoints, reference statistics, caches, a sweep's settings.

Every writer in the repository goes through `write_atomic`: the bytes go to a temporary file in the same folder, are
flushed to disk, then renamed over the target, so a crash (or a SIGKILLed driver) leaves the old file whole.
`writable_folder` is the one check that a folder named on a command line (--out, --storage-path) can hold them.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(f)` on a temporary binary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))


def json_lines(text: str, cut: list[int] | None = None) -> list[dict[str, Any]]:
    """The objects of a JSON-lines text (Tune's result.json), in order. A line that does not parse, e.g. the last one
    of a file a crash or a full disk cut short, or one being written right now, is passed over, and its number
    (1-based) added to `cut` where one is given. Where a writer went on after a cut line without a newline, the line
    holds the cut text and then a whole object that begins as the cut one did (the same first key): that one is
    kept."""
    objects = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
            if cut is not None and line.strip():
                cut.append(number)
            # cut within its first key: any object after it is the appended one
            head = re.match(r'\s*(\{\s*"(?:[^"\\]|\\.)*"\s*:)', line)
            first = head[1] if head else '{"'
            start = line.find(first, head.end() if head else 1)
            while start > 0 and obj is None:
                try:
                    obj = json.loads(line[start:])
                except ValueError:
                    start = line.find(first, start + 1)
        if isinstance(obj, dict):
            objects.append(obj)
    return objects


def writable_folder(path: str | Path, flag: str) -> Path:
    """Create the folder `path` if need be; OSError (one line naming `flag`, the option that chose it) unless it is
    a folder this process can write to. A file is written to find out: root ignores permission bits, and a mount
    may be read-only."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, not a folder; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise OSError(f"{flag} {path} is not writable ({e.strerror or type(e).__name__}); pass a folder you can "
                      f"write to") from None
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically (see write_atomic)."""
    import torch  # here, not at the top: sweeps.storage writes text through this module and needs no torch

    return write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by save_atomic, tensors and plain containers only (weights_only: no pickled code)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
