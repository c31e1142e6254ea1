"""Encoders without the classifier, as BYOL uses them (2048-d pooled features for ResNet-50).

torchvision's ResNets, with the official BYOL code's choices (``utils/networks.py``, Haiku's ResNet) under
``init=haiku``: the last BatchNorm of every bottleneck block starts at zero scale (Haiku's ``BlockV1`` zero-inits
only the bottleneck's; the basic block's keeps scale 1), convolutions use Haiku's default init
(``TruncatedNormal(1 / sqrt(fan_in))``: a unit normal cut at +-2 and scaled, so a std of 0.88 / sqrt(fan_in)), and
ResNet-18/34 are the official ResNet18/34: ``ResNetTorso`` gives every stage's first block a projection shortcut
(``use_projection=(True,) * 4``), so layer1[0] has a 1x1 conv + BatchNorm (64 -> 64, stride 1) that torchvision's
lacks (11,180,736 parameters against 11,176,512 for ResNet-18). The stride of a basic block sits on its first 3x3
conv, as torchvision's and Haiku's since its 2020-12 fix (Haiku before it, e.g. the commit the BYOL README cites,
put it on the second). ``padding='same'`` pads stride-2 windows as TF's ``padding='SAME'`` (Haiku's default; the
official network's), ``'torch'`` symmetrically as torchvision. ``init=torchvision`` is torchvision's network as
it is (the demo presets'). Or any timm model
(``model.arch=timm:<name>``), created by ``timm.create_model`` with ``num_classes=0`` (its global-pooled
features; a ViT's class token), its ``img_size`` set to the run's image size where the model takes one, and
timm's own initialisation. Or a module of the user's, given to the Python API (``fastbyol.train(model=...)``,
``model.arch=custom:<module>.<class>``), kept as it is: its own initialisation and BatchNorm settings, its width
found by one forward. Module names stay the library's (under ``net.``), so the encoder exports as a
torchvision, timm or the user's own state_dict (the official ResNet-18/34's with the extra
``layer1.0.downsample.*``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.resnet import Bottleneck, ResNet

from fastbyol.config import CUSTOM_PREFIX, INITS, OFFICIAL_SHORTCUT_ARCHS, PADDINGS, TIMM_PREFIX, ModelConfig
from fastbyol.errors import FastByolError

TRUNCATED_UNIT_STD = 0.87962566103423978
"""The std of a unit normal truncated at +-2: what Haiku's ``TruncatedNormal(stddev=s)`` draws is ``s`` times it (no
correction, unlike ``VarianceScaling(distribution="truncated_normal")``)."""


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
    """Haiku's ``ConvND`` default (the official network's): ``TruncatedNormal(stddev=1 / sqrt(fan_in))``, a unit
    normal truncated at +-2 then scaled, with no correction, so the weights' std is 0.8796 / sqrt(fan_in)."""
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    std = 1.0 / math.sqrt(fan_in)
    nn.init.trunc_normal_(conv.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one axis under TF's ``padding='SAME'``: the output has ceil(size / stride)
    positions, ``total = max((ceil(size / stride) - 1) * stride + kernel - size, 0)``, ``before = total // 2`` and
    the odd one after. A 7x7/2 on 224 px pads (2, 3), a 3x3/2 on 56 px (0, 1); torch's ``padding=k // 2`` is
    (3, 3) and (1, 1)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same_pad(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    top, bottom = tf_same_pads(x.shape[-2], kernel[0], stride[0])
    left, right = tf_same_pads(x.shape[-1], kernel[1], stride[1])
    if not (top or bottom or left or right):  # shapes are static under compile: a guard, not a graph break
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class SamePadConv2d(nn.Conv2d):
    """A convolution padded as TF's ``padding='SAME'``: ``F.pad`` (asymmetric where the stride needs it), then the
    convolution with ``padding=0``. Parameters and their names are ``nn.Conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_same_pad(x, self.kernel_size, self.stride), self.weight, self.bias)


class SamePadMaxPool2d(nn.MaxPool2d):
    """A max-pool padded as TF's ``padding='SAME'``, with -inf as TF's (and ``hk.max_pool``'s) padding value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = nn.modules.utils._pair(self.kernel_size), nn.modules.utils._pair(self.stride)
        out: torch.Tensor = F.max_pool2d(_same_pad(x, k, s, float("-inf")), k, s, 0, self.dilation,
                                         ceil_mode=False)
        return out


def same_padding_(net: nn.Module) -> None:
    """Pad every stride-2 window of ``net`` (convolutions, max-pools) as TF's ``padding='SAME'``, in place. The
    modules keep their parameters (no new random draw); stride-1 windows of odd size pad alike either way and
    stay as they are."""
    for name, m in list(net.named_modules()):
        same: nn.Module
        if type(m) is nn.Conv2d and m.stride != (1, 1):
            if m.dilation != (1, 1):
                raise ValueError(f"{name}: padding='same' is implemented for undilated convolutions")
            with torch.device("meta"):
                conv = SamePadConv2d(m.in_channels, m.out_channels, (m.kernel_size[0], m.kernel_size[1]),
                                     (m.stride[0], m.stride[1]), padding=0, groups=m.groups, bias=m.bias is not None)
            conv.weight, conv.bias = m.weight, m.bias
            same = conv
        elif type(m) is nn.MaxPool2d and nn.modules.utils._pair(m.stride) != (1, 1):
            same = SamePadMaxPool2d(m.kernel_size, m.stride, padding=0, dilation=m.dilation)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, same)


def has_official_shortcut(arch: str, init: str) -> bool:
    """Whether the encoder is the official ResNet18/34, with layer1[0]'s projection shortcut that torchvision's
    ResNet lacks (so its export cannot load into torchvision's model as it is)."""
    return init == "haiku" and arch in OFFICIAL_SHORTCUT_ARCHS


def _timm_trunk(name: str, image_size: int, kwargs: dict[str, Any]) -> tuple[nn.Module, int]:
    """timm's ``name`` without its classifier, and its feature width. ``img_size`` is passed to the models
    that take one (ViTs, Swin, ...); a convolutional model has none and is built without it."""
    try:
        import timm
    except ImportError:
        raise FastByolError(f"model.arch={TIMM_PREFIX}{name} needs timm: pip install timm") from None
    args: dict[str, Any] = {"pretrained": False, "num_classes": 0, **kwargs}
    try:
        net = timm.create_model(name, img_size=image_size, **args) if image_size else timm.create_model(name, **args)
    except TypeError as e:
        if "img_size" not in str(e):
            raise FastByolError(f"timm.create_model({name!r}) refused model.timm_kwargs={kwargs}: {e}") from None
        try:
            net = timm.create_model(name, **args)
        except TypeError as e2:
            raise FastByolError(f"timm.create_model({name!r}) refused model.timm_kwargs={kwargs}: {e2}") from None
    features: int = net.num_features  # type: ignore[assignment]
    return net, features


def custom_arch(net: nn.Module) -> str:
    """``custom:<module>.<class>``: how a run's config records an encoder given to the Python API."""
    return f"{CUSTOM_PREFIX}{type(net).__module__}.{type(net).__qualname__}"


def feature_width(net: nn.Module, image_size: int) -> int:
    """D of the features [B, D] that ``net`` gives for images [B, 3, image_size, image_size]: one forward of a
    batch of 2 in eval mode without gradients (on the module's device, ``meta`` included), its mode restored."""
    tensor = next(itertools.chain(net.parameters(), net.buffers()), None)
    shape = [2, 3, image_size, image_size]
    name = type(net).__qualname__
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.rand(shape, device=tensor.device if tensor is not None else None))
    except Exception as e:  # the user's code: any error, reported in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise FastByolError(f"model {name} failed on a batch of shape {shape} (data.image_size "
                            f"{image_size}): {type(e).__name__}: {first}") from None
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise FastByolError(f"model {name} returned {got} for a batch of shape {shape}: an encoder must return "
                            "features [B, D]; end it with global pooling, e.g. nn.AdaptiveAvgPool2d(1), nn.Flatten()")
    return int(out.shape[1])


class Encoder(nn.Module):
    """Trunk -> global pool -> flat features [B, feature_dim]: a torchvision ResNet, or a timm model.

    ``init`` (ResNets): 'haiku' (the official BYOL code's network, above: what training starts from) or
    'torchvision' (torchvision's network and default: Kaiming-normal fan-out convolutions, every BatchNorm at scale
    1), the standard random network that evaluation baselines compare against. ``padding`` (ResNets): 'torch' or
    'same' (TF's, above). ``image_size`` and ``timm_kwargs`` are a timm model's; ``trunk`` (module, feature width)
    is a user's model, taken as it is (``around``)."""

    def __init__(self, arch: str, small_stem: bool = False, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5, init: str = "haiku", image_size: int = 0,
                 timm_kwargs: dict[str, Any] | None = None, trunk: tuple[nn.Module, int] | None = None,
                 padding: str = "torch") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDINGS)}")
        if padding != "torch" and (trunk is not None or arch.startswith((TIMM_PREFIX, CUSTOM_PREFIX))):
            raise FastByolError(f"model.padding={padding} applies to the torchvision ResNets, not {arch}: set "
                                "model.padding=torch")
        self.arch = arch
        if trunk is not None:  # a user's module (``around``): its own BatchNorm settings stay
            self.net, self.feature_dim = trunk
            return
        if arch.startswith(CUSTOM_PREFIX):
            cls = arch.rpartition(".")[2]
            raise FastByolError(f"model.arch={arch} is a model given to the Python API, which the config cannot "
                                f"build: pass one, fastbyol.load_encoder(RUN_DIR, model={cls}(...)) or "
                                f"fastbyol.train(model={cls}(...), resume=RUN_DIR)")
        if arch.startswith(TIMM_PREFIX):
            self.net, self.feature_dim = _timm_trunk(arch.removeprefix(TIMM_PREFIX), image_size, timm_kwargs or {})
        else:
            self.net, self.feature_dim = _torchvision_trunk(arch, small_stem, init, padding)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum, m.eps = bn_momentum, bn_eps

    @classmethod
    def from_config(cls, cfg: ModelConfig, init: str | None = None) -> Encoder:
        """The encoder ``cfg`` describes (``init`` overrides ``cfg.init``: a baseline's random network)."""
        return cls(cfg.arch, cfg.small_stem, cfg.bn_momentum, cfg.bn_eps, init or cfg.init, cfg.image_size,
                   cfg.timm_kwargs, padding=cfg.padding)

    @classmethod
    def around(cls, net: nn.Module, cfg: ModelConfig) -> Encoder:
        """The user's ``net`` as the encoder of a run whose ``cfg.arch`` is ``custom_arch(net)``: the module
        itself (trained in place), its width from one forward at ``cfg.image_size``."""
        if custom_arch(net) != cfg.arch:
            raise FastByolError(f"the model given is {custom_arch(net)}, but the run's model.arch={cfg.arch}: pass "
                                "a model of the run's class, or start a new run")
        return cls(cfg.arch, trunk=(net, feature_width(net, cfg.image_size)))

    @property
    def convolutional(self) -> bool:
        """More than one convolution (a ViT's patch embedding is its only one): channels-last pays off."""
        return sum(isinstance(m, nn.Conv2d) for m in self.modules()) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the library's own names, no classifier: torchvision's (``conv1.weight``,
        ``layer1.0.bn1.weight``...) or timm's (``blocks.0.attn.qkv.weight``...)."""
        return {k.removeprefix("net."): v for k, v in self.state_dict().items()}


def _torchvision_trunk(arch: str, small_stem: bool, init: str, padding: str = "torch") -> tuple[nn.Module, int]:
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_BUILDERS)}, or timm:<name>")
    # Haiku's BlockV1 zero-inits the last BatchNorm of a bottleneck block only (torchvision's flag would zero the
    # basic block's bn2 too).
    bottleneck = arch not in OFFICIAL_SHORTCUT_ARCHS
    net = _BUILDERS[arch](weights=None, zero_init_residual=init == "haiku" and bottleneck)
    if has_official_shortcut(arch, init):
        # The official ResNetTorso's block_group_0/block_0 projects its shortcut even at 64 -> 64, stride 1:
        # Conv2D(kernel 1, no bias) + BatchNorm (scale 1, offset 0), as torchvision's later stages do.
        block = net.layer1[0]
        block.downsample = nn.Sequential(nn.Conv2d(64, 64, kernel_size=1, stride=1, bias=False), nn.BatchNorm2d(64))
    if small_stem:
        # CIFAR-style stem for 32-64 px inputs: a 7x7/2 conv and a max-pool would leave 1-2 px maps.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
        if init == "torchvision":  # as torchvision's ResNet initialises the stem it replaces
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    feature_dim: int = net.fc.in_features
    net.fc = nn.Identity()  # type: ignore[assignment]
    if init == "haiku":
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                haiku_conv_init_(m)
    if padding == "same":
        same_padding_(net)
    return net, feature_dim
