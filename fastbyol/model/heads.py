"""Projector and predictor: Linear(in, hidden, bias) -> BatchNorm1d -> ReLU -> Linear(hidden, out, no bias).

Exactly the official ``MLP`` (``utils/networks.py``). Linear layers use Haiku's default init
(truncated normal, std 1/sqrt(fan_in), zero bias) rather than PyTorch's uniform one.

``SimclrProjector`` is SimCLR's head (the official ``simclr`` code's ``projection_head``, two layers):
Linear(in, hidden, no bias) -> BatchNorm1d -> ReLU -> Linear(hidden, out, no bias) -> BatchNorm1d with a
scale and no shift (``center=False``). A Linear feeding a BatchNorm drops its bias there, as here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def haiku_linear_init_(linear: nn.Linear) -> None:
    """Haiku's ``Linear`` default: ``TruncatedNormal(1 / sqrt(fan_in))`` (std 0.8796 / sqrt(fan_in)), zero bias."""
    std = 1.0 / math.sqrt(linear.in_features)
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def probe_head(features: int, classes: int, init: str) -> nn.Linear | None:
    """The online linear probe on stop_gradient(embedding) (None without classes); with the paper's ``init``
    ('haiku') it starts as the official one does: Haiku's default Linear."""
    if not classes:
        return None
    probe = nn.Linear(features, classes)
    if init == "haiku":
        haiku_linear_init_(probe)
    return probe


class HaikuSequential(nn.Sequential):
    """A stack of layers whose Linears take Haiku's init (in order, after construction): both heads."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                haiku_linear_init_(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = super().forward(x)
        return out


class MLP(HaikuSequential):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=True),
            nn.BatchNorm1d(hidden_dim, eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )


class BatchNormScale(nn.Module):
    """The learnable per-feature scale (gamma) of a BatchNorm without a shift: the official SimCLR head's
    last ``batch_norm(center=False)`` is BatchNorm1d(affine=False) followed by this. LARS excludes it from
    weight decay and the trust ratio like every BatchNorm parameter (``lars_param_groups``)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class SimclrProjector(HaikuSequential):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim, eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
            nn.BatchNorm1d(out_dim, eps=bn_eps, momentum=bn_momentum, affine=False),
            BatchNormScale(out_dim),
        )


def directpred_weight(corr: torch.Tensor, eps: float) -> torch.Tensor:
    """DirectPred's predictor from the correlation F of the online projections (Tian, Chen and Ganguli 2021,
    Eq. 18): with F = U diag(s) U^T, W = U diag(p) U^T, p = sqrt(max(s, 0) / max(s)) + eps, at least 1e-4."""
    s, u = torch.linalg.eigh(corr.float())
    p = ((s.clamp(min=0) / s.max().clamp(min=1e-30)).sqrt() + eps).clamp(min=1e-4)
    return (u * p) @ u.T


class DirectPredictor(nn.Module):
    """BYOL's predictor set, not trained: a linear map (no bias) whose weight is ``directpred_weight`` of a
    running correlation of the online projections, updated after each training forward from both views
    (F = rho F + (1 - rho) mean(z z^T), the first batch's alone). It starts as the identity. Its state is two
    buffers, so checkpoints and resume carry it; it has no parameters for the optimizer."""

    weight: torch.Tensor
    corr: torch.Tensor
    updates: torch.Tensor

    def __init__(self, dim: int, rho: float, eps: float) -> None:
        super().__init__()
        self.rho, self.eps = rho, eps
        self.register_buffer("weight", torch.eye(dim))
        self.register_buffer("corr", torch.zeros(dim, dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # A copy: backward needs this step's weight, which ``update_`` overwrites after the forward.
        return nn.functional.linear(z, self.weight.to(z.dtype, copy=True))

    @torch.no_grad()
    def update_(self, z1: torch.Tensor, z2: torch.Tensor) -> None:
        """Fold this step's projections (both views, detached) into the correlation and set the weight from it;
        device work only (no host sync)."""
        z = torch.cat([z1, z2]).float()
        batch = z.T @ z / z.shape[0]
        self.corr.copy_(torch.where(self.updates > 0, self.rho * self.corr + (1 - self.rho) * batch, batch))
        self.updates.add_(1)
        self.weight.copy_(directpred_weight(self.corr, self.eps))
