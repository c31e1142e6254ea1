"""Fused NT-Xent (SimCLR) loss: normalise, logits, masked logsumexp and the positive in tiles, the [M, N] logits
never written to memory (``fastbyol.step.ntxent``; official ``simclr/objective.py``, ``add_contrastive_loss``).

Anchors q [M, D], keys k [N, D], int64 pos_index and self_index [M] (columns of k), temperature T > 0:

    n_x    = max(||x||^2, 1e-12)^(-1/2),  xh = x n_x                  (the official ``l2_normalize``)
    s_ij   = qh_i . kh_j / T = n_qi n_kj (q_i . k_j) / T
    lse_i  = logsumexp_{j != self_i} s_ij
    loss_i = lse_i - s_{i, pos_i},   L = mean_i loss_i                  scalar fp32

Row sums of squares and the dots q_i . k_j are accumulated in fp32 whatever the input dtype. The forward walks
the keys in BLOCK_N-column tiles with an online max and sum (one pass), masking the self column and the
columns >= N; it writes loss_i and lse_i per row ([M] fp32) and torch takes the mean, so the value is
deterministic. lse is saved for the backward. With g = grad_out / M and P_ij = exp(s_ij - lse_i) (0 at j = self_i):

    dS_ij  = g (P_ij - [j == pos_i])                                  dL/ds_ij
    dqh_i  = (1/T) sum_j dS_ij kh_j          dkh_j = (1/T) sum_i dS_ij qh_i
    qh_i . dqh_i = sum_j dS_ij s_ij          kh_j . dkh_j = sum_i dS_ij s_ij      (no second pass over D)
    ||x||^2 >= eps:  dx = n_x (dxh - xh (xh . dxh))
    ||x||^2 <  eps:  dx = n_x dxh                                     (n_x = 1e6 is a constant under the clamp)

The branch follows ``torch.clamp``'s backward, which passes the gradient where ||x||^2 >= eps. dq is computed
by row blocks of q looping over the key tiles, dk by column blocks of k looping over the anchor tiles; both
recompute the logit tile (P from the saved lse) rather than store the [M, N] matrix, as FlashAttention's
backward. When q is k (one process), autograd adds the two. Costs: the forward MND multiply-adds; dq and dk
each recompute the logits once per output D chunk (C = ceil(D / BLOCK_D)) and add MND for their products, so the
backward is 2 (C + 1) MND: 4x the forward for D <= 128 (C = 1), FlashAttention's ratio.

Precision: fp32 inputs use ``input_precision="ieee"`` in every ``tl.dot`` (TF32 rounds each operand to
~5e-4 relative, and the logits carry 1/T = 10 times the cosine's error). bf16/fp16 inputs go into the forward
dots as they are (the products are exact in fp32, as the reference's); the backward's fp32 operands dS n_x use
TF32 there (the inputs are exact in TF32, dS is rounded to 10 bits, finer than the gradient's own bf16/fp16
rounding). Tiles, warps and stages are chosen per target and dtype by ``tiles_for``: on a GPU the fp32 path keeps
its ``ieee`` dots and fits 99 KiB of shared memory by its smaller tiles, not by a lower precision.

``ntxent_ref`` is the plain-PyTorch reference with the same signature (``fastbyol.step.ntxent.nt_xent``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from fastbyol.kernels.launch import Target, on_device, target_of

from fastbyol.step import loss as _loss
from fastbyol.step import ntxent as _ntxent

L2_EPS = _loss.L2_EPS
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Tiles(NamedTuple):
    """One launch configuration of the NT-Xent kernels."""

    block_m: int
    """anchor rows per logit tile"""
    block_n: int
    """key columns per logit tile"""
    block_d: int
    """the backward's output chunk of D (each chunk recomputes the logits once)"""
    block_k: int
    """the logits' reduction chunk of D (tl.dot's K): its operand tiles, times the stages, fill shared memory"""
    num_warps: int
    num_stages: int


def tiles_for(target: Target, dtype: torch.dtype, d: int) -> Tiles:
    """The launch configuration for a target, an input dtype and a width D (tl.dot needs every side >= 16).

    On a GPU, read off the ahead-of-time compile (``benchmarks/aot_compile.py``; registers, spills and shared
    memory for sm_80 to sm_120 in ``benchmarks/results/*-aot-compile.md``, the sweep in NOTES.md, issue 15):
    - fp32 (SimCLR's projection is fp32 even under autocast): ``ieee`` dots run on the FMA units and hold their
      operand fragments in registers, so 32 x 32 logit tiles, K chunks of 32 and 8 warps: 20 KiB of shared
      memory and no spill on sm_90 (64 x 64 tiles with 128-wide K needed 128 KiB, over the 99 KiB of sm_86/89/120,
      and spilled kilobytes per thread);
    - bf16/fp16: 64 x 64 tiles on the tensor cores, K chunks of 64, 8 warps, 3 stages: 48 KiB, no spill;
    - a D that is not a multiple of 16 (rows not 16-element aligned, so no vector loads): 16 x 16 tiles, 8 warps
      (with 4 warps the bf16 backward spilled 16-48 B on sm_90 under triton 3.6).
    Every choice fits every architecture's shared memory, so none depends on the capability yet; ``target``
    carries it for the per-architecture tuning a GPU timing would justify."""
    block_d = min(max(triton.next_power_of_2(d), 16), 128)
    if target.interpreter:
        # The interpreter's cost is per operation, not per element: the smallest row and column tiles, so small
        # test shapes cross tile edges, and D in one wide chunk. Warps and stages mean nothing there.
        return Tiles(16, 16, block_d, block_d, 4, 1)
    if d % 16:
        return Tiles(16, 16, block_d, 32, 8, 2)
    if dtype == torch.float32:
        return Tiles(32, 32, block_d, 32, 8, 2)
    return Tiles(64, 64, block_d, 64, 8, 3)


def ntxent_ref(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The plain-PyTorch reference: scalar fp32 NT-Xent, gradients into q and k."""
    return _ntxent.nt_xent(q, k, pos_index, self_index, temperature)


@triton.jit
def _sumsq_kernel(x_ptr, out_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum x^2 per row, fp32, for BLOCK_R rows in chunks of BLOCK_D."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    base = rows.to(tl.int64) * D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs[None, :] < D)
        x = tl.load(x_ptr + base[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _inv_norm(ss, eps):
    return 1.0 / tl.sqrt(tl.maximum(ss, eps))


@triton.jit
def _logits(
    q_ptr, k_ptr, rows, cols, M, N, D, n_q, n_k, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """s_ij = n_qi n_kj (q_i . k_j) / T for one [BLOCK_M, BLOCK_N] tile; the dots in fp32 over D in chunks of BLOCK_K.
    Rows >= M and columns >= N load zeros (s = 0 there: callers mask them)."""
    q_base = rows.to(tl.int64) * D
    k_base = cols.to(tl.int64) * D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, D, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        d_mask = offs < D
        a = tl.load(q_ptr + q_base[:, None] + offs[None, :], mask=(rows[:, None] < M) & d_mask[None, :], other=0.0)
        b = tl.load(k_ptr + k_base[None, :] + offs[:, None], mask=(cols[None, :] < N) & d_mask[:, None], other=0.0)
        if DOT_FP32:  # exact for bf16 operands; works around the interpreter's bf16 tl.dot (see _dot_settings)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)  # b is k's tile read transposed: [BLOCK_K, BLOCK_N]
    return acc * (n_q[:, None] * inv_t) * n_k[None, :]


@triton.jit
def _ntxent_fwd_kernel(
    q_ptr, k_ptr, q_ss_ptr, k_ss_ptr, pos_ptr, self_ptr, loss_ptr, lse_ptr, M, N, D, inv_t, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n_q = _inv_norm(tl.load(q_ss_ptr + rows, mask=row_mask, other=1.0), eps)
    pos = tl.load(pos_ptr + rows, mask=row_mask, other=-1)
    slf = tl.load(self_ptr + rows, mask=row_mask, other=-1)
    # Finite start: a tile whose only valid column is the self one leaves exp(m - m_new) = 1, not inf - inf.
    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        n_k = _inv_norm(tl.load(k_ss_ptr + cols, mask=cols < N, other=1.0), eps)
        s = _logits(q_ptr, k_ptr, rows, cols, M, N, D, n_q, n_k, inv_t, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_FP32)
        s_pos += tl.sum(tl.where(cols[None, :] == pos[:, None], s, 0.0), axis=1)
        s = tl.where((cols[None, :] == slf[:, None]) | (cols[None, :] >= N), float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(loss_ptr + rows, lse - s_pos, mask=row_mask)


@triton.jit
def _grad_logits(s, cols, N, lse, pos, slf, valid_rows):
    """dL/ds / g for one tile: P_ij - [j == pos_i], P = exp(s - lse) zeroed at the self column, columns >= N
    and invalid rows."""
    p = tl.exp(s - lse[:, None])
    drop = (cols[None, :] == slf[:, None]) | (cols[None, :] >= N) | (valid_rows[:, None] == 0)
    p = tl.where(drop, 0.0, p)
    return p - tl.where(cols[None, :] == pos[:, None], 1.0, 0.0)


@triton.jit
def _normalize_backward(x, ss, n, dxh, radial, eps):
    """dx from dxh = dL/dxh, radial = xh . dxh per row; torch.clamp passes the gradient where ss >= eps."""
    xh = x * n[:, None]
    return n[:, None] * tl.where(ss[:, None] < eps, dxh, dxh - xh * radial[:, None])


@triton.jit
def _ntxent_dq_kernel(
    grad_out_ptr, q_ptr, k_ptr, q_ss_ptr, k_ss_ptr, pos_ptr, self_ptr, lse_ptr, dq_ptr, M, N, D, inv_t, inv_m, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, BWD_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    q_base = rows.to(tl.int64) * D
    q_ss = tl.load(q_ss_ptr + rows, mask=row_mask, other=1.0)
    n_q = _inv_norm(q_ss, eps)
    pos = tl.load(pos_ptr + rows, mask=row_mask, other=-1)
    slf = tl.load(self_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    # d mean / d loss_i = 1 / M; grad_out is read on the device, so there is no host sync.
    g = tl.load(grad_out_ptr).to(tl.float32) * inv_m
    valid_rows = row_mask.to(tl.int32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_j dS_ij n_kj k_j over this D chunk
        radial = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j dS_ij s_ij = qh_i . dqh_i / g
        for col_start in range(0, N, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            col_mask = cols < N
            n_k = _inv_norm(tl.load(k_ss_ptr + cols, mask=col_mask, other=1.0), eps)
            s = _logits(q_ptr, k_ptr, rows, cols, M, N, D, n_q, n_k, inv_t,
                        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_FP32)
            ds = _grad_logits(s, cols, N, lse, pos, slf, valid_rows)
            radial += tl.sum(ds * s, axis=1)
            k_tile = tl.load(k_ptr + cols.to(tl.int64)[:, None] * D + offs_d[None, :],
                             mask=col_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(ds * n_k[None, :], k_tile, acc, input_precision=BWD_PRECISION)
        mask = row_mask[:, None] & d_mask[None, :]
        q_tile = tl.load(q_ptr + q_base[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dq = _normalize_backward(q_tile, q_ss, n_q, acc * (g * inv_t), radial * g, eps)
        tl.store(dq_ptr + q_base[:, None] + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ntxent_dk_kernel(
    grad_out_ptr, q_ptr, k_ptr, q_ss_ptr, k_ss_ptr, pos_ptr, self_ptr, lse_ptr, dk_ptr, M, N, D, inv_t, inv_m, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, BWD_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    k_base = cols.to(tl.int64) * D
    k_ss = tl.load(k_ss_ptr + cols, mask=col_mask, other=1.0)
    n_k = _inv_norm(k_ss, eps)
    g = tl.load(grad_out_ptr).to(tl.float32) * inv_m  # on the device: no host sync
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_i dS_ij n_qi q_i over this D chunk
        radial = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_i dS_ij s_ij = kh_j . dkh_j / g
        for row_start in range(0, M, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            n_q = _inv_norm(tl.load(q_ss_ptr + rows, mask=row_mask, other=1.0), eps)
            pos = tl.load(pos_ptr + rows, mask=row_mask, other=-1)
            slf = tl.load(self_ptr + rows, mask=row_mask, other=-1)
            lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
            s = _logits(q_ptr, k_ptr, rows, cols, M, N, D, n_q, n_k, inv_t,
                        BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_FP32)
            ds = _grad_logits(s, cols, N, lse, pos, slf, row_mask.to(tl.int32))
            radial += tl.sum(ds * s, axis=0)
            q_tile = tl.load(q_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
                             mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(tl.trans(ds * n_q[:, None]), q_tile, acc, input_precision=BWD_PRECISION)
        mask = col_mask[:, None] & d_mask[None, :]
        k_tile = tl.load(k_ptr + k_base[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dk = _normalize_backward(k_tile, k_ss, n_k, acc * (g * inv_t), radial * g, eps)
        tl.store(dk_ptr + k_base[:, None] + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask)


def _check(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> None:
    _ntxent.check_inputs(q, k, pos_index, self_index, temperature)
    if q.dtype not in _DTYPES:
        raise ValueError(f"ntxent kernel takes float32, bfloat16 or float16 inputs, got {q.dtype}")


def _tiles(x: torch.Tensor, d: int) -> Tiles:
    return tiles_for(target_of(x.device), x.dtype, d)


def _dot_settings(x: torch.Tensor) -> dict[str, object]:
    """tl.dot settings: PRECISION for the logits (it only acts on fp32 operands), BWD_PRECISION for the
    backward's fp32 operands, DOT_FP32 to upcast bf16 logit operands under the interpreter, whose bf16 tl.dot
    multiplies the raw bit patterns (triton 3.8's ``create_dot`` converts only 8-bit floats); the upcast is
    exact, so the interpreter computes what a GPU's bf16 MMA with fp32 accumulation does."""
    fp32 = x.dtype == torch.float32
    return {"PRECISION": "ieee", "BWD_PRECISION": "ieee" if fp32 else "tf32",
            "DOT_FP32": x.dtype == torch.bfloat16 and target_of(x.device).interpreter}


def _sum_squares(x: torch.Tensor, t: Tiles) -> torch.Tensor:
    """[R] fp32 sum x^2 per row of a contiguous [R, D] tensor: the norms' pre-pass, O(RD), read once."""
    r, d = x.shape
    out = torch.empty(r, dtype=torch.float32, device=x.device)
    _sumsq_kernel[(triton.cdiv(r, t.block_m),)](x, out, r, d, BLOCK_R=t.block_m, BLOCK_D=t.block_k)
    return out


def _prepare(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, pos_index, self_index, temperature)
    return q.contiguous(), k.contiguous(), pos_index.contiguous(), self_index.contiguous()


def ntxent_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_index: torch.Tensor,
    self_index: torch.Tensor,
    temperature: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw forward launcher: (loss_i, lse_i), each [M] fp32, written into ``out`` and ``lse`` if given."""
    q, k, pos_index, self_index = _prepare(q, k, pos_index, self_index, temperature)
    (m, d), n = q.shape, k.shape[0]
    out = torch.empty(m, dtype=torch.float32, device=q.device) if out is None else out
    lse = torch.empty(m, dtype=torch.float32, device=q.device) if lse is None else lse
    t = _tiles(q, d)
    dot = _dot_settings(q)
    with on_device(q):
        q_ss, k_ss = _sum_squares(q, t), _sum_squares(k, t)
        _ntxent_fwd_kernel[(triton.cdiv(m, t.block_m),)](
            q, k, q_ss, k_ss, pos_index, self_index, out, lse, m, n, d, 1.0 / temperature, L2_EPS,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, PRECISION=dot["PRECISION"],
            DOT_FP32=dot["DOT_FP32"], num_warps=t.num_warps, num_stages=t.num_stages,
        )
    return out, lse


def ntxent_grads(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    pos_index: torch.Tensor,
    self_index: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    grad_q: torch.Tensor | None = None,
    grad_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw backward launcher: (dL/dq, dL/dk) in the inputs' dtypes, from the forward's lse [M]; written into
    the buffers if given."""
    q, k, pos_index, self_index = _prepare(q, k, pos_index, self_index, temperature)
    (m, d), n = q.shape, k.shape[0]
    if lse.shape != (m,) or lse.dtype != torch.float32:
        raise ValueError(f"ntxent backward needs the forward's fp32 lse [{m}], got {lse.dtype} {tuple(lse.shape)}")
    grad_q = torch.empty_like(q) if grad_q is None else grad_q
    grad_k = torch.empty_like(k) if grad_k is None else grad_k
    grad_out = grad_out.reshape(()).to(device=q.device, dtype=torch.float32)
    t = _tiles(q, d)
    with on_device(q):
        q_ss, k_ss = _sum_squares(q, t), _sum_squares(k, t)
        args = (grad_out, q, k, q_ss, k_ss, pos_index, self_index, lse.contiguous())
        scalars = (m, n, d, 1.0 / temperature, 1.0 / m, L2_EPS)
        blocks = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_D": t.block_d, "BLOCK_K": t.block_k,
                  **_dot_settings(q), "num_warps": t.num_warps, "num_stages": t.num_stages}
        _ntxent_dq_kernel[(triton.cdiv(m, t.block_m),)](*args, grad_q, *scalars, **blocks)
        _ntxent_dk_kernel[(triton.cdiv(n, t.block_n),)](*args, grad_k, *scalars, **blocks)
    return grad_q, grad_k


@torch.library.custom_op("fastbyol::ntxent", mutates_args=())
def _ntxent_op(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, lse = ntxent_rows(q, k, pos_index, self_index, temperature)
    return rows.mean(), lse


@_ntxent_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, pos_index, self_index, temperature)
    return q.new_empty((), dtype=torch.float32), q.new_empty((q.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastbyol::ntxent_backward", mutates_args=())
def _ntxent_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    pos_index: torch.Tensor,
    self_index: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ntxent_grads(grad_out, q, k, pos_index, self_index, lse, temperature)


@_ntxent_backward_op.register_fake
def _(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    pos_index: torch.Tensor,
    self_index: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, pos_index, self_index, temperature)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Any, ...], output: Any) -> None:
    q, k, pos_index, self_index, temperature = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, pos_index, self_index, lse)
    ctx.temperature = temperature  # type: ignore[attr-defined]


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
    q, k, pos_index, self_index, lse = ctx.saved_tensors  # type: ignore[attr-defined]
    grad_q, grad_k = torch.ops.fastbyol.ntxent_backward(
        grad_out, q, k, pos_index, self_index, lse, ctx.temperature  # type: ignore[attr-defined]
    )
    return grad_q, grad_k, None, None, None


_ntxent_op.register_autograd(_backward, setup_context=_setup_context)


def ntxent(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Fused NT-Xent (scalar fp32); gradients flow into q and k (k may be q itself: autograd adds them)."""
    loss, _ = _ntxent_op(q, k, pos_index, self_index, temperature)
    return loss
