"""Stopping on a signal without losing work: a preempted cluster job gets SIGTERM, SLURM's early warning
(``#SBATCH --signal=USR1@120``) is SIGUSR1, a user presses Ctrl-C.

The first SIGTERM, SIGINT or SIGUSR1 only sets a flag: the loop finishes the step it is in, writes a checkpoint
and exits with ``RunStopped.exit_code`` (75). After SIGUSR1 inside a SLURM job, rank 0 first puts the job back
in the queue (``scontrol requeue``), so it continues by itself with ``--resume auto``; SIGTERM never requeues,
since ``scancel`` sends it too. A second signal of any kind takes the default action at once (the process
ends; the last checkpoint on disk is intact, since every checkpoint is written atomically). Handlers can only
be installed from the main thread; elsewhere (a run inside a worker thread) the flag is simply never set.

A signal sent to the whole process group (``scancel``, ``kill -- -PGID``, Ctrl-C in a terminal) also reaches the
DataLoader's worker processes, which die of it. torch's SIGCHLD handler would then raise "DataLoader worker ...
killed by signal" in the middle of the step; so once a stop is flagged, SIGCHLD goes back to its default (nothing)
until ``restore``, the step finishes on the batch it has, and a fetch that finds the workers gone stops the run
there with its checkpoint (the trainer's ``FetchStopped``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REQUEUE_SIGNAL = signal.SIGUSR1
"""The signal after which a SLURM job requeues itself (SLURM sends it ahead of the time limit when asked)."""


class StopRequest:
    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:  # the second signal: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if signal.SIGCHLD not in self._previous:  # the loader's workers may be dying of this signal too
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        print(f"fastbyol: {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: an array task's own id (``<array job>_<task>``), else the job's; ''
    outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def requeue() -> tuple[bool, str]:
    """Put this SLURM job back in the queue (rank 0, after the stop checkpoint): (requeued, what happened)."""
    job = slurm_job_id()
    if not job:
        return False, "not a SLURM job, so not requeued"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, f"scontrol not found, so SLURM job {job} was not requeued"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"scontrol requeue {job} failed ({e})"
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout).split()) or f"exit {done.returncode}"
        return False, f"scontrol requeue {job} failed ({why})"
    return True, f"SLURM job {job} requeued: it continues from this checkpoint with --resume auto"
