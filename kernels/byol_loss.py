"""Fused BYOL regression loss, both directions in one pass over the rows (BYOL.md, "Loss").

Per row, with n_x = max(||x||^2, 1e-12)^(-1/2) (the official ``l2_normalize``):

    l(p, z) = || p n_p - z n_z ||^2 = n_p^2 pp + n_z^2 zz - 2 n_p n_z pz     (= 2 - 2 cos for nonzero rows)
    L       = mean_batch [ l(p1, z2) + l(p2, z1) ]                            the two directions SUMMED

where pp = sum p^2, zz = sum z^2, pz = sum p z, all accumulated in fp32 whatever the input dtype. z is the
target network's projection and gets no gradient. Gradient of one direction with respect to p:

    pp >= eps:  dl/dp = 2 n_p n_z (n_p^2 pz p - z)          (n_p^2 pp == 1, so only the cross term moves)
    pp <  eps:  dl/dp = 2 n_p^2 p - 2 n_p n_z z              (n_p = 1e6 is a constant under the clamp)

scaled by grad_out / B. The branch follows ``torch.clamp``'s backward, which passes the gradient where
pp >= eps. The forward writes one fp32 loss per row ([B], both directions summed) and torch takes the mean,
so the result is deterministic; the backward recomputes the three row sums instead of saving them.

``byol_loss_ref`` is the plain-PyTorch reference with the same signature (``fastbyol.step.loss.byol_loss``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastbyol.kernels.launch import on_device

from fastbyol.step import loss as _loss

L2_EPS = _loss.L2_EPS
_MAX_BLOCK_D = 1024


def byol_loss_ref(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch reference: scalar fp32 symmetric BYOL loss."""
    return _loss.byol_loss(p1, p2, z1, z2)


@triton.jit
def _row_sums(p_ptr, z_ptr, base, D, BLOCK_D: tl.constexpr):
    """sum p^2, sum z^2, sum p z over one row, fp32, in chunks of BLOCK_D."""
    cols = tl.arange(0, BLOCK_D)
    acc_pp = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_zz = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_pz = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        offs = start + cols
        mask = offs < D
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        acc_pp += p * p
        acc_zz += z * z
        acc_pz += p * z
    return tl.sum(acc_pp, axis=0), tl.sum(acc_zz, axis=0), tl.sum(acc_pz, axis=0)


@triton.jit
def _byol_loss_fwd_kernel(p1_ptr, p2_ptr, z1_ptr, z2_ptr, loss_ptr, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    # direction 1: p1 against z2
    pp, zz, pz = _row_sums(p1_ptr, z2_ptr, base, D, BLOCK_D)
    n_p = 1.0 / tl.sqrt(tl.maximum(pp, eps))
    n_z = 1.0 / tl.sqrt(tl.maximum(zz, eps))
    loss = n_p * n_p * pp + n_z * n_z * zz - 2.0 * n_p * n_z * pz
    # direction 2: p2 against z1
    pp, zz, pz = _row_sums(p2_ptr, z1_ptr, base, D, BLOCK_D)
    n_p = 1.0 / tl.sqrt(tl.maximum(pp, eps))
    n_z = 1.0 / tl.sqrt(tl.maximum(zz, eps))
    loss += n_p * n_p * pp + n_z * n_z * zz - 2.0 * n_p * n_z * pz
    tl.store(loss_ptr + row, loss)


@triton.jit
def _grad_p_row(p_ptr, z_ptr, gp_ptr, base, D, eps, scale, BLOCK_D: tl.constexpr):
    """Write d l(p, z) / dp for one row, times scale, in gp's dtype."""
    pp, zz, pz = _row_sums(p_ptr, z_ptr, base, D, BLOCK_D)
    n_p = 1.0 / tl.sqrt(tl.maximum(pp, eps))
    n_z = 1.0 / tl.sqrt(tl.maximum(zz, eps))
    # torch.clamp passes the gradient where pp >= eps; below it n_p is the constant eps^-1/2.
    coef_p = tl.where(pp < eps, 2.0 * n_p * n_p, 2.0 * n_p * n_p * n_p * n_z * pz) * scale
    coef_z = -2.0 * n_p * n_z * scale
    cols = tl.arange(0, BLOCK_D)
    for start in range(0, D, BLOCK_D):
        offs = start + cols
        mask = offs < D
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = coef_p * p + coef_z * z
        tl.store(gp_ptr + base + offs, g.to(gp_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _byol_loss_bwd_kernel(
    grad_out_ptr, p1_ptr, p2_ptr, z1_ptr, z2_ptr, gp1_ptr, gp2_ptr, D, inv_b, eps, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    # d mean / d row = 1 / B; grad_out is read on the device, so there is no host sync.
    scale = tl.load(grad_out_ptr).to(tl.float32) * inv_b
    _grad_p_row(p1_ptr, z2_ptr, gp1_ptr, base, D, eps, scale, BLOCK_D)
    _grad_p_row(p2_ptr, z1_ptr, gp2_ptr, base, D, eps, scale, BLOCK_D)


def _check(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> None:
    if p1.dim() != 2 or any(t.shape != p1.shape for t in (p2, z1, z2)):
        raise ValueError(
            f"byol_loss expects four [B, D] tensors of one shape, got {[tuple(t.shape) for t in (p1, p2, z1, z2)]}"
        )
    if p1.shape[0] < 1 or p1.shape[1] < 1:
        raise ValueError(f"byol_loss needs B >= 1 and D >= 1, got {tuple(p1.shape)}")


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), _MAX_BLOCK_D)



def byol_loss_rows(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw forward launcher: per-row loss l(p1, z2) + l(p2, z1), [B] fp32, written into ``out`` if given."""
    _check(p1, p2, z1, z2)
    p1, p2, z1, z2 = (t.contiguous() for t in (p1, p2, z1, z2))
    b, d = p1.shape
    if out is None:
        out = torch.empty(b, dtype=torch.float32, device=p1.device)
    with on_device(p1):
        _byol_loss_fwd_kernel[(b,)](p1, p2, z1, z2, out, d, L2_EPS, BLOCK_D=_block_d(d))
    return out


def byol_loss_grad_p(
    grad_out: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    grad_p1: torch.Tensor | None = None,
    grad_p2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw backward launcher: (dL/dp1, dL/dp2) in the inputs' dtypes, written into the buffers if given."""
    _check(p1, p2, z1, z2)
    p1, p2, z1, z2 = (t.contiguous() for t in (p1, p2, z1, z2))
    b, d = p1.shape
    grad_p1 = torch.empty_like(p1) if grad_p1 is None else grad_p1
    grad_p2 = torch.empty_like(p2) if grad_p2 is None else grad_p2
    grad_out = grad_out.reshape(()).to(device=p1.device, dtype=torch.float32)
    with on_device(p1):
        _byol_loss_bwd_kernel[(b,)](grad_out, p1, p2, z1, z2, grad_p1, grad_p2, d, 1.0 / b, L2_EPS, BLOCK_D=_block_d(d))
    return grad_p1, grad_p2


@torch.library.custom_op("fastbyol::byol_loss", mutates_args=())
def _byol_loss_op(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    return byol_loss_rows(p1, p2, z1, z2).mean()


@_byol_loss_op.register_fake
def _(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    _check(p1, p2, z1, z2)
    return p1.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastbyol::byol_loss_backward", mutates_args=())
def _byol_loss_backward_op(
    grad_out: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return byol_loss_grad_p(grad_out, p1, p2, z1, z2)


@_byol_loss_backward_op.register_fake
def _(
    grad_out: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(p1, p2, z1, z2)
    return torch.empty_like(p1, memory_format=torch.contiguous_format), torch.empty_like(
        p2, memory_format=torch.contiguous_format
    )


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[torch.Tensor, ...], output: object) -> None:
    ctx.save_for_backward(*inputs)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    p1, p2, z1, z2 = ctx.saved_tensors  # type: ignore[attr-defined]
    grad_p1, grad_p2 = torch.ops.fastbyol.byol_loss_backward(grad_out, p1, p2, z1, z2)
    return grad_p1, grad_p2, None, None


_byol_loss_op.register_autograd(_backward, setup_context=_setup_context)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Fused symmetric BYOL loss (scalar fp32); gradients flow into p1 and p2 only."""
    return _byol_loss_op(p1, p2, z1, z2)
