"""The fused losses as one ``Losses`` (``fastbyol.step.train_step``): what a run with ``run.kernels`` on
hands to the step in place of the PyTorch references."""

from __future__ import annotations

from fastbyol.kernels.byol_loss import byol_loss
from fastbyol.kernels.ntxent import ntxent

from fastbyol.step.train_step import Losses

FUSED_LOSSES = Losses(byol_loss, ntxent)
