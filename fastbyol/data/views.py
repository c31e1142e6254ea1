"""The ``Views`` contract every data source delivers to the step.

Two augmented, normalised views of the same images: float tensors of logical shape [B, 3, H, W].
"NHWC-ready": on CUDA they are moved in channels-last memory format (a DALI NHWC batch permuted to
NCHW is already that layout, so no copy is made); on the CPU they stay contiguous.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Views(NamedTuple):
    view1: torch.Tensor
    view2: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.view1.shape[0])

    def to(self, device: torch.device, channels_last: bool, non_blocking: bool = True) -> Views:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return Views(*(v.to(device, non_blocking=non_blocking, memory_format=fmt) for v in self))


class Batch(NamedTuple):
    """One micro-batch, its class labels (None where the source has none), and the files that could not
    be read while making it (substituted, counted)."""

    views: Views
    labels: torch.Tensor | None
    skipped: list[str]
