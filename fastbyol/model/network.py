"""The network a run trains: BYOL's online/target pair, or SimCLR's single network (built by the method,
``fastbyol.step.methods``)."""

from __future__ import annotations

from fastbyol.model.byol import ByolPair
from fastbyol.model.simclr import SimclrNet

Network = ByolPair | SimclrNet

