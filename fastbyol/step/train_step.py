"""One BYOL optimizer step, in the pieces the loop calls top to bottom:

    forward_backward (per micro-batch) -> optimizer_step (LARS at lr[k]) -> EMA of the target (tau[k])

or, with the Triton kernels, the last two as one pass over memory (``fastbyol.kernels.flat_lars``). With
method=simclr the network is a ``SimclrNet``, the loss NT-Xent over the global batch, and there is no EMA.

Everything returned is a device tensor: no ``.item()``, no host sync, no branch on a tensor value.
The loop reads metrics at its log cadence only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastbyol.data.views import Views
from fastbyol.lr import set_lr
from fastbyol.model.network import Network, Outputs
from fastbyol.step.ema import ema_update_
from fastbyol.step.loss import byol_loss, projection_std
from fastbyol.step.ntxent import nt_xent


class MicroStepOut(NamedTuple):
    loss: torch.Tensor
    """Symmetric BYOL loss (or SimCLR's NT-Xent) of this micro-batch (detached, fp32, on the device)."""
    proj_std: torch.Tensor
    """Collapse monitor: mean per-dimension std of the normalised online projections."""
    probe_loss: torch.Tensor | None
    """Cross-entropy of the online linear probe (None when off)."""
    probe_top1: torch.Tensor | None
    """Share of view-1 images the probe classifies right, in [0, 1] (None when off)."""


def autocast_for(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast where asked (the CUDA default); a no-op context otherwise."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()




class Losses(NamedTuple):
    """The loss functions of a run, chosen once when it is built: the plain-PyTorch references
    (``REFERENCE_LOSSES``) or the fused Triton kernels (``fastbyol.kernels.losses.FUSED_LOSSES``), each pair
    with one signature."""

    byol: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``(p1, p2, z1, z2) -> scalar``: the symmetric BYOL loss (``fastbyol.step.loss.byol_loss``)."""
    ntxent: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    """``(q, k, pos, own, temperature) -> scalar``: NT-Xent (``fastbyol.step.ntxent.nt_xent``)."""


REFERENCE_LOSSES = Losses(byol_loss, nt_xent)


def network_outputs(pair: Network | nn.Module, view1: torch.Tensor, view2: torch.Tensor,
                    bf16: bool) -> Outputs:
    """Both views through the network (``pair``: the method's ``Network``, or DDP around it)."""
    with autocast_for(view1.device, bf16):
        out: Outputs = pair(view1, view2)
    return out


MethodLoss = Callable[[Outputs], torch.Tensor]
"""The method's loss on the network's outputs (``fastbyol.step.methods.Method.loss``)."""


def loss_from_outputs(out: Outputs, labels: torch.Tensor | None, loss_fn: MethodLoss
                      ) -> tuple[torch.Tensor, MicroStepOut]:
    """The method's loss on the network's outputs, plus the online probe's; returns (the loss to backward,
    the metrics)."""
    loss = loss_fn(out)
    probe_loss = probe_top1 = None
    total = loss
    if out.probe_logits is not None:
        if labels is None:
            raise ValueError("the online probe needs labels; this data source has none")
        logits = out.probe_logits.float()
        probe_loss = F.cross_entropy(logits, labels)
        probe_top1 = (logits.argmax(dim=1) == labels).float().mean()
        total = loss + probe_loss
    return total, MicroStepOut(loss.detach(), projection_std(out.online_proj1),
                               None if probe_loss is None else probe_loss.detach(), probe_top1)


def forward_loss(pair: Network | nn.Module, view1: torch.Tensor, view2: torch.Tensor,
                 labels: torch.Tensor | None, bf16: bool, loss_fn: MethodLoss) -> tuple[torch.Tensor, MicroStepOut]:
    """Forward both views (``network_outputs``), then the loss (``loss_from_outputs``): returns (the loss to
    backward, the metrics).

    This is the region ``torch.compile`` takes whole (``fullgraph=True``): no host sync, no branch on a
    tensor value, and the fused losses are custom ops with fakes and autograd rules. With the online
    probe on, its cross-entropy is added (official: ``loss = repr_loss + classif_loss``); the probe reads
    detached features, so its gradient never reaches the encoder. ``loss_fn`` is the method's loss (its
    functions the PyTorch references, or the fused Triton kernels)."""
    return loss_from_outputs(network_outputs(pair, view1, view2, bf16), labels, loss_fn)


ForwardLoss = Callable[..., tuple[torch.Tensor, MicroStepOut]]
"""``forward_loss``'s signature: (pair, view1, view2, labels, bf16, loss_fn)."""


def forward_backward(pair: Network | nn.Module, views: Views, labels: torch.Tensor | None, loss_scale: float,
                     bf16: bool, loss_fn: MethodLoss, forward: ForwardLoss = forward_loss,
                     backward: Callable[[torch.Tensor], object] | None = None,
                     phase: Callable[[str], None] | None = None) -> MicroStepOut:
    """Forward (``forward_loss``, or its compiled form), then backward the scaled loss into the online
    grads. ``loss_scale`` = 1 / accum_steps, so the accumulated gradient is the full batch's mean.
    ``backward`` replaces ``Tensor.backward`` (DeepSpeed's ``engine.backward``); ``phase("backward")`` is
    called between the two (the trainer's phase timer)."""
    total, out = forward(pair, views.view1, views.view2, labels, bf16, loss_fn)
    if phase is not None:
        phase("backward")
    scaled = total * loss_scale if loss_scale != 1.0 else total
    if backward is None:
        scaled.backward()
    else:
        backward(scaled)
    return out


def optimizer_step(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the accumulated gradient at this step's learning rate (a host float from the schedule)."""
    set_lr(optimizer, lr)
    optimizer.step()


def target_step(online: list[torch.Tensor], target: list[torch.Tensor], tau: float) -> None:
    """The EMA, once per optimizer step (never per micro-batch)."""
    ema_update_(target, online, tau)
