"""The compiled step: forward + loss trace whole (fullgraph) with the fused kernels in them, the fused
optimizer + EMA traces whole too, and a compiled run trains like an eager one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastbyol.kernels.flat_lars import FlatLARS, optimizer_ema_step_fused
from fastbyol.kernels.losses import FUSED_LOSSES

from fastbyol.config_parse import build_config
from fastbyol.engine.compile import resolve_compile
from fastbyol.engine.trainer import start_run
from fastbyol.errors import FastByolError
from fastbyol.model.byol import ByolPair
from fastbyol.step.lars import lars_param_groups
from fastbyol.step.methods import Byol, Simclr
from fastbyol.step.train_step import REFERENCE_LOSSES, forward_loss
from fastbyol.telemetry.sinks import read_metrics

SMALL = ["model.proj_hidden=32", "model.proj_dim=16", "model.small_stem=true", "model.online_probe=true"]


def _pair() -> ByolPair:
    cfg = build_config("smoke", overrides=SMALL)
    pair = ByolPair(cfg.model, seed=0, probe_classes=5).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return pair.train()


@pytest.mark.parametrize("fused_loss", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_forward_and_loss_have_no_graph_break(fused_loss: bool, bf16: bool) -> None:
    """Both views through online and target, the (fused) loss, the probe, bf16 autocast: one graph."""
    pair = _pair()
    views = [torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3])
    losses = FUSED_LOSSES if fused_loss else REFERENCE_LOSSES
    explanation = torch._dynamo.explain(forward_loss)(pair, *views, labels, bf16, Byol(losses).loss)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("fused_loss", [False, True])
def test_simclr_forward_and_nt_xent_have_no_graph_break(fused_loss: bool) -> None:
    """method=simclr with one process: the network over both views, NT-Xent (reference or the fused custom
    op, its indices made on the device), the probe: one graph."""
    from fastbyol.model.simclr import SimclrNet

    cfg = build_config("smoke", overrides=[*SMALL, "method=simclr", "simclr.proj_hidden=32", "simclr.proj_dim=16"])
    net = SimclrNet(cfg.model, cfg.simclr, seed=0, probe_classes=5).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    views = [torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    method = Simclr(0.5, FUSED_LOSSES if fused_loss else REFERENCE_LOSSES)
    explanation = torch._dynamo.explain(forward_loss)(net.train(), *views, torch.tensor([0, 1, 2, 3]), False,
                                                      method.loss)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_fused_optimizer_and_ema_have_no_graph_break() -> None:
    pair = _pair()
    online_flat, target_flat = pair.flatten_pairs_()
    groups = lars_param_groups(n for m in pair.online_modules() for n in m.named_modules())
    optimizer = FlatLARS(groups, online_flat, weight_decay=1e-6, momentum=0.9, eta=1e-3)
    optimizer.grad_flat.normal_()
    tau = torch.zeros(1)

    def update(lr: torch.Tensor) -> None:
        optimizer.lr_buf.copy_(lr)
        optimizer.step_with_ema(target_flat, tau)

    explanation = torch._dynamo.explain(update)(torch.tensor([0.1]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    before = target_flat.clone()
    optimizer_ema_step_fused(optimizer, 0.1, target_flat, tau.fill_(0.5))  # the loop's call, eagerly
    assert not torch.equal(before, target_flat)


def test_compiled_run_trains_like_eager(tmp_path: Path) -> None:
    """Inductor on the CPU (fullgraph, with the fused loss op and flat LARS+EMA kernels in the run):
    3 steps of the tiny smoke run agree with eager to fp32 rounding."""
    tiny = [*SMALL, "data.num_images=64", "optim.batch_size=4", "data.image_size=16", "data.workers=0",
            "run.progress=off", "run.max_steps=3", "run.log_every=1", "run.kernels=on"]
    runs = {}
    for mode in ("off", "default"):
        t = start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={mode}",
                                                        f"run.compile={mode}", *tiny]))
        assert t.compile_mode == mode
        t.train()
        runs[mode] = t
    rows = {m: read_metrics(tmp_path / m / "metrics.jsonl") for m in runs}
    for a, b in zip(rows["off"], rows["default"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and abs(a["probe_loss"] - b["probe_loss"]) <= 1e-4, (a, b)
    eager, compiled = runs["off"].pair.state_dict(), runs["default"].pair.state_dict()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=1e-4, msg=name)


def test_compile_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu) == "off" and resolve_compile("auto", cuda) == "default"
    assert resolve_compile("reduce-overhead", cuda) == "reduce-overhead"
    with pytest.raises(FastByolError, match="reduce-overhead uses CUDA graphs"):
        resolve_compile("reduce-overhead", cpu)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FastByolError, match="needs a C.. compiler"):
        resolve_compile("default", cpu)
    with pytest.raises(FastByolError, match="run.compile"):
        build_config("smoke", overrides=["run.compile=fast"])


@pytest.mark.parametrize("network_only", [False, True])
def test_reduce_overhead_forward_keeps_metrics_past_the_next_graph_replay(monkeypatch: pytest.MonkeyPatch,
                                                                         network_only: bool) -> None:
    """A CUDA graph replays into the same output memory: stand in for one with a 'compiled' function that writes
    every result into one static buffer. The metrics of a micro-step must survive the next call (the meter sums
    them across steps, the guard reads them after the optimizer), and each call must start a graph step."""
    from fastbyol.engine import compile as compile_mod
    from fastbyol.step.train_step import MicroStepOut

    static = torch.zeros(4)
    calls = {"mark": 0}

    def fake_compile(fn: object, **kwargs: object) -> object:
        def replay(*args: object) -> object:
            static.add_(1.0)  # the replay overwrites its outputs in place
            if network_only:
                return static  # network outputs, handed to the eager loss below
            return static[0], MicroStepOut(static[0], static[1], None, None)
        return replay

    def fake_loss(outputs: torch.Tensor, labels: object, loss_fn: object) -> object:
        return outputs[0], MicroStepOut(outputs[0], outputs[1], None, None)

    monkeypatch.setattr(compile_mod.torch, "compile", fake_compile)
    monkeypatch.setattr(compile_mod, "loss_from_outputs", fake_loss)
    monkeypatch.setattr(compile_mod.torch.compiler, "cudagraph_mark_step_begin",
                        lambda: calls.__setitem__("mark", calls["mark"] + 1))
    forward = compile_mod.compiled_forward("reduce-overhead", network_only=network_only)
    view = torch.zeros(1)
    _, first = forward(None, view, view, None, False, Byol().loss)
    _, second = forward(None, view, view, None, False, Byol().loss)
    assert calls["mark"] == 2
    assert (first.loss.item(), first.proj_std.item(), second.loss.item()) == (1.0, 1.0, 2.0)
    assert first.probe_loss is None
    # The default mode keeps torch.compile's outputs as they are (no copies, no graph steps).
    _, out = compile_mod.compiled_forward("default", network_only=network_only)(None, view, view, None, False, False)
    assert calls["mark"] == 2 and out.loss.data_ptr() == static.data_ptr()
