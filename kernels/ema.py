"""The target EMA over one flat buffer in one launch (BYOL.md, "Schedules"):

    xi = tau * xi + (1 - tau) * theta        elementwise, in fp32, stored back in xi's dtype

``tau`` is a 1-element device tensor read by the kernel, so a new tau each step needs no recompilation
and no host sync. ``ema_flat_ref`` is the plain-PyTorch reference with the same signature. The online and
target parameters must live in flat contiguous buffers of equal length (the modules' parameters views
into them) for the update to be one pass over memory; building those buffers is the model's job.

Where the parameters cannot be flattened (DeepSpeed owns their storage), the update strategies use the
step's ``ema_update_`` (one ``_foreach_lerp_``, already a multi-tensor launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastbyol.kernels.launch import on_device, target_of

from fastbyol.step.ema import ema_ref

BLOCK = 4096
NUM_WARPS = 8
# The interpreter runs each program in numpy: far fewer, larger programs are much faster there.
INTERPRETER_BLOCK = 1 << 20


def ema_flat_ref(target: torch.Tensor, online: torch.Tensor, tau: torch.Tensor) -> None:
    """In place: the step's ``ema_ref`` computed in fp32, stored back in the target's dtype."""
    target.copy_(ema_ref(target.float(), online.float(), tau.float()))


@triton.jit
def _ema_kernel(t_ptr, o_ptr, tau_ptr, n, BLOCK: tl.constexpr):
    # The block's start in 64 bits (a buffer may pass 2^31 elements), offsets inside it in 32: half the registers
    # of 64-bit offsets per element (each thread holds BLOCK / (32 * num_warps) of them).
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.minimum(n - start, BLOCK).to(tl.int32)
    tau = tl.load(tau_ptr).to(tl.float32)
    xi = tl.load(t_ptr + start + offs, mask=mask, other=0.0)
    theta = tl.load(o_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    new = tau * xi.to(tl.float32) + (1.0 - tau) * theta
    tl.store(t_ptr + start + offs, new.to(xi.dtype), mask=mask)


@torch.library.custom_op("fastbyol::ema_flat_", mutates_args=("target",))
def ema_flat_(target: torch.Tensor, online: torch.Tensor, tau: torch.Tensor) -> None:
    """One launch over the whole buffer: target <- tau * target + (1 - tau) * online."""
    if target.shape != online.shape or not (target.is_contiguous() and online.is_contiguous()):
        raise ValueError(f"ema_flat_ needs contiguous buffers of one shape, got {tuple(target.shape)} and "
                         f"{tuple(online.shape)}")
    if tau.numel() != 1 or tau.device != target.device:
        raise ValueError("tau must be a 1-element tensor on the buffers' device")
    n = target.numel()
    if n == 0:
        return
    with on_device(target):
        block = INTERPRETER_BLOCK if target_of(target.device).interpreter else BLOCK
        _ema_kernel[(triton.cdiv(n, block),)](target, online, tau, n, BLOCK=block, num_warps=NUM_WARPS)


@ema_flat_.register_fake
def _(target: torch.Tensor, online: torch.Tensor, tau: torch.Tensor) -> None:
    return None
