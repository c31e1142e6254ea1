"""One writer per run directory: rank 0 holds an exclusive advisory lock on ``<run_dir>/fastbyol.lock`` for as
long as it trains, and the file says who holds it (host, pid, start time).

A second process that would write the same run directory (a second ``fastbyol train`` with the same run.name,
a resumed run started while the first still runs, tasks of a job that each think they are rank 0) cannot take
the lock and stops before writing anything, naming the holder. The kernel drops the lock when its process
dies, however it dies (SIGKILL, node reboot on a local disk), so a lock file that names a process but whose lock
is free was left behind: it is taken over, and said so.

The lock is a POSIX record lock (``fcntl.lockf``), which NFS and Lustre (mounted with ``flock``/``localflock``)
honour across nodes, and which forked children (DataLoader workers) do not inherit. A process drops its POSIX
locks on a file when it closes *any* descriptor of it, so only this module opens the lock file, once. On a file
system without locks the holder's pid is checked instead (on the same host only: a lock held from another host
cannot be proved stale there, so it is refused with the way out).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fastbyol.errors import FastByolError

LOCK_NAME = "fastbyol.lock"
# lockf fails with these where the file system does not do locks.
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started", 0.0)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since {when})"


class RunLock:
    """``RunLock.acquire(run_dir)`` or a one-line ``FastByolError``; ``release()`` at the run's end (a process
    that dies without it leaves a file whose lock the kernel has dropped: the next taker says so)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        path = run_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FastByolError(f"cannot open the run lock {path}: {e.strerror or e}; set run.out_dir to a "
                                "writable folder") from None
        try:
            holder = cls._read(fd)
            locked = cls._try_lock(fd)
            if locked is None:  # no locks on this file system: judge by the pid named in the file
                locked = not (holder and (holder.get("host") != socket.gethostname()
                                          or _pid_alive(int(holder.get("pid", 0)))))
                if not locked and holder and holder.get("host") != socket.gethostname():
                    raise FastByolError(
                        f"run directory {run_dir} is locked by {_describe(holder)}, and this file system has no "
                        f"locks to tell whether it still runs: if it does not, delete {path} and start again")
            if not locked:
                raise FastByolError(f"run directory {run_dir} is in use by {_describe(holder)}: wait for that run "
                                    "to end (or stop it), or choose another run.name")
            if holder and not (holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()):
                print(f"fastbyol: taking over the lock of {run_dir} left by {_describe(holder)}, which no longer "
                      "runs", file=sys.stderr, flush=True)
            cls._write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                            "argv": sys.argv})
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @staticmethod
    def _try_lock(fd: int) -> bool | None:
        """True: locked by us; False: another process holds it; None: the file system has no locks."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if e.errno in NO_LOCKS:
                return None
            raise
        return True

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {"pid": "?", "host": "?"}  # a torn write of a process that died while writing it
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _write(fd: int, holder: dict[str, Any]) -> None:
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        """Empty the file (no holder) and drop the lock; idempotent."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        except OSError:
            pass  # the lock itself is what matters, and closing drops it
        os.close(self._fd)
        self._fd = -1

    def __del__(self) -> None:  # a Trainer dropped without train() (tests, notebooks) lets the directory go
        try:
            self.release()
        except Exception:  # at interpreter exit os may be half torn down; the kernel drops the lock anyway
            pass

    @property
    def held(self) -> bool:
        return self._fd >= 0
