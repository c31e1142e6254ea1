"""The online/target pair: shapes, heads per spec, target without grad and in training mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models

from fastbyol.config import ModelConfig
from fastbyol.model.backbone import Encoder
from fastbyol.model.byol import ByolPair

SMALL = ModelConfig(arch="resnet18", small_stem=True, proj_hidden=64, proj_dim=16)


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                      ("wide_resnet50_2", 2048)])
def test_encoder_features_and_torchvision_names(arch: str, dim: int) -> None:
    """torchvision's names; the official ResNet-18/34 (init=haiku) add layer1[0]'s projection shortcut."""
    for init in ("haiku", "torchvision"):
        enc = Encoder(arch, init=init)
        assert enc.feature_dim == dim
        tv = getattr(models, arch)(weights=None)
        missing, unexpected = tv.load_state_dict(enc.export_state_dict(), strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"}
        official = init == "haiku" and arch in ("resnet18", "resnet34")
        assert {k.rpartition(".")[0] for k in unexpected} == ({"layer1.0.downsample.0", "layer1.0.downsample.1"}
                                                              if official else set())


def test_resnet200_and_resnet101_152_build() -> None:
    for arch, blocks in (("resnet101", 23), ("resnet152", 36), ("resnet200", 36)):
        enc = Encoder(arch)
        assert len(enc.net.layer3) == blocks and enc.feature_dim == 2048


def test_small_stem_keeps_resolution() -> None:
    enc = Encoder("resnet18", small_stem=True)
    assert enc.net.conv1.kernel_size == (3, 3) and enc.net.conv1.stride == (1, 1)
    assert isinstance(enc.net.maxpool, nn.Identity)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_heads_follow_spec() -> None:
    pair = ByolPair(ModelConfig(arch="resnet18"))
    for mlp, in_dim in ((pair.online.projector, 512), (pair.predictor, 256), (pair.target.projector, 512)):
        lin1, bn, relu, lin2 = mlp
        assert (lin1.in_features, lin1.out_features, lin1.bias is not None) == (in_dim, 4096, True)
        assert isinstance(bn, nn.BatchNorm1d) and bn.momentum == 0.1 and bn.eps == 1e-5
        assert isinstance(relu, nn.ReLU)
        assert (lin2.in_features, lin2.out_features, lin2.bias) == (4096, 256, None)
    # Haiku's BlockV1 zero-inits the last BN of a bottleneck only: the official ResNet18's basic blocks keep scale 1.
    assert float(pair.online.encoder.net.layer1[0].bn2.weight.detach().min()) == 1.0


def test_target_is_independent_no_grad_and_in_train_mode() -> None:
    pair = ByolPair(SMALL, seed=0)
    online, target = pair.param_pairs()
    assert len(online) == len(target) == len(list(pair.target.parameters()))
    assert all(not t.requires_grad for t in target) and all(o.requires_grad for o in online)
    assert all(o.shape == t.shape for o, t in zip(online, target))
    assert not torch.equal(online[0], target[0])  # independent init, as the official code
    copy = ByolPair(ModelConfig(**{**SMALL.__dict__, "target_init": "copy"}))
    o, t = copy.param_pairs()
    assert all(torch.equal(a, b) for a, b in zip(o, t))
    pair.eval()
    assert pair.target.training and not pair.online.training


def test_forward_backward_updates_online_grads_and_target_bn_stats() -> None:
    pair = ByolPair(SMALL).train()
    before = pair.target.encoder.net.bn1.running_mean.clone()
    out = pair(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert out.p1.shape == out.z2.shape == (4, 16)
    assert not out.z1.requires_grad and out.p1.requires_grad
    (out.p1.sum() + out.p2.sum()).backward()
    assert all(p.grad is None for p in pair.target.parameters())
    assert pair.predictor[0].weight.grad is not None
    assert not torch.equal(before, pair.target.encoder.net.bn1.running_mean)


def test_same_seed_same_model() -> None:
    a, b = ByolPair(SMALL, seed=5), ByolPair(SMALL, seed=5)
    for (_, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("small_stem", [False, True])
def test_torchvision_init_is_torchvisions_random_network(small_stem: bool) -> None:
    """The demo's standard random baseline: torchvision's network (no projection shortcut in layer1[0], which the
    official ResNet18 of fastbyol's own init has), Kaiming-normal fan-out convolutions (stem included) and every
    BatchNorm at scale 1."""
    import math

    ours, standard = Encoder("resnet18", small_stem), Encoder("resnet18", small_stem, init="torchvision")
    assert ours.net.layer1[0].downsample is not None and standard.net.layer1[0].downsample is None
    assert all(float(m.weight.min()) == 1.0 for m in standard.modules() if isinstance(m, nn.BatchNorm2d))
    for name in ("conv1", "layer3.0.conv2"):
        conv = standard.net.get_submodule(name)
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.std()) == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1), name
    with pytest.raises(ValueError, match="unknown init"):
        Encoder("resnet18", init="xavier")


def test_haiku_init_matches_the_official_formula() -> None:
    """init=haiku as the official network starts (Haiku's defaults): every convolution and Linear drawn from
    TruncatedNormal(1/sqrt(fan_in)), a unit normal cut at +-2 and scaled without correction, so std 0.8796/sqrt(fan_in)
    and no value beyond 2/sqrt(fan_in); Linear biases zero; the online probe too (issue 30, differences 1 and 5)."""
    import math

    from fastbyol.model.backbone import TRUNCATED_UNIT_STD

    torch.manual_seed(0)
    pair = ByolPair(ModelConfig(arch="resnet18", proj_hidden=512, proj_dim=128), probe_classes=1000)
    layers = [("stem conv", pair.online.encoder.net.conv1), ("3x3 conv", pair.online.encoder.net.layer3[0].conv2),
              ("1x1 shortcut", pair.online.encoder.net.layer3[0].downsample[0]),
              ("official 1x1 shortcut", pair.online.encoder.net.layer1[0].downsample[0]),
              ("projector", pair.online.projector[0]), ("predictor", pair.predictor[3]), ("probe", pair.probe)]
    for name, layer in layers:
        w = layer.weight.detach()
        fan_in = w[0].numel()
        scale = 1.0 / math.sqrt(fan_in)
        assert float(w.std()) == pytest.approx(TRUNCATED_UNIT_STD * scale, rel=0.03), name
        assert float(w.abs().max()) <= 2 * scale + 1e-7, name
        if getattr(layer, "bias", None) is not None:
            assert float(layer.bias.abs().max()) == 0.0, name
    # The demo presets' torchvision init keeps torch's default probe (kaiming-uniform weights, non-zero bias).
    torch.manual_seed(0)
    standard = ByolPair(ModelConfig(arch="resnet18", init="torchvision", proj_hidden=512, proj_dim=128),
                        probe_classes=10)
    assert standard.probe is not None and float(standard.probe.bias.abs().max()) > 0
