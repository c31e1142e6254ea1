"""Encoders with nothing learned, for the evaluation tables: what a pretrained encoder must beat.

- ``RawPixels``: no network at all; the evaluation view's pixels (ImageNet-normalised) are the feature.
- random networks: ``fastbyol.model.backbone.Encoder`` at its initialisation, torchvision's (the standard
  random network) or fastbyol's own (Haiku's, as training starts), BatchNorm calibrated on the training images
  (``fastbyol.engine.evaluate.calibrated_random_encoder``).
"""

from __future__ import annotations

import torch
from torch import nn


class RawPixels(nn.Module):
    """[B, 3, H, W] -> [B, 3 H W]: the image itself as its feature vector."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)
