"""The whole LARS step over one flat parameter buffer in three launches, optionally with the target EMA
fused into the last one (BYOL.md, "Optimiser" and "Schedules"; official ``utils/optimizers.py``).

For each parameter tensor p (a segment [offset, offset + numel) of the flat buffer) with gradient g and
momentum buffer m, per step:

    wd  = 0 if p is excluded (bias, BatchNorm) else weight_decay
    u   = g + wd * p
    r   = eta * ||p|| / ||u||      if p is not excluded and both norms are > 0, else 1
    m   = momentum * m + r * u
    p   = p - lr * m
    xi  = tau * xi + (1 - tau) * p      (fused EMA: only for the first n_paired elements, the online
                                         tower, whose target lives in a flat buffer of that length)

Launches, each a pass over the chunk schedule (chunks never straddle two tensors):
  1. ``_norms_kernel``: per chunk, fp32 partial sums of p^2 and u^2 (the segmented reduction);
  2. ``_trust_kernel``: per tensor, its chunks' partials summed in a fixed order (deterministic, no
     atomics), then the trust ratio r;
  3. ``_update_kernel``: momentum and parameter update, and with ``FUSE_EMA`` the target EMA while the new
     parameter is in registers: the EMA then costs one read and one write of the target instead of a
     separate pass that also re-reads the online parameters.
Everything is in fp32 registers whatever the storage dtype. ``lr`` and ``tau`` are 1-element device
tensors (new values each step without recompilation or host sync); weight decay, momentum and eta are
constants of the run.

Sharded (ZeRO hands each rank one slice of the flat buffer): ``shard_layout`` keeps every tensor's
global index with the piece of it inside the slice, ``lars_shard_sums`` returns the per-tensor partial
sums [T, 2], an all-reduce of those T x 2 floats makes them whole-tensor sums, and
``lars_shard_apply`` updates the slice with the exact per-layer trust ratios. A LARS that used each
shard's own norms would be a different optimizer, one whose result depends on the number of ranks.

``lars_flat_ref`` and ``lars_ema_flat_ref`` are the plain-PyTorch references with the same signatures
(the per-tensor formula of ``fastbyol.step.lars.lars_ref``). ``LarsLayout`` is the chunk schedule, built
once from the parameter segments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from fastbyol.kernels.launch import on_device, target_of

from fastbyol.step.ema import ema_ref
from fastbyol.step.lars import lars_ref
from fastbyol.step.zero_lars import ShardKernels, shard_span

BLOCK = 4096
# The interpreter runs each program in numpy: far fewer, larger programs are much faster there.
INTERPRETER_BLOCK = 1 << 16
REDUCE_BLOCK = 256
# Warps of the per-chunk kernels: BLOCK / (32 * NUM_WARPS) = 16 elements per thread, which keeps the fused
# LARS+EMA update (five streams in flight) in registers (benchmarks/aot_compile.py; NOTES.md, issue 15).
NUM_WARPS = 8


class LarsLayout(NamedTuple):
    """The flat buffer's tensors and their chunks, as device tensors built once."""

    offsets: torch.Tensor
    """int64 [T]: where each tensor starts in the flat buffer."""
    numels: torch.Tensor
    """int64 [T]: its length."""
    excluded: torch.Tensor
    """int32 [T]: 1 for biases and BatchNorm parameters (no weight decay, trust ratio 1)."""
    chunk_tensor: torch.Tensor
    """int32 [C]: the tensor each chunk belongs to."""
    chunk_start: torch.Tensor
    """int64 [C]: the chunk's first element in the flat buffer."""
    chunk_end: torch.Tensor
    """int64 [C]: one past its last element."""
    tensor_chunks: torch.Tensor
    """int32 [T + 1]: tensor t owns chunks [tensor_chunks[t], tensor_chunks[t + 1])."""


def chunk_size(device: torch.device | str) -> int:
    """Elements per chunk (and per program) for launches on ``device``."""
    return INTERPRETER_BLOCK if target_of(device).interpreter else BLOCK


def build_layout(segments: list[tuple[int, int, bool]], device: torch.device | str,
                 chunk: int | None = None) -> LarsLayout:
    """From (offset, numel, excluded) per tensor, in any order; segments must not overlap."""
    block = chunk_size(device)
    chunk = chunk or block
    if chunk > block:  # each program covers one chunk with one block
        raise ValueError(f"LARS chunks of {chunk} elements exceed the kernel's block of {block}")
    ordered = sorted(segments, key=lambda seg: seg[0])  # stable: zero-length ties keep the given order
    for (o1, n1, _), (o2, _, _) in zip(ordered, ordered[1:]):
        if o1 + n1 > o2:
            raise ValueError(f"LARS segments overlap at flat offset {o2}")
    chunk_tensor: list[int] = []
    chunk_start: list[int] = []
    chunk_end: list[int] = []
    tensor_chunks = [0]
    for t, (offset, numel, _) in enumerate(ordered):
        for start in range(offset, offset + numel, chunk):
            chunk_tensor.append(t)
            chunk_start.append(start)
            chunk_end.append(min(start + chunk, offset + numel))
        tensor_chunks.append(len(chunk_tensor))

    def dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return LarsLayout(dev([o for o, _, _ in ordered], torch.int64), dev([n for _, n, _ in ordered], torch.int64),
                      dev([int(e) for _, _, e in ordered], torch.int32), dev(chunk_tensor, torch.int32),
                      dev(chunk_start, torch.int64), dev(chunk_end, torch.int64), dev(tensor_chunks, torch.int32))


def shard_layout(segments: list[tuple[int, int, bool]], start: int, end: int, device: torch.device | str,
                 chunk: int | None = None) -> LarsLayout:
    """The layout of the shard [start, end) of a flat buffer described by the global ``segments`` (in
    flat order): every tensor keeps its global index (the pieces outside the shard have length 0), so
    the per-tensor sums of ``lars_shard_sums`` line up across ranks and add up to whole-tensor sums."""
    ordered = sorted(segments, key=lambda seg: seg[0])
    local = []
    for offset, numel, excluded in ordered:
        lo, hi = shard_span(offset, numel, start, end)
        local.append((lo - start, hi - lo, excluded))
    return build_layout(local, device, chunk)


# -- references ------------------------------------------------------------------------------------------

def lars_flat_ref(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, layout: LarsLayout,
                  lr: torch.Tensor, weight_decay: float, momentum: float, eta: float) -> None:
    """In place on param and momentum_buf: ``lars_ref`` on each tensor's slice, in fp32, stored back in the
    buffers' dtypes."""
    for offset, numel, excluded in zip(layout.offsets.tolist(), layout.numels.tolist(), layout.excluded.tolist()):
        part = slice(offset, offset + numel)
        p, m = lars_ref(param[part].float(), grad[part].float(), momentum_buf[part].float(), lr=lr.item(),
                        weight_decay=weight_decay, momentum=momentum, eta=eta, excluded=bool(excluded))
        momentum_buf[part] = m
        param[part] = p


def lars_ema_flat_ref(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, layout: LarsLayout,
                      lr: torch.Tensor, weight_decay: float, momentum: float, eta: float,
                      target: torch.Tensor, tau: torch.Tensor) -> None:
    """LARS, then the EMA of target (length n_paired) towards the first n_paired updated parameters."""
    lars_flat_ref(param, grad, momentum_buf, layout, lr, weight_decay, momentum, eta)
    target.copy_(ema_ref(target.float(), param[:target.numel()].float(), tau.float()))


# -- kernels ---------------------------------------------------------------------------------------------

@triton.jit
def _chunk(chunk_start, chunk_end, c, BLOCK: tl.constexpr):
    """Chunk c's first element (64-bit: a buffer may pass 2^31 elements), its 32-bit offsets and their mask. The
    offsets stay 32-bit inside the chunk: 64-bit ones per element would double their registers."""
    start = tl.load(chunk_start + c)
    offs = tl.arange(0, BLOCK)
    return start, offs, offs < (tl.load(chunk_end + c) - start).to(tl.int32)


@triton.jit
def _decayed(g, p, excluded, t, weight_decay):
    """u = g + wd * p, wd = 0 for an excluded tensor t (``fastbyol.step.lars.weight_decayed``)."""
    return g + tl.where(tl.load(excluded + t) != 0, 0.0, weight_decay) * p


@triton.jit
def _trust(p_norm, u_norm, is_excluded, eta):
    """r = eta * ||p|| / ||u||, 1 where a norm is 0 or the tensor is excluded (``fastbyol.step.lars.trust_ratio``)."""
    ok = (p_norm > 0) & (u_norm > 0) & (is_excluded == 0)
    return tl.where(ok, eta * p_norm / tl.where(ok, u_norm, 1.0), 1.0)


@triton.jit
def _norms_kernel(p_ptr, g_ptr, chunk_tensor, chunk_start, chunk_end, excluded, partial_ptr, weight_decay,
                  BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start, offs, mask = _chunk(chunk_start, chunk_end, c, BLOCK)
    p = tl.load(p_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    u = _decayed(g, p, excluded, t, weight_decay)
    tl.store(partial_ptr + 2 * c, tl.sum(p * p, axis=0))
    tl.store(partial_ptr + 2 * c + 1, tl.sum(u * u, axis=0))


@triton.jit
def _tensor_sums(partial_ptr, tensor_chunks, t, RBLOCK: tl.constexpr):
    """Tensor t's sums of p^2 and u^2: its chunks' partials added in a fixed order (no atomics)."""
    c0 = tl.load(tensor_chunks + t)
    c1 = tl.load(tensor_chunks + t + 1)
    acc_p = tl.zeros([RBLOCK], dtype=tl.float32)
    acc_u = tl.zeros([RBLOCK], dtype=tl.float32)
    for c in range(c0, c1, RBLOCK):
        idx = c + tl.arange(0, RBLOCK)
        m = idx < c1
        acc_p += tl.load(partial_ptr + 2 * idx, mask=m, other=0.0)
        acc_u += tl.load(partial_ptr + 2 * idx + 1, mask=m, other=0.0)
    return tl.sum(acc_p, axis=0), tl.sum(acc_u, axis=0)


@triton.jit
def _trust_kernel(partial_ptr, tensor_chunks, excluded, trust_ptr, eta, RBLOCK: tl.constexpr):
    t = tl.program_id(0)
    sum_p, sum_u = _tensor_sums(partial_ptr, tensor_chunks, t, RBLOCK)
    tl.store(trust_ptr + t, _trust(tl.sqrt(sum_p), tl.sqrt(sum_u), tl.load(excluded + t), eta))


@triton.jit
def _update_kernel(p_ptr, g_ptr, m_ptr, trust_ptr, chunk_tensor, chunk_start, chunk_end, excluded, lr_ptr,
                   weight_decay, momentum, t_ptr, tau_ptr, n_paired,
                   FUSE_EMA: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start, offs, mask = _chunk(chunk_start, chunk_end, c, BLOCK)
    p_ptr += start
    m_ptr += start
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    p = p_raw.to(tl.float32)
    g = tl.load(g_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    m_raw = tl.load(m_ptr + offs, mask=mask, other=0.0)
    u = _decayed(g, p, excluded, t, weight_decay) * tl.load(trust_ptr + t)
    m = momentum * m_raw.to(tl.float32) + u
    new_p = (p - tl.load(lr_ptr).to(tl.float32) * m).to(p_raw.dtype)
    tl.store(m_ptr + offs, m.to(m_raw.dtype), mask=mask)
    tl.store(p_ptr + offs, new_p, mask=mask)
    if FUSE_EMA:
        # The EMA reads the stored (rounded) parameter, exactly what a separate EMA pass would read.
        t_mask = mask & (offs < tl.minimum(tl.maximum(n_paired - start, 0), BLOCK).to(tl.int32))
        xi = tl.load(t_ptr + start + offs, mask=t_mask, other=0.0)
        tau = tl.load(tau_ptr).to(tl.float32)
        new_xi = tau * xi.to(tl.float32) + (1.0 - tau) * new_p.to(tl.float32)
        tl.store(t_ptr + start + offs, new_xi.to(xi.dtype), mask=t_mask)


@triton.jit
def _sums_kernel(partial_ptr, tensor_chunks, sums_ptr, RBLOCK: tl.constexpr):
    t = tl.program_id(0)
    sum_p, sum_u = _tensor_sums(partial_ptr, tensor_chunks, t, RBLOCK)
    tl.store(sums_ptr + 2 * t, sum_p)
    tl.store(sums_ptr + 2 * t + 1, sum_u)


@triton.jit
def _trust_from_sums_kernel(sums_ptr, excluded, trust_ptr, n_tensors, eta, BLOCK: tl.constexpr):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < n_tensors
    p_norm = tl.sqrt(tl.load(sums_ptr + 2 * t, mask=mask, other=0.0))
    u_norm = tl.sqrt(tl.load(sums_ptr + 2 * t + 1, mask=mask, other=0.0))
    tl.store(trust_ptr + t, _trust(p_norm, u_norm, tl.load(excluded + t, mask=mask, other=1), eta), mask=mask)


def _check(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, layout: LarsLayout,
           lr: torch.Tensor) -> None:
    if not (param.shape == grad.shape == momentum_buf.shape and param.dim() == 1):
        raise ValueError(f"LARS needs flat param, grad and momentum buffers of one length, got "
                         f"{tuple(param.shape)}, {tuple(grad.shape)}, {tuple(momentum_buf.shape)}")
    if not (param.is_contiguous() and grad.is_contiguous() and momentum_buf.is_contiguous()):
        raise ValueError("LARS needs contiguous flat buffers")
    if lr.numel() != 1 or lr.device != param.device or layout.chunk_start.device != param.device:
        raise ValueError("lr must be a 1-element tensor, and it and the layout on the buffers' device")


def _launch(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, layout: LarsLayout,
            lr: torch.Tensor, weight_decay: float, momentum: float, eta: float,
            target: torch.Tensor | None, tau: torch.Tensor | None) -> None:
    n_chunks, n_tensors = layout.chunk_tensor.numel(), layout.offsets.numel()
    if n_chunks == 0:
        return
    block = chunk_size(param.device)
    with on_device(param):
        partial = torch.empty(2 * n_chunks, dtype=torch.float32, device=param.device)
        trust = torch.empty(n_tensors, dtype=torch.float32, device=param.device)
        _norms_kernel[(n_chunks,)](param, grad, layout.chunk_tensor, layout.chunk_start, layout.chunk_end,
                                   layout.excluded, partial, weight_decay, BLOCK=block, num_warps=NUM_WARPS)
        _trust_kernel[(n_tensors,)](partial, layout.tensor_chunks, layout.excluded, trust, eta,
                                    RBLOCK=REDUCE_BLOCK)
        fuse = target is not None
        _update_kernel[(n_chunks,)](param, grad, momentum_buf, trust, layout.chunk_tensor, layout.chunk_start,
                                    layout.chunk_end, layout.excluded, lr, weight_decay, momentum,
                                    target if fuse else param, tau if fuse else lr,
                                    target.numel() if target is not None else 0, FUSE_EMA=fuse, BLOCK=block,
                                    num_warps=NUM_WARPS)


@torch.library.custom_op("fastbyol::lars_flat_", mutates_args=("param", "momentum_buf"))
def lars_flat_(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, offsets: torch.Tensor,
               numels: torch.Tensor, excluded: torch.Tensor, chunk_tensor: torch.Tensor, chunk_start: torch.Tensor,
               chunk_end: torch.Tensor, tensor_chunks: torch.Tensor, lr: torch.Tensor, weight_decay: float,
               momentum: float, eta: float) -> None:
    """One LARS step over the flat buffer (three launches). Call through ``lars_flat``."""
    layout = LarsLayout(offsets, numels, excluded, chunk_tensor, chunk_start, chunk_end, tensor_chunks)
    _check(param, grad, momentum_buf, layout, lr)
    _launch(param, grad, momentum_buf, layout, lr, weight_decay, momentum, eta, None, None)


@lars_flat_.register_fake
def _(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, offsets: torch.Tensor,
      numels: torch.Tensor, excluded: torch.Tensor, chunk_tensor: torch.Tensor, chunk_start: torch.Tensor,
      chunk_end: torch.Tensor, tensor_chunks: torch.Tensor, lr: torch.Tensor, weight_decay: float,
      momentum: float, eta: float) -> None:
    return None


@torch.library.custom_op("fastbyol::lars_ema_flat_", mutates_args=("param", "momentum_buf", "target"))
def lars_ema_flat_(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, offsets: torch.Tensor,
                   numels: torch.Tensor, excluded: torch.Tensor, chunk_tensor: torch.Tensor,
                   chunk_start: torch.Tensor, chunk_end: torch.Tensor, tensor_chunks: torch.Tensor,
                   lr: torch.Tensor, weight_decay: float, momentum: float, eta: float, target: torch.Tensor,
                   tau: torch.Tensor) -> None:
    """LARS and the target EMA in the same three launches. Call through ``lars_ema_flat``."""
    layout = LarsLayout(offsets, numels, excluded, chunk_tensor, chunk_start, chunk_end, tensor_chunks)
    _check(param, grad, momentum_buf, layout, lr)
    if target.dim() != 1 or target.numel() > param.numel() or not target.is_contiguous():
        raise ValueError(f"the target must be a contiguous flat buffer no longer than the parameters, got "
                         f"{tuple(target.shape)} for {param.numel()} parameters")
    if tau.numel() != 1 or tau.device != param.device or target.device != param.device:
        raise ValueError("tau must be a 1-element tensor, and it and the target on the buffers' device")
    _launch(param, grad, momentum_buf, layout, lr, weight_decay, momentum, eta, target, tau)


@lars_ema_flat_.register_fake
def _(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, offsets: torch.Tensor,
      numels: torch.Tensor, excluded: torch.Tensor, chunk_tensor: torch.Tensor, chunk_start: torch.Tensor,
      chunk_end: torch.Tensor, tensor_chunks: torch.Tensor, lr: torch.Tensor, weight_decay: float,
      momentum: float, eta: float, target: torch.Tensor, tau: torch.Tensor) -> None:
    return None


def lars_flat(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, layout: LarsLayout,
              lr: torch.Tensor, weight_decay: float, momentum: float, eta: float) -> None:
    """In place: one LARS step of every tensor in ``layout`` (same signature as ``lars_flat_ref``)."""
    lars_flat_(param, grad, momentum_buf, *layout, lr, weight_decay, momentum, eta)


def lars_ema_flat(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, layout: LarsLayout,
                  lr: torch.Tensor, weight_decay: float, momentum: float, eta: float,
                  target: torch.Tensor, tau: torch.Tensor) -> None:
    """In place: LARS, and the EMA of ``target`` towards the first ``target.numel()`` new parameters, in
    one pass (same signature as ``lars_ema_flat_ref``)."""
    lars_ema_flat_(param, grad, momentum_buf, *layout, lr, weight_decay, momentum, eta, target, tau)


# -- sharded: the flat buffer split across ranks (ZeRO partitions) ---------------------------------------

@torch.library.custom_op("fastbyol::lars_shard_sums", mutates_args=())
def _lars_shard_sums(param: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor,
                     excluded: torch.Tensor, chunk_tensor: torch.Tensor, chunk_start: torch.Tensor,
                     chunk_end: torch.Tensor, tensor_chunks: torch.Tensor, weight_decay: float) -> torch.Tensor:
    n_chunks, n_tensors = chunk_tensor.numel(), offsets.numel()
    sums = torch.zeros(n_tensors, 2, dtype=torch.float32, device=param.device)
    if n_chunks == 0:
        return sums
    with on_device(param):
        partial = torch.empty(2 * n_chunks, dtype=torch.float32, device=param.device)
        _norms_kernel[(n_chunks,)](param, grad, chunk_tensor, chunk_start, chunk_end, excluded, partial,
                                   weight_decay, BLOCK=chunk_size(param.device), num_warps=NUM_WARPS)
        _sums_kernel[(n_tensors,)](partial, tensor_chunks, sums, RBLOCK=REDUCE_BLOCK)
    return sums


@_lars_shard_sums.register_fake
def _(param: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, numels: torch.Tensor,
      excluded: torch.Tensor, chunk_tensor: torch.Tensor, chunk_start: torch.Tensor, chunk_end: torch.Tensor,
      tensor_chunks: torch.Tensor, weight_decay: float) -> torch.Tensor:
    return param.new_empty((offsets.shape[0], 2), dtype=torch.float32)


@torch.library.custom_op("fastbyol::lars_shard_apply_", mutates_args=("param", "momentum_buf"))
def _lars_shard_apply_(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, offsets: torch.Tensor,
                       numels: torch.Tensor, excluded: torch.Tensor, chunk_tensor: torch.Tensor,
                       chunk_start: torch.Tensor, chunk_end: torch.Tensor, tensor_chunks: torch.Tensor,
                       sums: torch.Tensor, lr: torch.Tensor, weight_decay: float, momentum: float,
                       eta: float) -> None:
    layout = LarsLayout(offsets, numels, excluded, chunk_tensor, chunk_start, chunk_end, tensor_chunks)
    _check(param, grad, momentum_buf, layout, lr)
    n_chunks, n_tensors = chunk_tensor.numel(), offsets.numel()
    if sums.shape != (n_tensors, 2):
        raise ValueError(f"sums must be [{n_tensors}, 2] (one row per tensor of the layout), got {tuple(sums.shape)}")
    if n_chunks == 0:
        return
    with on_device(param):
        trust = torch.empty(n_tensors, dtype=torch.float32, device=param.device)
        _trust_from_sums_kernel[(triton.cdiv(n_tensors, REDUCE_BLOCK),)](sums, excluded, trust, n_tensors, eta,
                                                                         BLOCK=REDUCE_BLOCK)
        _update_kernel[(n_chunks,)](param, grad, momentum_buf, trust, chunk_tensor, chunk_start, chunk_end,
                                    excluded, lr, weight_decay, momentum, param, lr, 0, FUSE_EMA=False,
                                    BLOCK=chunk_size(param.device), num_warps=NUM_WARPS)


@_lars_shard_apply_.register_fake
def _(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, offsets: torch.Tensor,
      numels: torch.Tensor, excluded: torch.Tensor, chunk_tensor: torch.Tensor, chunk_start: torch.Tensor,
      chunk_end: torch.Tensor, tensor_chunks: torch.Tensor, sums: torch.Tensor, lr: torch.Tensor,
      weight_decay: float, momentum: float, eta: float) -> None:
    return None


def lars_shard_sums(param: torch.Tensor, grad: torch.Tensor, layout: LarsLayout, weight_decay: float
                    ) -> torch.Tensor:
    """[T, 2] fp32: per tensor of the layout, sum p^2 and sum (g + wd p)^2 over this shard's piece of it
    (zero for tensors outside the shard). Summed over all shards (an all-reduce of T x 2 floats), they
    are the whole tensors' squared norms."""
    return _lars_shard_sums(param, grad, *layout, weight_decay)


def lars_shard_apply(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, layout: LarsLayout,
                     sums: torch.Tensor, lr: torch.Tensor, weight_decay: float, momentum: float, eta: float
                     ) -> None:
    """In place on this shard: LARS with the trust ratios of the whole tensors, from the all-reduced
    ``sums`` (so a partitioned LARS step equals the unpartitioned one, not a per-shard approximation)."""
    _lars_shard_apply_(param, grad, momentum_buf, *layout, sums, lr, weight_decay, momentum, eta)


SHARD_KERNELS = ShardKernels(build_layout, lars_shard_sums, lars_shard_apply)
"""What ``ZeroLARS(kernels=...)`` steps with on the Triton path."""
