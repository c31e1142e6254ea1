"""The seam between a pretraining method's network and the engine: ``Network``, the nn.Module every method's
network subclasses (BYOL's online/target pair, SimCLR's single network, a user's or a test's own), and
``Outputs``, what the step reads of any method's forward. The method (``fastbyol.step.methods``) builds the
network and owns the loss on its outputs; the engine asks the network only what is here."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fastbyol.model.backbone import Encoder
from fastbyol.model.flat import flatten_params_


class Outputs(Protocol):
    """What the step reads of every method's outputs (a NamedTuple with these fields, and the method's own)."""

    @property
    def online_proj1(self) -> torch.Tensor:
        """The online projection of view 1, detached: the collapse monitor reads its per-dimension spread."""
        ...

    @property
    def probe_logits(self) -> torch.Tensor | None:
        """The online linear probe on the stop-gradient features of view 1 (None when off)."""
        ...


class Network(nn.Module):
    """A method's network: ``forward(view1, view2)`` returns its ``Outputs``; the optimizer updates
    ``online_modules``; the target update moves ``param_pairs`` (none by default: no target)."""

    @property
    def encoder(self) -> Encoder:
        """The encoder the run evaluates and exports (BYOL's online one)."""
        raise NotImplementedError

    def online_modules(self) -> list[nn.Module]:
        """Everything the optimizer updates (a probe too, when on)."""
        raise NotImplementedError

    def param_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(online, target) parameters in the same order, what the EMA reads and writes; ([], []) without a
        target."""
        return [], []

    def online_parameters(self) -> list[torch.Tensor]:
        """Every parameter of ``online_modules``, in module order (what the optimizer and the guard see)."""
        return [p for module in self.online_modules() for p in module.parameters()]

    def flatten_pairs_(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Move the parameters into flat buffers for the fused kernels: (online_flat, target_flat or None).
        Without a target, every parameter goes into one buffer. Call after ``.to(...)``."""
        return flatten_params_(self.online_parameters()), None
