"""LARS stepped by the Triton kernels (``fastbyol.kernels.lars``) over flat buffers, the target EMA fused in.

``FlatLARS`` is ``fastbyol.step.lars.LARS`` (same parameter groups, same per-parameter state dict, so
checkpoints move freely between the two) whose step is the flat kernels' three launches;
``optimizer_ema_step_fused`` is the loop's call when the run has a target.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from fastbyol.kernels.lars import build_layout, lars_ema_flat, lars_flat

from fastbyol.lr import set_lr
from fastbyol.step.lars import LARS


class FlatLARS(LARS):
    """The same LARS, stepped by the Triton kernels (``fastbyol.kernels.lars``) over flat buffers.

    Every parameter must already be a view into ``flat`` (``ByolPair.flatten_pairs_``). The gradients and
    momentum buffers become views into two more flat buffers laid out the same way, so one step is three
    launches whatever the number of tensors, and ``step_with_ema`` also moves the target in the same
    pass. Gradients are zeroed, not dropped (``zero_grad`` keeps the views: backward accumulates into
    them in place). The state dict is the per-parameter one of ``LARS``: checkpoints move freely between
    the two."""

    def __init__(self, params: Iterable[dict[str, object]], flat: torch.Tensor, lr: float = 0.0,
                 weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 1e-3) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta)
        self.flat = flat
        self.grad_flat = torch.zeros_like(flat)
        self.momentum_flat = torch.zeros_like(flat)
        self.lr_buf = torch.zeros(1, dtype=torch.float32, device=flat.device)
        base = flat.untyped_storage().data_ptr()
        segments: list[tuple[int, int, bool]] = []
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its momentum view)
        for group in self.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() != base:
                    raise ValueError("FlatLARS needs every parameter to be a view into the flat buffer")
                offset = p.storage_offset() - flat.storage_offset()
                segments.append((offset, p.numel(), bool(group["excluded"])))
                p.grad = torch.as_strided(self.grad_flat, p.shape, p.stride(), offset)
                self._views.append((p, torch.as_strided(self.momentum_flat, p.shape, p.stride(), offset)))
                self.state[p]["momentum_buffer"] = self._views[-1][1]
        if sum(n for _, n, _ in segments) != flat.numel():
            raise ValueError("FlatLARS needs the parameter groups to cover the flat buffer exactly")
        for key in ("weight_decay", "momentum", "eta"):
            if len({group[key] for group in self.param_groups}) != 1:
                raise ValueError(f"FlatLARS needs one {key} for all parameter groups")
        self.layout = build_layout(segments, flat.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """One memset of the gradient buffer; the per-parameter views stay."""
        self.grad_flat.zero_()

    def _hyper(self) -> tuple[float, float, float]:
        group = self.param_groups[0]
        self.lr_buf.fill_(group["lr"])  # an async write of a host float to the device: no sync
        return group["weight_decay"], group["momentum"], group["eta"]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        weight_decay, momentum, eta = self._hyper()
        lars_flat(self.flat, self.grad_flat, self.momentum_flat, self.layout, self.lr_buf, weight_decay,
                  momentum, eta)

    @torch.no_grad()
    def step_with_ema(self, target_flat: torch.Tensor, tau: torch.Tensor) -> None:
        """The LARS step, and the target EMA ``target <- tau * target + (1 - tau) * flat[:len(target)]``
        written from the same registers: optimizer + EMA read and write each byte once."""
        weight_decay, momentum, eta = self._hyper()
        lars_ema_flat(self.flat, self.grad_flat, self.momentum_flat, self.layout, self.lr_buf, weight_decay,
                      momentum, eta, target_flat, tau)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load per-parameter momentum (from either optimizer) into the flat buffer's views."""
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, view in self._views:
                loaded = self.state[p].get("momentum_buffer")
                if loaded is None:  # saved before the first step: momentum starts at zero
                    view.zero_()
                else:
                    view.copy_(loaded)
                self.state[p]["momentum_buffer"] = view


def optimizer_ema_step_fused(optimizer: FlatLARS, lr: float, target_flat: torch.Tensor, tau_buf: torch.Tensor
                             ) -> None:
    """LARS and the target EMA in one pass over memory (``FlatLARS.step_with_ema``), once per optimizer
    step, with tau already on the device (``tau_buf``); the lr reaches it as an async write, so there is no
    host sync."""
    set_lr(optimizer, lr)
    optimizer.step_with_ema(target_flat, tau_buf)
