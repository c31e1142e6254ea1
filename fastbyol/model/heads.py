"""Projector and predictor: Linear(in, hidden, bias) -> BatchNorm1d -> ReLU -> Linear(hidden, out, no bias).

Exactly the official ``MLP`` (``utils/networks.py``). Linear layers use Haiku's default init
(truncated normal, std 1/sqrt(fan_in), zero bias) rather than PyTorch's uniform one.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def haiku_linear_init_(linear: nn.Linear) -> None:
    std = 1.0 / math.sqrt(linear.in_features)
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=True),
            nn.BatchNorm1d(hidden_dim, eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                haiku_linear_init_(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = super().forward(x)
        return out
