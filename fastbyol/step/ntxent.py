"""SimCLR's NT-Xent contrastive loss (Chen et al. 2020, eq. 1; official ``simclr/objective.py``,
``add_contrastive_loss``), in the general index form the fused kernel (``fastbyol.kernels.ntxent``) implements.

Anchors ``q`` [M, D], keys ``k`` [N, D] (every candidate), for each anchor row i the column ``pos_index[i]`` of
its positive and the column ``self_index[i]`` that is row i itself, excluded from the denominator:

    qh = l2_normalize(q), kh = l2_normalize(k)                   x * rsqrt(max(sum x^2, 1e-12)), fp32
    s_ij   = qh_i . kh_j / T
    loss_i = logsumexp_{j != self_i} s_ij - s_{i, pos_i}
    L      = mean_i loss_i                                        scalar fp32

One process, two views z1, z2 [B, D]: q = k = cat(z1, z2), ``pair_indices(B, 0, 1)``; L is then the paper's
(1/2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)] with N = B. The official code splits the 2B rows into loss_a (z1
anchors against [z2, z1 - LARGE_NUM * I]) and loss_b (z2 anchors), each a mean over B rows, and returns
loss_a + loss_b; L here is the mean over all 2B rows, so L = (loss_a + loss_b) / 2. With W ranks, q is a rank's
own 2b rows and k the all-gathered 2bW rows (gathered with gradient), as the official code's
``tpu_cross_replica_concat``; ``pair_indices(b, rank, W)`` points at the global columns.
"""

from __future__ import annotations

import math

import torch

from fastbyol.step.loss import l2_normalize


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> None:
    """Shapes, dtypes and temperature, one ValueError line each. Index values are not read (a host sync):
    they must lie in [0, N), and pos_index[i] != self_index[i]."""
    if q.dim() != 2 or k.dim() != 2:
        raise ValueError(f"nt_xent expects q [M, D] and k [N, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"nt_xent: q and k must share D, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[0] < 1 or q.shape[1] < 1 or k.shape[0] < 2:
        raise ValueError(f"nt_xent needs M >= 1, D >= 1 and N >= 2, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if not q.is_floating_point() or q.dtype != k.dtype:
        raise ValueError(f"nt_xent needs q and k of one floating dtype, got {q.dtype} and {k.dtype}")
    for name, index in (("pos_index", pos_index), ("self_index", self_index)):
        if index.shape != (q.shape[0],) or index.dtype != torch.int64:
            raise ValueError(
                f"nt_xent: {name} must be int64 [M] = [{q.shape[0]}], got {index.dtype} {tuple(index.shape)}"
            )
    if len({t.device for t in (q, k, pos_index, self_index)}) != 1:
        raise ValueError(
            f"nt_xent: inputs on several devices: {[str(t.device) for t in (q, k, pos_index, self_index)]}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"nt_xent needs a finite temperature > 0, got {temperature}")


def nt_xent(
    q: torch.Tensor, k: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """NT-Xent over anchors q against keys k (see the module docstring): scalar fp32, gradients into q and k.

    The [M, N] logits are materialised in fp32 (the fused kernel never does). The matmul follows torch's fp32
    matmul precision (TF32 only if ``torch.backends.cuda.matmul.allow_tf32`` was turned on).
    """
    check_inputs(q, k, pos_index, self_index, temperature)
    qh, kh = l2_normalize(q.float()), l2_normalize(k.float())
    logits = qh @ kh.T / temperature
    # The self column leaves the denominator (the official code subtracts LARGE_NUM = 1e9; -inf is exact).
    masked = logits.scatter(1, self_index[:, None], float("-inf"))
    positive = logits.gather(1, pos_index[:, None]).squeeze(1)
    return (torch.logsumexp(masked, dim=1) - positive).mean()


def pair_indices(
    b_local: int, rank: int, world: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_index, self_index), int64 [2 b_local], for one rank's q = cat(z1_local, z2_local) against
    k = cat(gather(z1), gather(z2)), the gathers concatenating the ranks' [b_local, D] rows in rank order.

    Local row i < b (view 1) is global z1 row rank*b + i, column rank*b + i of k; its positive is the same
    image's view 2, column W*b + rank*b + i. Rows b + i (view 2) mirror it. As the official code's
    ``labels = one_hot(range(b) + replica_id * b)`` and ``masks`` per replica. world = 1 gives
    self = arange(2B), pos = (arange(2B) + B) % 2B.
    """
    if b_local < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"pair_indices needs b_local >= 1 and 0 <= rank < world, got {b_local}, {rank}, {world}")
    own = torch.arange(b_local, dtype=torch.int64, device=device) + rank * b_local  # this rank's columns in gather(z)
    view1, view2 = own, own + world * b_local
    return torch.cat([view2, view1]), torch.cat([view1, view2])
