"""The official network (issue 30, items 3 and 4): the official ResNet-18's structure and TF's SAME padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from fastbyol.config import ConfigError, build_config
from fastbyol.model.backbone import Encoder, tf_same_pads

# -- the official ResNet-18 and TF's padding, in fastbyol ---------------------------------------------------------


def test_official_resnet18_has_the_projection_shortcut_and_no_zero_init() -> None:
    """init=haiku builds the official ResNet18 (11,180,736 parameters: torchvision's 11,176,512 and layer1[0]'s
    1x1 projection + BatchNorm), no BatchNorm at zero; init=torchvision keeps torchvision's network."""
    official, standard = Encoder("resnet18"), Encoder("resnet18", init="torchvision")
    assert sum(p.numel() for p in official.parameters()) == 11_180_736
    assert sum(p.numel() for p in standard.parameters()) == 11_176_512
    shortcut = official.net.layer1[0].downsample
    assert isinstance(shortcut[0], nn.Conv2d) and (shortcut[0].in_channels, shortcut[0].out_channels) == (64, 64)
    assert shortcut[0].kernel_size == (1, 1) and shortcut[0].stride == (1, 1) and shortcut[0].bias is None
    assert isinstance(shortcut[1], nn.BatchNorm2d) and shortcut[1].momentum == 0.1 and shortcut[1].eps == 1e-5
    assert standard.net.layer1[0].downsample is None
    assert all(float(m.weight.detach().min()) == 1.0 for m in official.modules() if isinstance(m, nn.BatchNorm2d))
    tv = models.resnet18()
    missing, unexpected = tv.load_state_dict(official.export_state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"}
    assert sorted(unexpected) == sorted(f"layer1.0.downsample.{k}" for k in (
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"))
    # ResNet-34 is the same torso; ResNet-50's first block projects in torchvision too, its bn3 starts at zero.
    assert Encoder("resnet34").net.layer1[0].downsample is not None
    r50 = Encoder("resnet50")
    assert all(float(b.bn3.weight.detach().abs().max()) == 0.0 for b in [*r50.net.layer1, *r50.net.layer4])
    assert float(r50.net.layer1[0].bn2.weight.detach().min()) == 1.0


def test_checkpoint_size_estimate_counts_the_official_shortcut() -> None:
    """preflight's estimate (online weights and momentum, target weights, fp32) of the official ResNet-18's run."""
    from fastbyol.engine.preflight import checkpoint_bytes

    official, standard = build_config("smoke"), build_config("smoke", overrides=["model.init=torchvision"])
    assert checkpoint_bytes(official) - checkpoint_bytes(standard) == 4 * 3 * (64 * 64 + 2 * 64)  # type: ignore[operator]


def test_tf_same_pads_are_tfs() -> None:
    """The issue's numbers: the stem on 224 px pads 2 before and 3 after (torch: 3 and 3); stride-2 3x3 on an even
    side pads only after; an odd side pads evenly; a 1x1 stride-2 never pads."""
    assert tf_same_pads(224, 7, 2) == (2, 3)
    assert tf_same_pads(112, 3, 2) == (0, 1) and tf_same_pads(56, 3, 2) == (0, 1)
    assert tf_same_pads(57, 3, 2) == (1, 1) and tf_same_pads(63, 7, 2) == (3, 3)
    assert tf_same_pads(56, 1, 2) == (0, 0) and tf_same_pads(57, 1, 2) == (0, 0)
    assert tf_same_pads(32, 3, 1) == (1, 1)


def test_same_padding_is_compile_friendly_and_works_channels_last() -> None:
    torch.manual_seed(0)
    enc = Encoder("resnet18", padding="same").eval()
    names = {n: type(m).__name__ for n, m in enc.net.named_modules()}
    assert names["conv1"] == names["layer2.0.conv1"] == names["layer2.0.downsample.0"] == "SamePadConv2d"
    assert names["maxpool"] == "SamePadMaxPool2d" and names["layer1.0.conv1"] == "Conv2d"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = enc(x)
        compiled = torch.compile(enc, backend="aot_eager", fullgraph=True)  # no graph break
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)
        enc.to(memory_format=torch.channels_last)
        torch.testing.assert_close(enc(x.contiguous(memory_format=torch.channels_last)), want, rtol=1e-5, atol=1e-5)
    # The same weights padded as torch's differ (the issue measured a cosine of 0.71 at 224 px).
    torch_padded = Encoder("resnet18", padding="torch").eval()
    torch_padded.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert (torch_padded(x) - want).abs().max() > 1e-3


def test_padding_same_is_refused_where_it_does_not_apply() -> None:
    with pytest.raises(ConfigError, match="model.padding=same applies to the torchvision ResNets: .*set "
                                          "model.padding=torch") as e:
        build_config("smoke", overrides=["model.arch=timm:resnet18", "model.padding=same"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model.padding='valid' is not allowed"):
        build_config("smoke", overrides=["model.padding=valid"])
    assert build_config("smoke").model.padding == "torch"
