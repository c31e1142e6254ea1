"""The online/target pair (BYOL.md, "Networks").

online: encoder f -> projector g -> predictor q.   target: encoder f' -> projector g' (same shapes).
The target runs its forward in training mode (batch statistics) under no_grad; only its parameters are
EMA'd, its BatchNorm running statistics update from its own forward passes. The list of (online,
target) parameter pairs is built once here; the EMA, checkpoints and tests iterate that same list.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from fastbyol.config import ModelConfig
from fastbyol.model.backbone import Encoder
from fastbyol.model.flat import flatten_params_
from fastbyol.model.heads import MLP, DirectPredictor, probe_head
from fastbyol.model.network import Network


class ByolOutputs(NamedTuple):
    """Per view v: the online prediction ``p`` and the target projection ``z`` (no grad)."""

    p1: torch.Tensor
    p2: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor
    online_proj1: torch.Tensor
    """Online projection of view 1, detached: the collapse monitor reads its per-dimension spread."""
    probe_logits: torch.Tensor | None
    """Online linear probe on the stop-gradient encoder features of view 1 (None when off)."""


class Tower(nn.Module):
    """Encoder + projector: the shape both networks share (BYOL's MLP projector, or SimCLR's head when
    ``projector`` builds one from the encoder's width)."""

    def __init__(self, cfg: ModelConfig, projector: Callable[[int], nn.Module] | None = None,
                 encoder: Encoder | None = None) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else Encoder.from_config(cfg)
        self.projector = (projector(self.encoder.feature_dim) if projector is not None else
                          MLP(self.encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim, cfg.bn_momentum, cfg.bn_eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.projector(self.encoder(x))
        return out


class ByolPair(Network):
    """Online tower + predictor, and the target tower. ``forward`` returns both views' outputs.

    ``net``: the user's encoder module (``model.arch=custom:...``) for the online tower, trained in place; the
    target's encoder is a deep copy of it (``model.target_init=copy`` then makes the whole target a copy)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, probe_classes: int = 0, net: nn.Module | None = None
                 ) -> None:
        super().__init__()
        encoder = Encoder.around(net, cfg) if net is not None else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.online = Tower(cfg, encoder=encoder)
            self.predictor: nn.Module = (
                DirectPredictor(cfg.proj_dim, cfg.directpred_rho, cfg.directpred_eps) if cfg.predictor == "directpred"
                else MLP(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim, cfg.bn_momentum, cfg.bn_eps))
            # The official code initialises the target from its own random key, not as a copy.
            torch.manual_seed(seed + 1_000_003)
            self.target = Tower(cfg, encoder=copy.deepcopy(encoder))
            # The official code's online classifier: a linear layer on stop_gradient(embedding).
            self.probe = probe_head(self.online.encoder.feature_dim, probe_classes, cfg.init)
        if cfg.target_init == "copy":
            self.target.load_state_dict(self.online.state_dict())
        for p in self.target.parameters():
            p.requires_grad_(False)
        online = dict(self.online.named_parameters())
        self.pair_names: list[str] = [name for name, _ in self.target.named_parameters()]
        missing = [n for n in self.pair_names if n not in online]
        if missing:
            raise RuntimeError(f"target parameters without an online twin: {missing[:3]}")

    @property
    def encoder(self) -> Encoder:
        """The online encoder: what is evaluated and exported."""
        return self.online.encoder

    def param_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(online, target) parameters in the same order: what the EMA reads and writes."""
        online = dict(self.online.named_parameters())
        target = dict(self.target.named_parameters())
        return [online[n] for n in self.pair_names], [target[n] for n in self.pair_names]

    def flatten_pairs_(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Move every online parameter into one flat buffer and the target's into another, so the
        optimizer and the EMA are each a few passes over memory; returns (online_flat, target_flat).

        The online buffer starts with the paired online-tower parameters, laid out exactly as the target
        buffer, so ``online_flat[:target_flat.numel()]`` and ``target_flat`` are elementwise twins; the
        unpaired online parameters (predictor, probe) follow. Call after ``.to(...)``."""
        online, target = self.param_pairs()
        return flatten_params_(self.online_flat_order()), flatten_params_(target)

    def online_flat_order(self) -> list[torch.Tensor]:
        """Every online parameter in the flat buffer's order: the paired online-tower parameters
        (``param_pairs`` order), then the unpaired ones (predictor, probe)."""
        online, _ = self.param_pairs()
        paired = {id(p) for p in online}
        unpaired: list[torch.Tensor] = [p for module in self.online_modules() for p in module.parameters()
                                        if id(p) not in paired]
        if len(paired) + len(unpaired) != sum(1 for m in self.online_modules() for _ in m.parameters()):
            raise RuntimeError("online parameters are shared between modules: they cannot be flattened")
        return online + unpaired

    def online_modules(self) -> list[nn.Module]:
        """Everything the optimizer updates: online tower, predictor and (when on) the probe."""
        return [self.online, self.predictor] + ([self.probe] if self.probe is not None else [])

    def train(self, mode: bool = True) -> ByolPair:
        super().train(mode)
        # BYOL's target always normalises with batch statistics, as the official code's is_training.
        self.target.train(True)
        return self

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> ByolOutputs:
        p1, p2, proj1, logits = online_outputs(self.online, self.predictor, self.probe, view1, view2)
        with torch.no_grad():
            z1 = self.target(view1)
            z2 = self.target(view2)
        return ByolOutputs(p1, p2, z1, z2, proj1, logits)


def online_outputs(online: Tower, predictor: nn.Module, probe: nn.Module | None, view1: torch.Tensor,
                   view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The online half of the pair's forward: (p1, p2, detached projection of view 1, probe logits).
    One forward per view, as the official code does: BatchNorm statistics are per view."""
    feat1 = online.encoder(view1)
    proj1 = online.projector(feat1)
    proj2 = online(view2)
    p1, p2 = predictor(proj1), predictor(proj2)
    if isinstance(predictor, DirectPredictor) and predictor.training:  # set from this step's projections
        predictor.update_(proj1.detach(), proj2.detach())
    logits = probe(feat1.detach()) if probe is not None else None
    return p1, p2, proj1.detach(), logits
