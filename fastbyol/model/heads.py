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
