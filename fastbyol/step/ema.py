"""The target update ``xi = tau * xi + (1 - tau) * theta`` (BYOL.md, "Schedules").

Once per optimizer step, over the parameters only (the target's BatchNorm running statistics come from
its own forward passes). ``ema_ref`` is the per-tensor formula the fused kernel must match;
``ema_update_`` is the multi-tensor form the loop uses (one ``_foreach_lerp_`` over all pairs).
"""

from __future__ import annotations

import torch


def ema_ref(target: torch.Tensor, online: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Pure: the new target tensor (``tau`` a float, or a tensor as the kernels' 1-element device tau)."""
    return tau * target + (1.0 - tau) * online


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    """In place over all pairs: lerp(xi, theta, 1 - tau) = tau * xi + (1 - tau) * theta."""
    if target:
        torch._foreach_lerp_(target, online, 1.0 - tau)
