"""SimCLR's network (Chen et al. 2020, arXiv 2002.05709; the official ``simclr`` code): one encoder and
its projection head, no target, no predictor. Both views go through it as ONE batch of 2B images, as the
official code concatenates them (``tf.concat(features_list, 0)``), so BatchNorm statistics span both views
(and, with several ranks, the global batch: the cross-replica BatchNorm).

It offers the ByolPair interface the trainer uses (``online``, ``online_modules``, ``param_pairs``,
``flatten_pairs_``), with no pairs: the EMA has nothing to do. The encoder sits at ``online.encoder`` as in
ByolPair, so export and evaluation read a SimCLR checkpoint exactly as a BYOL one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastbyol.config import ModelConfig, SimclrConfig
from fastbyol.model.backbone import Encoder
from fastbyol.model.byol import Tower
from fastbyol.model.heads import SimclrProjector, probe_head
from fastbyol.model.network import Network


class SimclrOutputs(NamedTuple):
    h1: torch.Tensor
    """Projection of view 1 [B, proj_dim] (NT-Xent normalises it)."""
    h2: torch.Tensor
    online_proj1: torch.Tensor
    """h1 detached: the collapse monitor reads its per-dimension spread."""
    probe_logits: torch.Tensor | None
    """Linear probe on the stop-gradient encoder features of view 1 (None when off)."""


class SimclrNet(Network):
    """One network, no target (``Network``'s defaults: no parameter pairs, one flat buffer)."""

    def __init__(self, cfg: ModelConfig, head: SimclrConfig, seed: int = 0, probe_classes: int = 0,
                 net: nn.Module | None = None) -> None:
        super().__init__()
        encoder = Encoder.around(net, cfg) if net is not None else None  # the user's encoder (ByolPair's net)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.online = Tower(cfg, lambda width: SimclrProjector(width, head.proj_hidden, head.proj_dim,
                                                                   cfg.bn_momentum, cfg.bn_eps), encoder)
            self.probe = probe_head(self.online.encoder.feature_dim, probe_classes, cfg.init)

    @property
    def encoder(self) -> Encoder:
        """The online encoder: what is evaluated and exported."""
        return self.online.encoder

    def online_modules(self) -> list[nn.Module]:
        """Everything the optimizer updates: the network and (when on) the probe."""
        return [self.online] + ([self.probe] if self.probe is not None else [])

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> SimclrOutputs:
        b = view1.shape[0]
        feats = self.online.encoder(torch.cat([view1, view2]))
        h = self.online.projector(feats)
        logits = self.probe(feats[:b].detach()) if self.probe is not None else None
        return SimclrOutputs(h[:b], h[b:], h[:b].detach(), logits)
