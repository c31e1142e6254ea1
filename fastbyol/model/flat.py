"""Parameters as views into one flat buffer, so an elementwise update (the target EMA) is one pass over
memory and one kernel launch. Each parameter keeps its shape and strides (channels-last included):
only its storage moves into the buffer, so modules, optimizers and checkpoints see no difference."""

from __future__ import annotations

import torch


def flatten_params_(params: list[torch.Tensor]) -> torch.Tensor:
    """Copy ``params`` (one dtype, one device, dense) into a new flat buffer, in order, and make each
    parameter a view of its slice. Returns the buffer."""
    if not params:
        raise ValueError("nothing to flatten")
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        raise ValueError("flatten_params_ needs parameters of one dtype on one device")
    flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
    offset = 0
    with torch.no_grad():
        for p in params:
            if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                raise ValueError("flatten_params_ needs contiguous or channels-last parameters")
            view = torch.as_strided(flat, p.shape, p.stride(), offset)
            view.copy_(p)
            p.data = view
            offset += p.numel()
    return flat
