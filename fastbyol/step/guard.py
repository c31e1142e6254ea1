"""Non-finite steps, caught on the device: no host sync per step.

Every optimizer step computes, on the device, whether the loss and every online gradient are finite
(one ``torch._foreach_norm`` over the gradients: a single pass over them), counts the steps that are not,
and keeps the first bad step's number, loss parts and per-tensor gradient norms. The trainer reads this
at the log cadence and before every checkpoint, both of which synchronise anyway.

Policy ``skip``: the optimizer and the EMA must leave the weights untouched on a bad step, without the
host knowing it is bad. Before the step, every tensor the step writes (online and target parameters,
LARS momentum, BatchNorm statistics, which the forward updates) is copied into a persistent snapshot;
after it, ``torch.where(ok, new, snapshot, out=new)`` puts the old values back where the step was bad. This
costs five passes over those tensors per step (snapshot: read, write; restore: read both, write one; with
the flat buffers of ``run.kernels`` a handful of large copies). Policy ``stop``: no snapshot; the run stops
at the next read with the diagnostic, and since no checkpoint is written after a bad step, the last one on
disk is good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class BadStep:
    """The first non-finite step of an interval, read on the host."""

    step: int
    count: int
    loss_parts: dict[str, float]
    largest_grads: list[tuple[str, float]]

    def describe(self, top: int = 3) -> str:
        parts = ", ".join(f"{k}={v:.6g}" for k, v in self.loss_parts.items())
        grads = ", ".join(f"{name} {norm:.3g}" for name, norm in self.largest_grads[:top])
        why = "not read (the gradients are not whole on this rank: DeepSpeed keeps them in its own buffers)"
        return f"step {self.step}: {parts}; largest gradient norms: {grads or why}"


class NonFiniteGuard:
    def __init__(self, grad_names: list[str], grads_of: list[torch.Tensor], device: torch.device,
                 protect: list[torch.Tensor] | None = None) -> None:
        """``grads_of``: the online parameters whose ``.grad`` is checked (named ``grad_names``);
        ``protect``: the tensors a bad step must not change (skip policy), None for stop."""
        self.names, self.params, self.device = grad_names, grads_of, device
        self.protect = protect
        self.saved = [t.detach().clone() for t in protect] if protect is not None else []
        self.step_dev = torch.zeros((), dtype=torch.long, device=device)
        self.bad_count = torch.zeros((), dtype=torch.long, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss: dict[str, torch.Tensor] = {}
        self.bad_norms = torch.zeros(len(grads_of), dtype=torch.float32, device=device)
        self.norms_read = False  # whether the parameters' .grad held every gradient (not under DeepSpeed)

    def set_step(self, step: int) -> None:
        """Once, when the loop starts (then ``advance`` keeps the device copy in step)."""
        self.step_dev.fill_(step)

    def snapshot(self) -> None:
        if self.protect is not None:
            torch._foreach_copy_(self.saved, [t.detach() for t in self.protect])

    def check(self, loss_parts: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The step's verdict as a device bool; records it (count, first bad step, its loss and norms)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = (torch.stack(torch._foreach_norm(grads)).float() if grads
                 else torch.zeros(0, dtype=torch.float32, device=self.device))
        ok = torch.isfinite(norms).all()
        for value in loss_parts.values():
            if value is not None:
                ok = ok & torch.isfinite(value).all()
        bad = ~ok
        first = bad & (self.bad_step < 0)
        self.bad_count += bad.long()
        self.bad_step.copy_(torch.where(first, self.step_dev + 1, self.bad_step))  # steps count from 1
        for name, value in loss_parts.items():
            if value is not None:
                held = self.bad_loss.setdefault(name, torch.zeros((), dtype=torch.float32, device=self.device))
                held.copy_(torch.where(first, value.detach().float(), held))
        if grads and len(grads) == len(self.params):
            self.norms_read = True
            self.bad_norms.copy_(torch.where(first, norms, self.bad_norms))
        return ok

    def restore_if_bad(self, ok: torch.Tensor) -> None:
        """Skip policy: put back what a bad step wrote (a no-op select where it was good)."""
        if self.protect is None:
            return
        for t, s in zip(self.protect, self.saved):
            # In place (out= the tensor itself: 3 passes over it, no temporary): 5.5x faster than
            # copy_(where(...)) on the CPU (benchmarks/NOTES.md, issue 8).
            torch.where(ok, t.detach(), s, out=t.detach())

    def advance(self) -> None:
        self.step_dev += 1

    def read(self) -> BadStep | None:
        """Host read (a sync: call it where the loop synchronises anyway). None when every step was finite;
        the record is then reset for the next interval."""
        count = int(self.bad_count)
        if count == 0:
            return None
        norms = self.bad_norms.tolist()
        # Non-finite norms first (the culprits), then the largest finite ones.
        order = sorted(range(len(norms)), key=lambda i: (math.isfinite(norms[i]), -norms[i] if math.isfinite(norms[i])
                                                         else 0.0))
        record = BadStep(int(self.bad_step), count, {k: float(v) for k, v in self.bad_loss.items()},
                         [(self.names[i], norms[i]) for i in order] if self.norms_read else [])
        self.bad_count.zero_()
        self.bad_step.fill_(-1)
        return record
