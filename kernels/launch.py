"""What every kernel launcher shares: the device context, and the target its launch configuration is chosen for.

A launcher picks tiles, warps and stages for where the kernel will run: Triton's interpreter on the CPU (large
blocks, since its cost is per program), or a CUDA GPU of a given compute capability (shared memory per block is
99 KiB on 8.6/8.9/12.0, 163 KiB on 8.0, 227 KiB on 9.0/10.0). ``target_of`` is the one place that decides;
``compiling_for`` makes every launcher take its GPU branch for a chosen capability without a GPU, so the
ahead-of-time compile check (``benchmarks/aot_compile.py``) compiles exactly what that GPU would run.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch


class Target(NamedTuple):
    """Where a launch runs."""

    interpreter: bool
    """True under ``TRITON_INTERPRET=1`` (and for CPU tensors, which only the interpreter can run)."""
    capability: int
    """CUDA compute capability as 10 * major + minor (90 for H100/H200); 0 under the interpreter."""


INTERPRETER = Target(True, 0)
_FORCED: ContextVar[Target | None] = ContextVar("fastbyol_kernel_target", default=None)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (decided by the environment before any @triton.jit)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def target_of(device: torch.device | str) -> Target:
    """The target a launch on ``device`` is configured for (see ``compiling_for``)."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    device = torch.device(device)
    if interpreted() or device.type != "cuda":
        return INTERPRETER
    return Target(False, _capability(device.index if device.index is not None else torch.cuda.current_device()))


@contextlib.contextmanager
def compiling_for(capability: int) -> Iterator[Target]:
    """Inside, every launcher configures itself as on a GPU of ``capability``, whatever the tensors' device:
    for capturing launches on the CPU and compiling them ahead of time for that GPU."""
    forced = Target(False, capability)
    token = _FORCED.set(forced)
    try:
        yield forced
    finally:
        _FORCED.reset(token)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: make it the tensor's one (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
