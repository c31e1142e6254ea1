"""Writing a file so that a crash never leaves it half-written (checkpoints, configs, file lists, results).

A reader sees the old file or the new one: the bytes go to a temp file in the same directory, are
fsync'd, renamed over the target (atomic on POSIX), and the directory entry is fsync'd too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Read once at import (os.umask can only read by setting), before any thread starts.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """temp file in the same directory -> fsync -> rename -> fsync(dir)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable: fsync the directory entry."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_link(source: Path | str, path: Path | str) -> None:
    """``path`` becomes a second name of the complete file ``source`` (a hard link made under a temp name and
    renamed over ``path``, so a reader never sees a partial file); where the file system has no hard links
    (or ``source`` is on another one), a copy written by ``atomic_write_bytes``."""
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError:
        atomic_write_bytes(path, source.read_bytes())
        return
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
