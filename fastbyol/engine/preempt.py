"""Stopping on a signal without losing work: a preempted cluster job gets SIGTERM, a user presses Ctrl-C.

The first SIGTERM or SIGINT only sets a flag: the loop finishes the step it is in, writes a checkpoint and
exits with ``RunStopped.exit_code`` (75). A second signal of either kind takes the default action at once
(the process ends; the last checkpoint on disk is intact, since every checkpoint is written atomically).
Handlers can only be installed from the main thread; elsewhere (a run inside a worker thread) the flag is
simply never set.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        print(f"fastbyol: {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
