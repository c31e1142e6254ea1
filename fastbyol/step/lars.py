"""LARS as BYOL uses it (BYOL.md, "Optimiser"; official ``utils/optimizers.py``).

For each parameter tensor p with gradient g, per step:
    u = g + wd * p
    r = eta * ||p|| / ||u||   (r = 1 if either norm is 0)
    u = r * u
    m = momentum * m + u      (no Nesterov, no dampening; m starts at 0)
    p = p - lr * m
Biases and all BatchNorm parameters are excluded from both weight decay and the trust ratio: they get
plain momentum SGD. The formula is written once, in three pieces (``weight_decayed``, ``trust_ratio``,
``momentum_step_``): ``lars_ref`` applies them to one tensor, ``LARS`` to every tensor of a group with
multi-tensor ops and no host synchronisation (no ``.item()``, no Python branch on a norm), ``ZeroLARS`` to
the pieces of a ZeRO partition, and ``fastbyol.kernels.lars.lars_flat_ref`` to the slices of a flat buffer.
The Triton kernels hold the same expressions in their own language (``_decayed``, ``_trust``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastbyol.model.heads import BatchNormScale


def weight_decayed(grads: list[torch.Tensor], params: list[torch.Tensor], weight_decay: float) -> list[torch.Tensor]:
    """u = g + wd * p for every tensor of a list (new tensors)."""
    return list(torch._foreach_add(grads, params, alpha=weight_decay))


def trust_ratio(p_norm: torch.Tensor, u_norm: torch.Tensor, eta: float) -> torch.Tensor:
    """r = eta * ||p|| / ||u||, or 1 where either norm is 0: a device-side choice, no host sync. The division
    never sees a zero norm, so no inf or NaN is made even where it is masked out."""
    ok = (p_norm > 0) & (u_norm > 0)
    return torch.where(ok, eta * p_norm / torch.where(ok, u_norm, 1.0), 1.0)


def momentum_step_(params: list[torch.Tensor], bufs: list[torch.Tensor], updates: list[torch.Tensor],
                   momentum: float, lr: float) -> None:
    """In place over tensor lists: m = momentum * m + u, then p = p - lr * m."""
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, updates)
    torch._foreach_add_(params, bufs, alpha=-lr)


def lars_ref(param: torch.Tensor, grad: torch.Tensor, momentum_buf: torch.Tensor, *, lr: float,
             weight_decay: float, momentum: float, eta: float, excluded: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure: (new param, new momentum buffer) for one tensor, from the same three pieces ``LARS.step``,
    ``ZeroLARS`` and the flat references use."""
    update = grad
    if not excluded:
        (update,) = weight_decayed([grad], [param], weight_decay)
        update = trust_ratio(torch.linalg.vector_norm(param), torch.linalg.vector_norm(update), eta) * update
    new_param, new_buf = param.clone(), momentum_buf.clone()
    momentum_step_([new_param], [new_buf], [update], momentum, lr)
    return new_param, new_buf


def lars_param_groups(named_modules: Iterable[tuple[str, nn.Module]]) -> list[dict[str, object]]:
    """Two groups: {'excluded': False} (conv/linear weights: decay + trust ratio) and
    {'excluded': True} (biases and every BatchNorm parameter, like the official ``exclude_bias_and_norm``;
    for any backbone also every other normalisation's and 1-d parameter, and what a module names in its
    ``no_weight_decay()``, as timm's ViTs do their position embedding and class token)."""
    modules = list(named_modules)
    no_decay = {id(p) for _, module in modules for p in _no_weight_decay(module)}
    adapted: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, module in modules:
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            norm = isinstance(module, (_BatchNorm, BatchNormScale, nn.LayerNorm, nn.GroupNorm))
            skip = norm or pname == "bias" or p.ndim <= 1 or id(p) in no_decay
            (excluded if skip else adapted).append(p)
    return [{"params": adapted, "excluded": False}, {"params": excluded, "excluded": True}]


def _no_weight_decay(module: nn.Module) -> list[nn.Parameter]:
    """The parameters ``module.no_weight_decay()`` names (timm's convention: names relative to the module)."""
    names = getattr(module, "no_weight_decay", None)
    if not callable(names):
        return []
    params = dict(module.named_parameters())
    return [params[n] for n in names() if n in params]


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
                updates = weight_decayed(grads, params, group["weight_decay"])
                trust = trust_ratio(torch.stack(torch._foreach_norm(params)),
                                    torch.stack(torch._foreach_norm(updates)), group["eta"])
                torch._foreach_mul_(updates, list(trust.to(updates[0].dtype).unbind(0)))
            momentum_step_(params, bufs, updates, group["momentum"], group["lr"])
