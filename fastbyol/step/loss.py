"""BYOL's regression loss (BYOL.md, "Loss"; official ``byol_experiment.py`` / ``helpers.py``).

    l(p, z) = || p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)       per sample
    L = mean_batch [ l(q(v1), z'(v2)) + l(q(v2), z'(v1)) ]     the two directions SUMMED

The normalisation is the official ``l2_normalize``: x * rsqrt(max(sum(x^2), 1e-12)). Computed in fp32
whatever the input dtype. This is the plain-PyTorch reference the fused kernel must match.
"""

from __future__ import annotations

import torch

L2_EPS = 1e-12


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=eps))


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|| p/|p| - z/|z| ||^2`` for [B, D] inputs, in fp32. Returns [B]."""
    p, z = l2_normalize(p.float()), l2_normalize(z.float())
    return ((p - z) ** 2).sum(dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss: view 1's prediction against view 2's target projection, plus the
    reverse, summed and averaged over the batch. Gradients flow into p only (z is the target's)."""
    return (regression_loss(p1, z2.detach()) + regression_loss(p2, z1.detach())).mean()


def projection_std(proj: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std over the batch of l2-normalised projections: the collapse monitor.

    A collapsed representation (every image mapped to one vector) gives 0; D-dimensional directions
    spread uniformly over the sphere give 1/sqrt(D) (the SimSiam paper's yardstick).
    """
    return l2_normalize(proj.float()).std(dim=0).mean()
