"""The model FLOPs of one training image, counted once per run on the real architecture.

The pair is built on the ``meta`` device (no memory, no compute, the global RNG untouched) and one
forward of both views through online and target, the loss and the backward run under
``torch.utils.flop_counter.FlopCounterMode``: convolutions and matmuls, as MFU counts them. An "image" is
one pair of views, as img/s counts it.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastbyol.config import Config
from fastbyol.step.methods import build_method
from fastbyol.step.train_step import forward_loss


def gflop_per_image(cfg: Config, image_size: int, probe_classes: int = 0, encoder: nn.Module | None = None
                    ) -> float | None:
    """Forward + backward GFLOP per image (two views) of the run's step: BYOL's with the target forward
    included, or SimCLR's (one network, no target; the NT-Xent matmuls grow with the batch and are
    counted at this batch of 2, so they are left out, as MFU conventions leave out attention's).

    ``encoder``: the user's module of a ``model.arch=custom:...`` run, counted on a ``meta`` copy; None (MFU
    left out, said in one line) where the meta device cannot run it (a forward that reads tensor values)."""
    if encoder is None:
        return _gflop(cfg, image_size, probe_classes, None)
    try:
        return _gflop(cfg, image_size, probe_classes, copy.deepcopy(encoder).to("meta"))
    except Exception as e:  # the user's code, on tensors without values
        print(f"fastbyol: FLOPs of {type(encoder).__qualname__} not counted on the meta device "
              f"({type(e).__name__}): MFU left out", file=sys.stderr)
        return None


def _gflop(cfg: Config, image_size: int, probe_classes: int, net: nn.Module | None) -> float:
    batch = 2  # BatchNorm needs more than one value per channel; FLOPs are linear in the batch
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        method = build_method(cfg)
        pair = method.network(cfg, seed=0, probe_classes=probe_classes, net=net)
        views = torch.empty(batch, 3, image_size, image_size)
        labels = torch.zeros(batch, dtype=torch.long) if probe_classes else None
    counter = FlopCounterMode(display=False)
    with counter:
        total, _ = forward_loss(pair, views, views, labels, bf16=False, loss_fn=method.loss)
        total.backward()
    return counter.get_total_flops() / batch / 1e9
