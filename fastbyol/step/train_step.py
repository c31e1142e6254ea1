"""One BYOL optimizer step, in the pieces the loop calls top to bottom:

    forward_backward (per micro-batch) -> optimizer_step (LARS at lr[k]) -> EMA of the target (tau[k])

Everything returned is a device tensor: no ``.item()``, no host sync, no branch on a tensor value.
The loop reads metrics at its log cadence only.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from fastbyol.data.views import Views
from fastbyol.model.byol import ByolPair
from fastbyol.step.ema import ema_update_
from fastbyol.step.loss import byol_loss, projection_std


class MicroStepOut(NamedTuple):
    loss: torch.Tensor
    """Symmetric BYOL loss of this micro-batch (detached, fp32, on the device)."""
    proj_std: torch.Tensor
    """Collapse monitor: mean per-dimension std of the normalised online projections."""


def autocast_for(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast where asked (the CUDA default); a no-op context otherwise."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(pair: ByolPair, views: Views, loss_scale: float, bf16: bool) -> MicroStepOut:
    """Forward both views through online and target, backward the scaled loss into the online grads.

    ``loss_scale`` = 1 / accum_steps, so the accumulated gradient is the full batch's mean gradient."""
    with autocast_for(views.view1.device, bf16):
        out = pair(views.view1, views.view2)
    loss = byol_loss(out.p1, out.p2, out.z1, out.z2)
    (loss * loss_scale).backward()
    return MicroStepOut(loss.detach(), projection_std(out.online_proj1))


def optimizer_step(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the accumulated gradient at this step's learning rate (a host float from the schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()


def target_step(online: list[torch.Tensor], target: list[torch.Tensor], tau: float) -> None:
    """The EMA, once per optimizer step (never per micro-batch)."""
    ema_update_(target, online, tau)
