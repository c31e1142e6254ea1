"""The network a run trains, by ``method``: BYOL's online/target pair, or SimCLR's single network."""

from __future__ import annotations

from fastbyol.config import Config
from fastbyol.model.byol import ByolPair
from fastbyol.model.simclr import SimclrNet

Network = ByolPair | SimclrNet


def build_network(cfg: Config, seed: int, probe_classes: int = 0) -> Network:
    if cfg.method == "simclr":
        return SimclrNet(cfg.model, cfg.simclr, seed=seed, probe_classes=probe_classes)
    return ByolPair(cfg.model, seed=seed, probe_classes=probe_classes)
