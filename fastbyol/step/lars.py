"""LARS as BYOL uses it (BYOL.md, "Optimiser"; official ``utils/optimizers.py``).

For each parameter tensor p with gradient g, per step:
    u = g + wd * p
    r = eta * ||p|| / ||u||   (r = 1 if either norm is 0)
    u = r * u
    m = momentum * m + u      (no Nesterov, no dampening; m starts at 0)
    p = p - lr * m
Biases and all BatchNorm parameters are excluded from both weight decay and the trust ratio: they get
plain momentum SGD. ``lars_ref`` is the per-tensor formula; ``LARS`` applies it to every tensor of a
group with multi-tensor ops and no host synchronisation (no ``.item()``, no Python branch on a norm).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastbyol.model.heads import BatchNormScale


def lars_ref(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float,
             weight_decay: float, momentum: float, eta: float, excluded: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure: (new param, new momentum buffer) for one tensor."""
    if excluded:
        update = grad
    else:
        update = grad + weight_decay * param
        p_norm, u_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
        trust = torch.where((p_norm > 0) & (u_norm > 0), eta * p_norm / u_norm, torch.ones_like(p_norm))
        update = trust * update
    new_buf = momentum * momentum_buf + update
    return param - lr * new_buf, new_buf


def lars_param_groups(named_modules: Iterable[tuple[str, nn.Module]]) -> list[dict[str, object]]:
    """Two groups: {'excluded': False} (conv/linear weights: decay + trust ratio) and
    {'excluded': True} (biases and every BatchNorm parameter), like the official ``exclude_bias_and_norm``."""
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, module in named_modules:
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            norm = isinstance(module, (_BatchNorm, BatchNormScale))
            (excluded if norm or pname == "bias" else adapted).append(p)
    return [{"params": adapted, "excluded": False}, {"params": excluded, "excluded": True}]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with BYOL's exclusions. Set ``group['lr']`` each step."""

    def __init__(self, params: Iterable[dict[str, object]], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 1e-3) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, excluded=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            if group["excluded"]:
                updates = grads
            else:
                updates = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
                p_norms = torch.stack(torch._foreach_norm(params))
                u_norms = torch.stack(torch._foreach_norm(updates))
                # Device-side choice, no host sync: r = 1 where a norm is zero.
                trust = torch.where((p_norms > 0) & (u_norms > 0), group["eta"] * p_norms / u_norms,
                                    torch.ones_like(p_norms))
                torch._foreach_mul_(updates, list(trust.to(updates[0].dtype).unbind(0)))
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
