"""Where the step's time goes: forward, backward, optimizer and EMA, timed without a host sync.

On CUDA every phase boundary records an event on the current stream (a few microseconds of launch work,
no wait); the elapsed times are read at the log cadence, after the meter's one sync has made every event
complete. On the CPU the work is synchronous, so ``time.perf_counter`` at the boundaries is the phase's
time. The data wait is a host quantity (time blocked in the loader) and is measured by the trainer.

Each phase is also a named range: NVTX on CUDA (what Nsight Systems shows on its timeline) and, while a
``torch.profiler`` window is open, a ``record_function`` range in the trace.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch


class PhaseTimer:
    """``start(name)`` opens a phase (closing the open one); ``stop()`` closes it; ``read()`` returns the
    summed milliseconds per phase since the last read and starts a new interval."""

    def __init__(self, device: torch.device, enabled: bool = True, nvtx: bool | None = None) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.nvtx = self.cuda and enabled if nvtx is None else nvtx
        self.profiling = False  # set by the trainer while a torch.profiler window is open
        self._open: tuple[str, Any] | None = None
        self._range: Any = None
        self._spans: list[tuple[str, Any, Any]] = []
        self._free: list[Any] = []  # completed events, reused (no allocation per step)

    def _stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, name: str) -> None:
        if not self.enabled:
            return
        now = self._stamp()
        self._close(now)
        self._open = (name, now)
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        if self.profiling:
            self._range = torch.autograd.profiler.record_function(name)
            self._range.__enter__()

    @contextlib.contextmanager
    def host_range(self, name: str) -> Iterator[None]:
        """A named range with no device timing: host-side waits such as the data fetch."""
        if not self.enabled:
            yield
            return
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        ctx = torch.autograd.profiler.record_function(name) if self.profiling else contextlib.nullcontext()
        try:
            with ctx:
                yield
        finally:
            if self.nvtx:
                torch.cuda.nvtx.range_pop()

    def stop(self) -> None:
        if not self.enabled or self._open is None:
            return
        self._close(self._stamp())

    def _close(self, now: Any) -> None:
        if self._open is None:
            return
        name, began = self._open
        self._spans.append((name, began, now))
        self._open = None
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def read(self) -> dict[str, float]:
        """Milliseconds per phase summed over the interval. On CUDA the caller must have synchronised
        (the meter's read is that sync); ``elapsed_time`` of an incomplete event would raise."""
        totals: dict[str, float] = {}
        if self.cuda and self._spans:
            self._spans[-1][2].synchronize()  # complete already after the meter's sync: costs nothing
        seen: set[int] = set()
        for name, began, ended in self._spans:
            ms = began.elapsed_time(ended) if self.cuda else (ended - began) * 1e3
            totals[name] = totals.get(name, 0.0) + ms
            if self.cuda:
                for event in (began, ended):
                    if id(event) not in seen and (self._open is None or event is not self._open[1]):
                        seen.add(id(event))
                        self._free.append(event)
        self._spans = []
        return totals
