"""Any timm model as the encoder (``model.arch=timm:<name>``): a ResNet and a ConvNeXt with LARS and a ViT with
AdamW, at 32 px, train, resume bitwise, give the same steps with the Triton kernels as without (the fused
LARS+EMA, or AdamW then the EMA kernel), trace whole for torch.compile, count their FLOPs, and export a
state_dict that timm itself loads with only the classifier missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from twin_steps import step_from_the_same_state

from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.engine.evaluate import encoder_from_checkpoint, export_checkpoint
from fastbyol.engine.flops import gflop_per_image
from fastbyol.engine.trainer import Trainer, resume_run, start_run
from fastbyol.step.lars import lars_param_groups

ARCHS = ["timm:resnet50", "timm:convnext_atto", "timm:vit_tiny_patch16_224"]
OPTIM = {"timm:vit_tiny_patch16_224": ["optim.name=adamw", "optim.base_lr=1.5e-4", "optim.weight_decay=0.1"]}
SIZE = 32
TINY = ["data.num_images=64", "optim.batch_size=8", "model.proj_hidden=32", "model.proj_dim=16",
        f"data.image_size={SIZE}", "data.workers=0", "run.progress=off", "run.epochs=1", "optim.warmup_epochs=0.25",
        "run.log_every=1", "run.ckpt_every=2", "model.online_probe=true"]


def _name(arch: str) -> str:
    return arch.removeprefix("timm:")


def _run(tmp: Path, name: str, arch: str, *extra: str) -> Trainer:
    return start_run(build_config("smoke", overrides=[f"run.out_dir={tmp}", f"run.name={name}",
                                                      f"model.arch={arch}", *TINY, *OPTIM.get(arch, []), *extra]))


@pytest.fixture(scope="module", params=ARCHS, ids=_name)
def straight(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Trainer]:
    """4 eager steps, checkpoints at 2 and 4."""
    arch = request.param
    t = _run(tmp_path_factory.mktemp(_name(arch)), "a", arch, "run.max_steps=4")
    t.train()
    return arch, t


def test_trains_and_resumes_bitwise(straight: tuple[str, Trainer]) -> None:
    arch, a = straight
    tmp = a.run_dir.parent
    assert a.step == 4 and a.pair.online.encoder.arch == arch
    _run(tmp, "b", arch, "run.max_steps=2").train()
    b = resume_run(str(tmp / "b"), ["run.max_steps=4"])
    b.train()
    want, got = a.pair.state_dict(), b.pair.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_kernels_on_equal_kernels_off(straight: tuple[str, Trainer]) -> None:
    """Two steps, each from the reference run's state: the fused loss and the flat-buffer update (Triton
    interpreter: LARS+EMA in one pass, or AdamW then the EMA kernel) give its parameters, target and optimizer
    state to fp32 rounding."""
    arch, _ = straight
    tmp = straight[1].run_dir.parent
    off, on = (_run(tmp, f"k{k}", arch, f"run.kernels={k}", "run.max_steps=2") for k in ("off", "on"))
    assert on.kernels and not off.kernels
    assert type(on.updater).__name__ == ("FlatEmaUpdate" if arch in OPTIM else "FlatUpdate")
    batches = off.source.batches(0, off.batch_size, 2)
    for _ in range(2):
        step_from_the_same_state(off, on, next(batches))
        want, got = off.pair.state_dict(), on.pair.state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(on.optimizer.state_dict()["state"], off.optimizer.state_dict()["state"],
                                   rtol=1e-4, atol=1e-6)


def test_the_step_traces_whole(straight: tuple[str, Trainer]) -> None:
    """Forward of both views through online and target, the loss and the probe: one graph, no break."""
    from fastbyol.step.methods import Byol
    from fastbyol.step.train_step import forward_loss

    _, t = straight
    views = [torch.randn(4, 3, SIZE, SIZE) for _ in range(2)]
    explanation = torch._dynamo.explain(forward_loss)(t.pair, *views, torch.arange(4), False, Byol().loss)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_export_loads_into_timm_with_only_the_classifier_missing(straight: tuple[str, Trainer]) -> None:
    arch, t = straight
    paths = export_checkpoint(str(t.run_dir), str(t.run_dir / "export" / "encoder"))
    state = torch.load(paths[0])
    kwargs = {"img_size": SIZE} if "vit" in arch else {}
    full = timm.create_model(_name(arch), pretrained=False, **kwargs)
    missing, unexpected = full.load_state_dict(state, strict=False)
    classifier = {k for k in full.state_dict() if k.startswith(full.default_cfg["classifier"])}
    assert set(missing) == classifier and classifier and not unexpected
    trunk = timm.create_model(_name(arch), pretrained=False, num_classes=0, **kwargs)
    trunk.load_state_dict(state)
    encoder, _ = encoder_from_checkpoint(str(t.run_dir))
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trunk.eval()(x), encoder.eval()(x))


def test_flops_are_counted(straight: tuple[str, Trainer]) -> None:
    """The FLOP counter sees a timm model's convolutions, matmuls and attention (ViT-Ti/16 at 224 px: 2.5
    GFLOP forward, timm's 1.26 GMACs)."""
    arch, t = straight
    assert t.gflop_per_image is not None and t.gflop_per_image > 0
    if "vit" in arch:
        cfg = build_config("smoke", overrides=[f"model.arch={arch}", "data.image_size=224"])
        # BYOL per image: online forward + backward (3 forwards) and target forward, for both views; less the
        # patch embedding's input gradient, plus the heads (measured 19.94 against 8 x 2.507 = 20.06).
        assert 0.97 * 8 * 2.507 < gflop_per_image(cfg, 224) < 1.03 * 8 * 2.507


def test_vit_excludes_norms_biases_and_tokens_from_weight_decay() -> None:
    cfg = build_config("smoke", overrides=["model.arch=timm:vit_tiny_patch16_224", f"data.image_size={SIZE}"])
    from fastbyol.model.backbone import Encoder

    net = Encoder.from_config(cfg.model).net
    adapted, excluded = (g["params"] for g in lars_param_groups(net.named_modules()))
    names = {id(p): n for n, p in net.named_parameters()}
    excluded_names = {names[id(p)] for p in excluded}  # type: ignore[attr-defined]
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias"} <= excluded_names
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in adapted)  # type: ignore[attr-defined]


def test_config_names_the_fix() -> None:
    cfg = build_config("smoke", overrides=["model.arch=timm:vit_tiny_patch16_224", "data.image_size=48",
                                           "model.timm_kwargs.drop_path_rate=0.1"])
    assert cfg.model.image_size == 48 and cfg.model.timm_kwargs == {"drop_path_rate": 0.1}
    with pytest.raises(ConfigError, match="did you mean timm:vit_tiny_patch16_224"):
        build_config("smoke", overrides=["model.arch=timm:vit_tiny_patch16_22"])
    with pytest.raises(ConfigError, match="small_stem=true is for the torchvision ResNets"):
        build_config("smoke", overrides=["model.arch=timm:resnet50", "model.small_stem=true"])
    with pytest.raises(ConfigError, match="not a timm model"):
        build_config("smoke", overrides=["model.timm_kwargs.drop_path_rate=0.1"])
    with pytest.raises(ConfigError, match="timm:<name>"):
        build_config("smoke", overrides=["model.arch=vit_tiny"])


def test_adamw_leaves_the_excluded_group_undecayed(straight: tuple[str, Trainer]) -> None:
    arch, t = straight
    if arch not in OPTIM:
        assert isinstance(t.optimizer, torch.optim.Optimizer) and "eta" in t.optimizer.param_groups[0]
        return
    assert isinstance(t.optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.1, 0.0]
    assert t.optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_adamw_refusals_name_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"run.nonfinite=skip restores a momentum optimizer's state \(lars, sgd\) "
                                          "only; with optim.name=adamw use run.nonfinite=stop"):
        build_config("smoke", overrides=["optim.name=adamw", "run.nonfinite=skip"])
    for name in ("adamw", "sgd"):
        with pytest.raises(ConfigError, match=rf"optim.name={name} does not run under run.engine=deepspeed yet "
                                              r"\(ZeRO runs lars\)"):
            build_config("smoke", overrides=[f"optim.name={name}", "run.engine=deepspeed"])
    with pytest.raises(ConfigError, match="optim.name='lamb' is not allowed"):
        build_config("smoke", overrides=["optim.name=lamb"])
    assert build_config("smoke", overrides=["optim.name=sgd", "run.nonfinite=skip"]).optim.name == "sgd"


def test_one_optimizer_table() -> None:
    """The config's Literal, its traits table and the engine's builders name the same optimizers."""
    import typing

    from fastbyol.config import OptimizerName
    from fastbyol.config_traits import OPTIMIZERS
    from fastbyol.engine.update import OPTIMIZER_BUILDERS

    assert list(typing.get_args(OptimizerName)) == list(OPTIMIZERS) == list(OPTIMIZER_BUILDERS)


def test_sgd_decays_the_weights_only_and_keeps_its_momentum() -> None:
    """optim.name=sgd: torch's SGD over the same groups as LARS, weight decay on the adapted group only, the
    configured momentum, and the predictor's lr multiple kept on its groups."""
    from fastbyol.engine.update import build_optimizer
    from fastbyol.step.methods import build_method

    cfg = build_config("smoke", overrides=["optim.name=sgd", "optim.weight_decay=5e-4", "optim.momentum=0.8",
                                           "byol.predictor_lr_mult=10", "model.proj_hidden=16", "model.proj_dim=8"])
    method = build_method(cfg)
    opt = build_optimizer(cfg, method.param_groups(method.network(cfg, seed=0)), torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD)
    assert [(g["weight_decay"], g["lr_mult"]) for g in opt.param_groups] == [
        (5e-4, 1.0), (0.0, 1.0), (5e-4, 10.0), (0.0, 10.0)]
    assert all(g["momentum"] == 0.8 and not g["nesterov"] and g["dampening"] == 0 for g in opt.param_groups)


def test_compiled_vit_trains_like_eager(tmp_path: Path) -> None:
    """Inductor on the CPU (fullgraph, the fused loss and AdamW with the EMA kernel in the run): 2 steps of the
    ViT agree with eager to fp32 rounding."""
    arch = "timm:vit_tiny_patch16_224"
    runs = {}
    for mode in ("off", "default"):
        t = _run(tmp_path, mode, arch, f"run.compile={mode}", "run.kernels=on", "run.max_steps=2",
                 "model.timm_kwargs.depth=2")
        assert t.compile_mode == mode
        t.train()
        runs[mode] = t
    eager, compiled = runs["off"].pair.state_dict(), runs["default"].pair.state_dict()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=1e-4, msg=name)


def test_cross_replica_batchnorm_takes_batchnorm_leaves_layernorm_and_refuses_fused_ones() -> None:
    from fastbyol.errors import FastByolError
    from fastbyol.model.backbone import Encoder
    from fastbyol.model.syncbn import GlobalBatchNorm, convert_global_batchnorm

    def norms(arch: str) -> dict[str, int]:
        encoder = convert_global_batchnorm(Encoder(arch, image_size=SIZE))
        counts: dict[str, int] = {}
        for m in encoder.modules():
            if "Norm" in type(m).__name__:
                counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
        return counts

    assert set(norms("timm:resnet50")) == {GlobalBatchNorm.__name__}
    assert set(norms("timm:vit_tiny_patch16_224")) == {"LayerNorm"}
    with pytest.raises(FastByolError, match="BatchNormAct2d .* cannot replace"):
        norms("timm:efficientnet_b0")
