"""SimCLR's loss on the step's outputs: NT-Xent with the negatives of the GLOBAL batch.

    q = [h1; h2] (this rank's 2b rows)      k = [gather(h1); gather(h2)] (all ranks' rows, 2bW)
    loss = 2 * mean_i [ logsumexp_{j != i} (q_i . k_j / T) - q_i . k_pos(i) / T ]    (rows l2-normalised)

The factor 2 is the official code's ``loss_a + loss_b`` (each direction a mean over the batch; here the
mean runs over both directions' 2b anchors). With one process q = k. With several, every rank scores its
own anchors against every rank's rows: ``gather_rows`` all-gathers with gradient (its backward sums every
rank's gradient for a row and hands each rank its own rows), so after DDP averages the gradients the step
equals the single-process one on the whole batch (tests/test_simclr.py holds the two equal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from fastbyol.step.ntxent import nt_xent, pair_indices


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.b = dist.get_rank(), rows.shape[0]
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss reads every rank's rows: a row's gradient is the sum over ranks (works on gloo,
        # which has no reduce-scatter; C floats per row, small next to DDP's gradient all-reduce).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def distributed_world() -> tuple[int, int]:
    """(rank, world) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' ``rows`` concatenated in rank order, differentiable; ``rows`` itself with one process."""
    _, world = distributed_world()
    if world == 1:
        return rows
    out: torch.Tensor = _GatherRows.apply(rows)
    return out


NtXent = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``(q, k, pos, own, temperature) -> scalar``: ``nt_xent``'s signature, which the fused kernel shares."""


def simclr_loss(h1: torch.Tensor, h2: torch.Tensor, temperature: float, ntxent: NtXent = nt_xent) -> torch.Tensor:
    """Scalar fp32 NT-Xent of both views' projections [b, D] against the global batch (see the module
    docstring). ``ntxent`` is the reference, or the fused Triton kernel (``fastbyol.kernels.ntxent``) with its
    signature."""
    rank, world = distributed_world()
    q = torch.cat([h1, h2])
    k = q if world == 1 else torch.cat([gather_rows(h1), gather_rows(h2)])
    pos, own = pair_indices(h1.shape[0], rank, world, q.device)
    return 2 * ntxent(q, k, pos, own, temperature)
