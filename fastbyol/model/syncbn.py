"""Cross-replica BatchNorm (BYOL.md, "Networks": the official code normalises with statistics over the
whole global batch, ``cross_replica_axis``), on any device and any process-group backend.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so CI (gloo on the CPU) could not test the multi-rank
path with it. This one all-reduces per-channel sums (count, sum x; then sum (x - mean)^2, the two-pass
variance, as stable as a single-process BatchNorm's) in training mode, and in backward the two sums
every rank's input gradient needs (sum dy, sum dy * x_hat), exactly as SyncBatchNorm does: 2 + 1
all-reduces of C floats per layer. The affine parameters' gradients stay local, for data-parallel
averaging. In eval mode, or with one process, it is ``F.batch_norm``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastbyol.errors import FastByolError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, eps: float, momentum: float) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        stats = torch.cat([xf.sum(dims), torch.tensor([x.numel() / x.shape[1]], device=x.device)])
        dist.all_reduce(stats)
        count = stats[-1]
        mean = stats[:-1] / count
        centred = xf - mean.view(shape)
        sq = centred.square().sum(dims)
        dist.all_reduce(sq)
        var = sq / count
        invstd = torch.rsqrt(var + eps)
        with torch.no_grad():  # unbiased variance in the running estimate, as nn.BatchNorm
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * count / (count - 1).clamp(min=1)).to(running_var.dtype), momentum)
        x_hat = centred * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        return (x_hat * weight.view(shape) + bias.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_hat, weight, invstd, count = ctx.saved_tensors
        dims = [0, *range(2, dy.dim())]
        shape = [1, -1] + [1] * (dy.dim() - 2)
        dyf = dy.float()
        local = torch.stack([dyf.sum(dims), (dyf * x_hat).sum(dims)])  # [2, C]: also the affine grads
        grad_bias, grad_weight = local[0].clone(), local[1].clone()
        dist.all_reduce(local)
        mean_dy, mean_dy_xhat = local[0] / count, local[1] / count
        dx = (weight * invstd).view(shape) * (dyf - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape))
        return dx.to(dy.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None, None, None


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of every rank of the default process group (any backend)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects [N, C, ...] input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        if not (self.track_running_stats and self.momentum is not None):
            raise ValueError("GlobalBatchNorm needs track_running_stats=True and a momentum")
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        weight, bias = self.weight, self.bias
        if weight is None or bias is None:  # affine=False (SimCLR's last head layer): scale 1, shift 0
            weight = torch.ones(self.num_features, device=x.device, dtype=self.running_mean.dtype)
            bias = torch.zeros_like(weight)
        out: torch.Tensor = _GlobalBatchNorm.apply(x, weight, bias, self.running_mean, self.running_var,
                                                   self.eps, self.momentum)
        return out


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm in ``module`` replaced by a GlobalBatchNorm holding the same parameters and
    buffers (the tensors themselves, so flat-buffer views and optimizers stay valid). Returns module."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, GlobalBatchNorm):
            if type(child).forward is not _BatchNorm.forward:
                raise FastByolError(f"{type(child).__name__} ({name}) is a BatchNorm with its own forward (e.g. a "
                                    "fused activation), which cross-replica BatchNorm cannot replace: train this "
                                    "model on one rank, or pick one with plain BatchNorm or LayerNorm")
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_global_batchnorm(child)
    return module
