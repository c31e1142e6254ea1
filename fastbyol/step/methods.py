"""The pretraining methods, one object each behind ``Method``: what differs between BYOL and SimCLR in the
Trainer (the network, the metrics row, the compiled region) is here, chosen once when the run is built
(``METHODS[cfg.method]``), so the Trainer never asks which method runs. The loss follows the network's
outputs (``step.train_step.loss_from_outputs``); the target follows the network (the update strategies move
the target parameters the pair has, none for SimCLR).

- ``Byol``: an online network and a target moved by the EMA; the log shows the step's tau; the forward and
  the loss compile as one graph.
- ``Simclr``: one network, no target; NT-Xent's negatives are gathered from every rank inside the loss (an
  autograd function around ``all_gather`` that dynamo cannot put in a full graph), so with several ranks only
  the network is compiled.
"""

from __future__ import annotations

from typing import Protocol

from fastbyol.config import Config
from fastbyol.model.byol import ByolPair
from fastbyol.model.network import Network
from fastbyol.model.simclr import SimclrNet


class Method(Protocol):
    name: str
    """``cfg.method``'s value."""

    def network(self, cfg: Config, seed: int, probe_classes: int = 0) -> Network:
        """The network the run trains, initialised from ``seed``."""
        ...

    def row_fields(self, tau: float) -> dict[str, float]:
        """The method's own fields of a metrics row for a step run at ``tau``."""
        ...

    def compiles_with_loss(self, world: int) -> bool:
        """Whether ``torch.compile`` takes the forward and the loss as one graph with ``world`` ranks."""
        ...


class Byol:
    name = "byol"

    def network(self, cfg: Config, seed: int, probe_classes: int = 0) -> Network:
        return ByolPair(cfg.model, seed=seed, probe_classes=probe_classes)

    def row_fields(self, tau: float) -> dict[str, float]:
        return {"tau": tau}

    def compiles_with_loss(self, world: int) -> bool:
        return True


class Simclr:
    name = "simclr"

    def network(self, cfg: Config, seed: int, probe_classes: int = 0) -> Network:
        return SimclrNet(cfg.model, cfg.simclr, seed=seed, probe_classes=probe_classes)

    def row_fields(self, tau: float) -> dict[str, float]:
        return {}  # no target, no tau

    def compiles_with_loss(self, world: int) -> bool:
        return world == 1


METHODS: dict[str, Method] = {"byol": Byol(), "simclr": Simclr()}
