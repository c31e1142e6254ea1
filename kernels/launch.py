"""What every kernel launcher shares."""

from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: make it the tensor's one (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
