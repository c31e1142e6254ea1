"""The official network (issue 30, items 3, 4 and 4b): the official ResNet-18's structure, TF's SAME padding, and
``fastbyol import official`` of the official code's checkpoint files.

The checkpoints here are built on the official side, independently of fastbyol's model: Haiku's module names and
shapes from ``byol/utils/networks.py`` and Haiku's ``BlockV1`` (one block's names written out), random numpy
weights, pickled as the official ``Checkpointer`` lays the file out (dill's namedtuple, Haiku's ``FlatMapping``,
numpy 1's module names). The imported encoder and heads are checked against a reference written here with plain
torch ops on the same numpy weights, in float64, padding each stride-2 window explicitly as TF's SAME does.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.engine import checkpoint
from fastbyol.engine.official import checked_state, import_official, imported_config
from fastbyol.errors import FastByolError
from fastbyol.model.backbone import Encoder, tf_same_pads
from fastbyol.model.byol import ByolPair
from fastbyol.model.official import OfficialCheckpoint, map_official

Tree = dict[str, dict[str, np.ndarray]]

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


# -- official checkpoints, built on the official side --------------------------------------------------------------

# Block group 0, block 0 of the official ResNet50 (Haiku's BlockV1, bottleneck, use_projection): every name, leaf and
# shape written out, and the fastbyol name each must land on.
RESNET50_FIRST_BLOCK = {
    ("res_net50/~/block_group_0/~/block_0/~/shortcut_conv", "w", (1, 1, 64, 256)): "layer1.0.downsample.0.weight",
    ("res_net50/~/block_group_0/~/block_0/~/shortcut_batchnorm", "scale", (1, 1, 1, 256)):
        "layer1.0.downsample.1.weight",
    ("res_net50/~/block_group_0/~/block_0/~/shortcut_batchnorm", "offset", (1, 1, 1, 256)):
        "layer1.0.downsample.1.bias",
    ("res_net50/~/block_group_0/~/block_0/~/conv_0", "w", (1, 1, 64, 64)): "layer1.0.conv1.weight",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_0", "scale", (1, 1, 1, 64)): "layer1.0.bn1.weight",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_0", "offset", (1, 1, 1, 64)): "layer1.0.bn1.bias",
    ("res_net50/~/block_group_0/~/block_0/~/conv_1", "w", (3, 3, 64, 64)): "layer1.0.conv2.weight",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_1", "scale", (1, 1, 1, 64)): "layer1.0.bn2.weight",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_1", "offset", (1, 1, 1, 64)): "layer1.0.bn2.bias",
    ("res_net50/~/block_group_0/~/block_0/~/conv_2", "w", (1, 1, 64, 256)): "layer1.0.conv3.weight",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_2", "scale", (1, 1, 1, 256)): "layer1.0.bn3.weight",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_2", "offset", (1, 1, 1, 256)): "layer1.0.bn3.bias",
}
RESNET50_FIRST_BLOCK_STATE = {
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_2/~/mean_ema", "average", (1, 1, 1, 256)):
        "layer1.0.bn3.running_mean",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_2/~/mean_ema", "counter", ()): "layer1.0.bn3.num_batches_tracked",
    ("res_net50/~/block_group_0/~/block_0/~/batchnorm_2/~/var_ema", "average", (1, 1, 1, 256)):
        "layer1.0.bn3.running_var",
    ("res_net50/~/initial_batchnorm/~/var_ema", "average", (1, 1, 1, 64)): "bn1.running_var",
}
HEADS = {  # the MLPs build their layers in __call__ ('/'), a second Linear is 'linear_1'; w is [in, out]
    ("projector/linear", "w"): "online.projector.0.weight", ("projector/linear", "b"): "online.projector.0.bias",
    ("projector/batch_norm", "scale"): "online.projector.1.weight", ("projector/linear_1", "w"):
        "online.projector.3.weight", ("predictor/linear_1", "w"): "predictor.3.weight",
    ("classifier", "w"): "probe.weight", ("classifier", "b"): "probe.bias",
}


class Spec(NamedTuple):
    """An official torso (``networks.py``): its Haiku name, blocks per group and whether it bottlenecks."""

    encoder: str
    blocks: tuple[int, int, int, int]
    bottleneck: bool


RESNET18 = Spec("res_net18", (2, 2, 2, 2), False)
RESNET50 = Spec("res_net50", (3, 4, 6, 3), True)


def official_network(spec: Spec, rng: np.random.Generator, hidden: int = 32, proj: int = 16,
                     classes: int = 10) -> tuple[Tree, Tree]:
    """(params, state) of one official network (encoder, projector, predictor, classifier) with random weights."""
    params: Tree = {}
    state: Tree = {}

    def normal(*shape: int, std: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def uniform(*shape: int) -> np.ndarray:
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)

    def conv(name: str, k: int, cin: int, cout: int) -> None:
        params[name] = {"w": normal(k, k, cin, cout, std=1 / math.sqrt(k * k * cin))}

    def batchnorm(name: str, c: int, rank: int = 4) -> None:
        shape = (1,) * (rank - 1) + (c,)
        params[name] = {"scale": uniform(*shape), "offset": normal(*shape, std=0.1)}
        counter = np.array(1234, dtype=np.int32)
        state[f"{name}/~/mean_ema"] = {"average": normal(*shape, std=0.1), "hidden": normal(*shape),
                                       "counter": counter}
        state[f"{name}/~/var_ema"] = {"average": uniform(*shape), "hidden": normal(*shape), "counter": counter}

    def linear(name: str, cin: int, cout: int, bias: bool = True) -> None:
        params[name] = {"w": normal(cin, cout, std=1 / math.sqrt(cin))}
        if bias:
            params[name]["b"] = normal(cout, std=0.1)

    e = spec.encoder
    conv(f"{e}/~/initial_conv", 7, 3, 64)
    batchnorm(f"{e}/~/initial_batchnorm", 64)
    cin = 64
    for g, (blocks, c) in enumerate(zip(spec.blocks, (256, 512, 1024, 2048) if spec.bottleneck else
                                        (64, 128, 256, 512))):
        for b in range(blocks):
            p = f"{e}/~/block_group_{g}/~/block_{b}/~/"
            if b == 0:  # use_projection=(True, True, True, True): every group's first block
                conv(p + "shortcut_conv", 1, cin, c)
                batchnorm(p + "shortcut_batchnorm", c)
            if spec.bottleneck:
                conv(p + "conv_0", 1, cin, c // 4)
                batchnorm(p + "batchnorm_0", c // 4)
                conv(p + "conv_1", 3, c // 4, c // 4)
                batchnorm(p + "batchnorm_1", c // 4)
                conv(p + "conv_2", 1, c // 4, c)
                batchnorm(p + "batchnorm_2", c)
            else:
                conv(p + "conv_0", 3, cin, c)
                batchnorm(p + "batchnorm_0", c)
                conv(p + "conv_1", 3, c, c)
                batchnorm(p + "batchnorm_1", c)
            cin = c
    for mlp, width in (("projector", cin), ("predictor", proj)):
        linear(f"{mlp}/linear", width, hidden)
        batchnorm(f"{mlp}/batch_norm", hidden, rank=2)
        linear(f"{mlp}/linear_1", hidden, proj, bias=False)
    linear("classifier", cin, classes)
    return params, state


# Stand-ins pickled under the official file's global names (rewritten in the bytes below), so the file reads as
# one the Checkpointer's dill.dump(..., protocol=2) wrote: no dill, JAX or Haiku here either.
def _create_namedtuple(name: str, fieldnames: tuple[str, ...], modulename: str) -> type:
    raise AssertionError("never called: only its name is pickled")


class FlatMapping(dict):  # type: ignore[type-arg]
    def __reduce__(self) -> tuple[Any, ...]:
        return FlatMapping, (dict(self),)


class ScaleByScheduleState:  # an optax state: the reader must keep it inert
    def __init__(self, count: np.ndarray) -> None:
        self.count = count


class _ByolExperimentState(NamedTuple):
    online_params: Any
    target_params: Any
    online_state: Any
    target_state: Any
    opt_state: Any


class _OfficialPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if obj is _ByolExperimentState:  # dill pickles a namedtuple class by its name and fields
            return _create_namedtuple, ("_ByolExperimentState", obj._fields, "byol.byol_experiment")
        return NotImplemented


def official_pickle(path: Path, online: tuple[Tree, Tree], target: tuple[Tree, Tree], step: int = 5004) -> Path:
    def flat(tree: Tree) -> FlatMapping:
        return FlatMapping({k: FlatMapping(v) for k, v in tree.items()})

    opt_state = (ScaleByScheduleState(np.array(step, np.int32)), {"trace": np.zeros(3, np.float32)})
    state = _ByolExperimentState(flat(online[0]), flat(target[0]), flat(online[1]), flat(target[1]), opt_state)
    import io

    buf = io.BytesIO()
    _OfficialPickler(buf, protocol=2).dump({"experiment_state": state, "step": step,
                                            "rng": np.array([0, 42], np.uint32)})
    here = __name__.encode()
    blob = buf.getvalue()
    for ours, theirs in ((b"c" + here + b"\n_create_namedtuple\n", b"cdill._dill\n_create_namedtuple\n"),
                         (b"c" + here + b"\nFlatMapping\n", b"chaiku._src.data_structures\nFlatMapping\n"),
                         (b"c" + here + b"\nScaleByScheduleState\n", b"coptax._src.transform\nScaleByScheduleState\n"),
                         (b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")):
        assert ours in blob, ours
        blob = blob.replace(ours, theirs)
    assert here not in blob
    path.write_bytes(blob)
    return path


# -- the reference: the official forward in plain torch ops, float64, TF's SAME padding written out ---------------

def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TF's padding='SAME': out = ceil(in / s); the total padding max((out - 1) s + k - in, 0), the odd one after."""
    def pads(n: int) -> tuple[int, int]:
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2
    (top, bottom), (left, right) = pads(x.shape[2]), pads(x.shape[3])
    return F.pad(x, (left, right, top, bottom), value=value)


def _conv(params: Tree, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = _t(params[name]["w"])  # HWIO
    return F.conv2d(_same(x, w.shape[0], stride), w.permute(3, 2, 0, 1), stride=stride)


def _bn(params: Tree, state: Tree, name: str, x: torch.Tensor) -> torch.Tensor:
    """Haiku's BatchNorm with is_training=False: the EMAs' averages, eps 1e-5."""
    c = x.shape[1]
    shape = (1, c) + (1,) * (x.dim() - 2)
    mean, var = _t(state[f"{name}/~/mean_ema"]["average"]), _t(state[f"{name}/~/var_ema"]["average"])
    scale, offset = _t(params[name]["scale"]), _t(params[name]["offset"])
    inv = scale.reshape(shape) / torch.sqrt(var.reshape(shape) + 1e-5)
    return (x - mean.reshape(shape)) * inv + offset.reshape(shape)


def official_encoder(spec: Spec, params: Tree, state: Tree, x: torch.Tensor) -> torch.Tensor:
    e = spec.encoder
    out = F.relu(_bn(params, state, f"{e}/~/initial_batchnorm", _conv(params, f"{e}/~/initial_conv", x, 2)))
    out = F.max_pool2d(_same(out, 3, 2, float("-inf")), 3, 2)
    for g, blocks in enumerate(spec.blocks):
        for b in range(blocks):
            p = f"{e}/~/block_group_{g}/~/block_{b}/~/"
            stride = 2 if g and not b else 1
            shortcut = out
            if b == 0:
                shortcut = _bn(params, state, p + "shortcut_batchnorm", _conv(params, p + "shortcut_conv", out, stride))
            # BlockV1: a bottleneck strides its 3x3 (conv_1), a basic block its first 3x3 (conv_0, Haiku since 2020-12)
            strides = (1, stride, 1) if spec.bottleneck else (stride, 1)
            h = out
            for i, s in enumerate(strides):
                h = _bn(params, state, p + f"batchnorm_{i}", _conv(params, p + f"conv_{i}", h, s))
                if i < len(strides) - 1:
                    h = F.relu(h)
            out = F.relu(h + shortcut)
    return out.mean(dim=(2, 3))


def official_mlp(params: Tree, state: Tree, name: str, x: torch.Tensor) -> torch.Tensor:
    h = x @ _t(params[f"{name}/linear"]["w"]) + _t(params[f"{name}/linear"]["b"])
    h = F.relu(_bn(params, state, f"{name}/batch_norm", h))
    return h @ _t(params[f"{name}/linear_1"]["w"])


def _leaves(trees: dict[str, Tree]) -> list[str]:
    return [f"{tree}/{module}/{leaf}" for tree, t in trees.items() for module, leaves in t.items() for leaf in leaves]


@pytest.fixture(scope="module")
def resnet50_import(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Tree]]:
    rng = np.random.default_rng(0)
    online, target = official_network(RESNET50, rng), official_network(RESNET50, rng)
    root = tmp_path_factory.mktemp("official")
    pkl = official_pickle(root / "pretrain_res50x1.pkl", online, target)
    run = import_official(pkl, root / "r50")
    trees = {"online_params": online[0], "target_params": target[0], "online_state": online[1],
             "target_state": target[1]}
    return run, trees


def test_import_maps_every_tensor_once(resnet50_import: tuple[Any, dict[str, Tree]]) -> None:
    run, trees = resnet50_import
    m = run.mapping
    leaves = _leaves(trees)
    accounted = [o for o, _ in m.mapped] + [o for o, _ in m.dropped]
    assert sorted(accounted) == sorted(leaves) and not m.unmapped  # each official leaf exactly once
    keys = [k for _, k in m.mapped]
    state = checkpoint.load(run.checkpoint)
    assert len(keys) == len(set(keys)) and set(keys) == set(state["model"])  # each fastbyol tensor exactly once
    mapped = dict(m.mapped)
    for tower in ("online", "target"):
        for (module, leaf, shape), name in RESNET50_FIRST_BLOCK.items():
            assert trees[f"{tower}_params"][module][leaf].shape == shape
            assert mapped[f"{tower}_params/{module}/{leaf}"] == f"{tower}.encoder.net.{name}"
        for (module, leaf, shape), name in RESNET50_FIRST_BLOCK_STATE.items():
            assert trees[f"{tower}_state"][module][leaf].shape == shape
            assert mapped[f"{tower}_state/{module}/{leaf}"] == f"{tower}.encoder.net.{name}"
    for (module, leaf), name in HEADS.items():
        assert mapped[f"online_params/{module}/{leaf}"] == name
    assert mapped["target_params/projector/linear_1/w"] == "target.projector.3.weight"
    # Left out by name: the target's predictor and classifier, the EMAs' accumulators, the var_emas' counters.
    dropped = [o for o, _ in m.dropped]
    assert all(o.startswith(("target_params/predictor/", "target_params/classifier/", "target_state/predictor/"))
               or o.endswith(("/hidden", "/var_ema/counter")) for o in dropped)
    assert "target_params/classifier/w" in dropped and "online_params/classifier/w" not in dropped
    # Values: HWIO -> OIHW, [in, out] -> [out, in], BatchNorm vectors flat, the counter as num_batches_tracked.
    model = state["model"]
    w = trees["online_params"]["res_net50/~/block_group_0/~/block_0/~/conv_1"]["w"]
    assert torch.equal(model["online.encoder.net.layer1.0.conv2.weight"], torch.from_numpy(w.transpose(3, 2, 0, 1)))
    assert torch.equal(model["probe.weight"], torch.from_numpy(trees["online_params"]["classifier"]["w"].T.copy()))
    assert int(model["target.encoder.net.bn1.num_batches_tracked"]) == 1234
    assert state["step"] == 5004 and state["imported"]["source"].endswith("pretrain_res50x1.pkl")


def test_imported_run_is_the_official_network(resnet50_import: tuple[Any, dict[str, Tree]]) -> None:
    """The imported online and target encoders, projector, predictor and probe against the reference at 64 px (every
    stride-2 window on an even side, so the padding is asymmetric) and 61 px (odd sides)."""
    import fastbyol

    run, trees = resnet50_import
    cfg = run.cfg.model
    assert (cfg.arch, cfg.init, cfg.padding, cfg.proj_hidden, cfg.proj_dim, cfg.online_probe) == (
        "resnet50", "haiku", "same", 32, 16, True)
    assert run.cfg.data.num_classes == 10 and (run.run_dir / "config.yaml").is_file()
    encoder = fastbyol.load_encoder(run.run_dir)
    state = checkpoint.load(run.checkpoint)
    with torch.device("meta"):  # no random init to pay for: the checkpoint's tensors replace it
        pair = ByolPair(run.cfg.model, probe_classes=10)
    pair.load_state_dict(state["model"], assign=True)
    pair.eval()
    pair.target.eval()
    g = torch.Generator().manual_seed(0)
    for size in (64, 61):
        x = torch.randn(2, 3, size, size, generator=g)
        want = official_encoder(RESNET50, trees["online_params"], trees["online_state"], x.double())
        scale = float(want.abs().max())
        with torch.no_grad():
            got = encoder(x)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)
            target = official_encoder(RESNET50, trees["target_params"], trees["target_state"], x.double())
            torch.testing.assert_close(pair.target.encoder(x).double(), target, rtol=1e-5,
                                       atol=1e-5 * float(target.abs().max()))
    p, s = trees["online_params"], trees["online_state"]
    with torch.no_grad():
        proj = official_mlp(p, s, "projector", want)
        torch.testing.assert_close(pair.online.projector(want.float()).double(), proj, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pair.predictor(proj.float()).double(), official_mlp(p, s, "predictor", proj),
                                   rtol=1e-5, atol=1e-5)
        logits = want @ _t(p["classifier"]["w"]) + _t(p["classifier"]["b"])
        assert pair.probe is not None
        torch.testing.assert_close(pair.probe(want.float()).double(), logits, rtol=1e-5, atol=1e-5)


def test_imported_run_cannot_resume(resnet50_import: tuple[Any, dict[str, Tree]]) -> None:
    from fastbyol.engine.trainer import resume_run

    run, _ = resnet50_import
    with pytest.raises(FastByolError, match="cannot resume; evaluate or export it"):
        resume_run(str(run.run_dir), [])


@pytest.fixture(scope="module")
def resnet18_trees() -> tuple[tuple[Tree, Tree], tuple[Tree, Tree]]:
    rng = np.random.default_rng(1)
    return official_network(RESNET18, rng), official_network(RESNET18, rng)


def test_import_and_export_the_official_resnet18_through_the_cli(
        resnet18_trees: tuple[tuple[Tree, Tree], tuple[Tree, Tree]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """ResNet-18: layer1[0]'s projection shortcut lands in the official ResNet18; the export carries a note, since
    torchvision's resnet18 lacks that shortcut and pads symmetrically."""
    from safetensors import safe_open

    from fastbyol.cli import main

    online, target = resnet18_trees
    pkl = official_pickle(tmp_path / "res18.pkl", online, target, step=7)
    assert main(["import", "official", str(pkl), str(tmp_path / "r18")]) == 0
    out = capsys.readouterr()
    assert "imported the official resnet18 (step 7)" in out.out and "fastbyol eval knn" in out.err
    ckpt = checkpoint.load(tmp_path / "r18" / "checkpoints" / checkpoint.checkpoint_name(7))
    shortcut = online[0]["res_net18/~/block_group_0/~/block_0/~/shortcut_conv"]["w"]
    assert torch.equal(ckpt["model"]["online.encoder.net.layer1.0.downsample.0.weight"],
                       torch.from_numpy(shortcut.transpose(3, 2, 0, 1)))
    import fastbyol

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    want = official_encoder(RESNET18, online[0], online[1], x.double())
    with torch.no_grad():
        torch.testing.assert_close(fastbyol.load_encoder(tmp_path / "r18")(x).double(), want, rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))
    assert main(["export", str(tmp_path / "r18"), str(tmp_path / "enc")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("fastbyol: note:")]
    assert len(notes) == 2 and "layer1.0.downsample" in notes[0] and "model.padding=same" in notes[1]
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["padding"] == "same" and meta["init"] == "haiku" and "projection shortcut" in meta["torchvision_notes"]
    # Given the shortcut as the note says, torchvision's resnet18 loads the file with only its classifier missing.
    tv = models.resnet18()
    tv.layer1[0].downsample = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64))
    missing, unexpected = tv.load_state_dict(torch.load(tmp_path / "enc.pth", weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    assert main(["import", "official", str(pkl), str(tmp_path / "r18")]) == 2  # not an empty folder
    assert "is not an empty folder" in capsys.readouterr().err


def _small(trees: tuple[tuple[Tree, Tree], tuple[Tree, Tree]]) -> OfficialCheckpoint:
    (op, os_), (tp, ts) = trees
    return OfficialCheckpoint(dict(op), dict(tp), dict(os_), dict(ts), 7)


def test_import_refuses_unmapped_missing_and_unknown(resnet18_trees: tuple[tuple[Tree, Tree], tuple[Tree, Tree]],
                                                     tmp_path: Path) -> None:
    ckpt = _small(resnet18_trees)
    extra = ckpt.online_params | {"res_net18/~/block_group_0/~/block_0/~/se_excite": {"w": np.zeros((1, 1, 64, 4))}}
    with pytest.raises(FastByolError, match=r"1 tensors left unmapped, e.g. online_params/res_net18/~/block_group_0/"
                                            r"~/block_0/~/se_excite/w: not the official network"):
        mapping = map_official(ckpt._replace(online_params=extra))
        checked_state(mapping, imported_config(mapping, tmp_path / "x"), Path("f.pkl"))
    extra = ckpt.online_params | {"res_net18/~/block_group_1/~/block_5/~/conv_0": {"w": np.zeros((3, 3, 64, 64))}}
    with pytest.raises(FastByolError, match=r"tensors left unmapped, e.g. .*block_5/~/conv_0/w \(as "
                                            r"online.encoder.net.layer2.5.conv1.weight\)"):
        mapping = map_official(ckpt._replace(online_params=extra))
        checked_state(mapping, imported_config(mapping, tmp_path / "x"), Path("f.pkl"))
    fewer = {k: v for k, v in ckpt.target_state.items() if "block_group_3/~/block_1/~/batchnorm_1" not in k}
    with pytest.raises(FastByolError, match=r"lacks 3 tensors of the official resnet18, e.g. "
                                            r"target.encoder.net.layer4.1.bn2.running_mean"):
        mapping = map_official(ckpt._replace(target_state=fewer))
        checked_state(mapping, imported_config(mapping, tmp_path / "x"), Path("f.pkl"))
    wide = {k.replace("res_net18", "res_net50"): v for k, v in ckpt.online_params.items()}
    wide["res_net50/~/initial_conv"] = {"w": np.zeros((7, 7, 3, 128), np.float32)}
    with pytest.raises(FastByolError, match=r"a ResNet50 of width 2x .*fastbyol builds the 1x networks only"):
        map_official(ckpt._replace(online_params=wide))
    odd = {k.replace("res_net18", "res_net26"): v for k, v in ckpt.online_params.items()}
    with pytest.raises(FastByolError, match=r"unknown encoder \(res_net26\): fastbyol imports the official "
                                            r"ResNet18, ResNet34, ResNet50"):
        map_official(ckpt._replace(online_params=odd))


@pytest.mark.parametrize("content,needle", [
    (b"not a pickle at all", "is not a checkpoint of the official BYOL code (not a pickle"),
    (pickle.dumps({"params": {}}, protocol=2), "no experiment_state: it holds ['params']"),
    (pickle.dumps({"experiment_state": {"online_params": 3}}, protocol=2), "its online_params is a int"),
])
def test_import_refuses_other_files(content: bytes, needle: str, tmp_path: Path) -> None:
    (tmp_path / "f.pkl").write_bytes(content)
    with pytest.raises(FastByolError) as e:
        import_official(tmp_path / "f.pkl", tmp_path / "run")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
