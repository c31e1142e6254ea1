"""The learning rate's two shared pieces: the half cosine every decay uses (training's lr and tau, the linear
probe, fine-tuning) and the one loop that writes a step's lr into an optimizer's groups."""

from __future__ import annotations

import math

import torch


def half_cosine(k: float, total: float) -> float:
    """``(1 + cos(pi k / K)) / 2``: 1 at k = 0, 0 at k = K and after (k is clipped to K)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write this step's lr (a host float) into every group, times the group's ``lr_mult`` if it has one
    (``byol.predictor_lr_mult``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
