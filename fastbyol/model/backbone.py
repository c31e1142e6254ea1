"""ResNet encoders without the classifier, as BYOL uses them (2048-d pooled features for ResNet-50).

torchvision's ResNets, with two choices taken from the official BYOL code (``utils/networks.py``, a
copy of Haiku's ResNet): the last BatchNorm of every residual block starts at zero scale
(``zero_init_residual``) and convolutions use Haiku's default init (truncated normal, fan-in,
variance 1). Module names stay torchvision's, so the encoder exports as a torchvision state_dict.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck, ResNet

from fastbyol.config import INITS

# Haiku's VarianceScaling(truncated_normal) divides by the std of a unit normal truncated at +-2.
_TRUNC_STD_CORRECTION = 0.87962566103423978


def _resnet200(weights: None = None, **kwargs: bool) -> ResNet:
    """ResNet-200 (v1, blocks 3-24-36-3), which torchvision lacks; the paper's largest model."""
    return ResNet(Bottleneck, [3, 24, 36, 3], **kwargs)


_BUILDERS = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
    "resnet152": models.resnet152,
    "resnet200": _resnet200,
    "wide_resnet50_2": models.wide_resnet50_2,
    "wide_resnet101_2": models.wide_resnet101_2,
}


def haiku_conv_init_(conv: nn.Conv2d) -> None:
    """Haiku Conv2D default: truncated normal (+-2 std), std = sqrt(1 / fan_in) / 0.8796."""
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    std = math.sqrt(1.0 / fan_in) / _TRUNC_STD_CORRECTION
    nn.init.trunc_normal_(conv.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)



class Encoder(nn.Module):
    """ResNet trunk -> global average pool -> flat features [B, feature_dim].

    ``init``: 'haiku' (the official BYOL code's, above: what training starts from) or 'torchvision' (its
    default: Kaiming-normal fan-out convolutions, every BatchNorm at scale 1), the standard random network
    that evaluation baselines compare against."""

    def __init__(self, arch: str, small_stem: bool = False, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5, init: str = "haiku") -> None:
        super().__init__()
        if arch not in _BUILDERS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_BUILDERS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        net = _BUILDERS[arch](weights=None, zero_init_residual=init == "haiku")
        if small_stem:
            # CIFAR-style stem for 32-64 px inputs: a 7x7/2 conv and a max-pool would leave 1-2 px maps.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()  # type: ignore[assignment]
            if init == "torchvision":  # as torchvision's ResNet initialises the stem it replaces
                nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim: int = net.fc.in_features
        net.fc = nn.Identity()  # type: ignore[assignment]
        self.net = net
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and init == "haiku":
                haiku_conv_init_(m)
            elif isinstance(m, nn.BatchNorm2d):
                m.momentum, m.eps = bn_momentum, bn_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under torchvision's names (``conv1.weight``, ``layer1.0.bn1.weight``...), no fc."""
        return {k.removeprefix("net."): v for k, v in self.state_dict().items()}
