"""The target EMA over one flat buffer in one launch (BYOL.md, "Schedules"):

    xi = tau * xi + (1 - tau) * theta        elementwise, in fp32, stored back in xi's dtype

``tau`` is a 1-element device tensor read by the kernel, so a new tau each step needs no recompilation
and no host sync. ``ema_flat_ref`` is the plain-PyTorch reference with the same signature. The online and
target parameters must live in flat contiguous buffers of equal length (the modules' parameters views
into them) for the update to be one pass over memory; building those buffers is the model's job.

Where the parameters cannot be flattened (an engine such as DeepSpeed owns their storage),
``ema_multi_`` takes the two lists of tensors and runs one launch per dtype pair, apex
``multi_tensor_apply``-style: a table of device pointers and a chunk schedule (tensor index, start) built
once per parameter set and cached, so each program updates one chunk of one tensor. ``ema_multi_ref`` is
its reference.
"""

from __future__ import annotations

from typing import NamedTuple

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


# -- the multi-tensor form -------------------------------------------------------------------------------

def ema_multi_ref(targets: list[torch.Tensor], onlines: list[torch.Tensor], tau: torch.Tensor) -> None:
    """In place over every pair, computed in fp32: the per-tensor loop the multi-tensor kernel must match."""
    for target, online in zip(targets, onlines):
        ema_flat_ref(target, online, tau)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _ema_multi_kernel(t_ptrs, o_ptrs, numels, chunk_tensor, chunk_start, tau_ptr,
                      T_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    i = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)  # 64-bit chunk start, 32-bit offsets inside the chunk (as _ema_kernel)
    t_ptr = tl.load(t_ptrs + i).to(tl.pointer_type(T_DTYPE)) + start
    o_ptr = tl.load(o_ptrs + i).to(tl.pointer_type(O_DTYPE)) + start
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.minimum(tl.load(numels + i) - start, BLOCK).to(tl.int32)
    tau = tl.load(tau_ptr).to(tl.float32)
    xi = tl.load(t_ptr + offs, mask=mask, other=0.0)
    theta = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(t_ptr + offs, (tau * xi.to(tl.float32) + (1.0 - tau) * theta).to(xi.dtype), mask=mask)


class _MultiTable(NamedTuple):
    t_ptrs: torch.Tensor
    o_ptrs: torch.Tensor
    numels: torch.Tensor
    chunk_tensor: torch.Tensor
    chunk_start: torch.Tensor


# Tables are built once per parameter set: building one copies host lists to the device, which is not
# something to do every step. Keyed by the tensors' addresses and sizes (a new allocation is a new key).
_TABLES: dict[tuple[object, ...], _MultiTable] = {}
_MAX_TABLES = 16


def _multi_table(targets: list[torch.Tensor], onlines: list[torch.Tensor], block: int) -> _MultiTable:
    key = (block, targets[0].device, *((t.data_ptr(), o.data_ptr(), t.numel()) for t, o in zip(targets, onlines)))
    table = _TABLES.get(key)
    if table is None:
        numels = [t.numel() for t in targets]
        chunks = [(i, start) for i, n in enumerate(numels) for start in range(0, n, block)]
        device = targets[0].device
        table = _MultiTable(
            torch.tensor([t.data_ptr() for t in targets], dtype=torch.int64, device=device),
            torch.tensor([o.data_ptr() for o in onlines], dtype=torch.int64, device=device),
            torch.tensor(numels, dtype=torch.int64, device=device),
            torch.tensor([i for i, _ in chunks], dtype=torch.int32, device=device),
            torch.tensor([s for _, s in chunks], dtype=torch.int64, device=device))
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = table
    return table


@torch.library.custom_op("fastbyol::ema_multi_", mutates_args=("targets",))
def ema_multi_(targets: list[torch.Tensor], onlines: list[torch.Tensor], tau: torch.Tensor) -> None:
    """target_i <- tau * target_i + (1 - tau) * online_i for every pair, one launch per dtype pair."""
    if len(targets) != len(onlines):
        raise ValueError(f"ema_multi_ needs as many targets as onlines, got {len(targets)} and {len(onlines)}")
    if tau.numel() != 1:
        raise ValueError("tau must be a 1-element tensor on the tensors' device")
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for t, o in zip(targets, onlines):
        if t.shape != o.shape or not (t.is_contiguous() and o.is_contiguous()):
            raise ValueError(f"ema_multi_ needs contiguous pairs of one shape, got {tuple(t.shape)} and "
                             f"{tuple(o.shape)}")
        if t.device != tau.device or o.device != tau.device:
            raise ValueError("ema_multi_ needs every tensor and tau on one device")
        if t.dtype not in _TL_DTYPES or o.dtype not in _TL_DTYPES:
            raise ValueError(f"ema_multi_ supports float32, bfloat16 and float16, got {t.dtype} and {o.dtype}")
        if t.numel():
            pair = groups.setdefault((t.dtype, o.dtype), ([], []))
            pair[0].append(t)
            pair[1].append(o)
    block = INTERPRETER_BLOCK if target_of(tau.device).interpreter else BLOCK
    for (t_dtype, o_dtype), (ts, os_) in groups.items():
        table = _multi_table(ts, os_, block)
        with on_device(ts[0]):
            _ema_multi_kernel[(table.chunk_tensor.numel(),)](
                table.t_ptrs, table.o_ptrs, table.numels, table.chunk_tensor, table.chunk_start, tau,
                T_DTYPE=_TL_DTYPES[t_dtype], O_DTYPE=_TL_DTYPES[o_dtype], BLOCK=block,
                num_warps=NUM_WARPS)


@ema_multi_.register_fake
def _(targets: list[torch.Tensor], onlines: list[torch.Tensor], tau: torch.Tensor) -> None:
    return None
