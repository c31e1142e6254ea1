"""The whole loop on the CPU: smoke run, exact resume, accumulation, collapse monitor."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fastbyol.config_parse import build_config
from fastbyol.engine import checkpoint
from fastbyol.engine.trainer import TIMING_FIELDS, Trainer, resume_run, start_run
from fastbyol.telemetry.sinks import read_metrics

# A few-second config: ResNet-18 with the small-image stem, 8-image batches of 16 px procedural images.
TINY = ["data.num_images=64", "optim.batch_size=8", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=true", "data.image_size=16",
        "data.workers=0", "run.progress=off", "optim.warmup_epochs=0.25", "run.epochs=2"]


def _cfg(tmp_path: Path, name: str, extra: list[str]) -> Any:
    return build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={name}", *TINY, *extra])


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.pair.state_dict().items()}


def _deterministic(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def test_smoke_preset_trains_without_collapse(tmp_path: Path) -> None:
    cfg = build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=smoke", "run.progress=off"])
    t0 = time.perf_counter()
    trainer = start_run(cfg)
    summary = trainer.train()
    wall = time.perf_counter() - t0
    run_dir = tmp_path / "smoke"
    assert (run_dir / "config.yaml").is_file()
    assert checkpoint.list_checkpoints(run_dir / "checkpoints")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert summary["step"] == trainer.total_steps == 16 and rows[-1]["step"] == 16
    assert set(rows[0]) >= {"step", "epoch", "loss", "lr", "tau", "img_per_s", "data_wait_frac", "proj_std"}
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first, f"loss did not decrease: {first} -> {last}"
    # Collapse would drive the spread of normalised projections to 0; uniform spread is 1/sqrt(D).
    uniform = rows[0]["proj_std_uniform"]
    assert min(r["proj_std"] for r in rows) > 0.2 * uniform, rows
    assert rows[-1]["epoch"] == pytest.approx(1.0)
    print(f"smoke: {wall:.1f} s wall, loss {first:.3f} -> {last:.3f}, proj_std {rows[-1]['proj_std']:.4f}")


def test_resume_is_bitwise_identical(tmp_path: Path) -> None:
    n = 3
    straight = start_run(_cfg(tmp_path, "straight", [f"run.max_steps={2 * n}", "run.log_every=1",
                                                     f"run.ckpt_every={n}"]))
    straight.train()
    split = start_run(_cfg(tmp_path, "split", [f"run.max_steps={n}", "run.log_every=1", "run.ckpt_every=2"]))
    split.train()
    del split
    resumed = resume_run(str(tmp_path / "split"), [f"run.max_steps={2 * n}"])
    assert resumed.step == n and resumed.position == n * 8
    resumed.train()
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    for pa, pb in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    rows_a = _deterministic(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    rows_b = _deterministic(read_metrics(tmp_path / "split" / "metrics.jsonl"))
    assert rows_a == rows_b and len(rows_a) == 2 * n


def test_resume_mid_interval_drops_stale_rows_and_keeps_metrics_identical(tmp_path: Path) -> None:
    """Checkpoint at step 3, inside a 2-step log interval; the killed run went on to log step 4 (a
    row the resumed run must drop and write again from the same numbers)."""
    straight = start_run(_cfg(tmp_path, "a", ["run.max_steps=6", "run.log_every=2", "run.ckpt_every=100"]))
    straight.train()
    killed = start_run(_cfg(tmp_path, "b", ["run.max_steps=5", "run.log_every=2", "run.ckpt_every=3"]))
    killed.train()
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [2, 4]
    resumed = resume_run(str(tmp_path / "b" / "checkpoints" / "ckpt-00000003.pt"), ["run.max_steps=6"])
    resumed.train()
    assert _deterministic(read_metrics(tmp_path / "a" / "metrics.jsonl")) == _deterministic(
        read_metrics(tmp_path / "b" / "metrics.jsonl"))
    b = _params(resumed)
    for k, v in _params(straight).items():
        assert torch.equal(v, b[k]), k


def test_ema_once_per_optimizer_step_under_accumulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastbyol.engine import update as update_mod

    calls: list[float] = []
    real = update_mod.target_step

    def counting(online: list[torch.Tensor], target: list[torch.Tensor], tau: float) -> None:
        calls.append(tau)
        real(online, target, tau)

    monkeypatch.setattr(update_mod, "target_step", counting)
    t = start_run(_cfg(tmp_path, "accum", ["optim.accum_steps=4", "run.max_steps=3"]))
    t.train()
    assert len(calls) == 3 and calls == [float(x) for x in t.tau[:3]]
    assert t.position == 3 * 8


@pytest.mark.parametrize("optim", ["lars", "sgd", "adamw"])
def test_predictor_lr_mult_scales_the_predictor_step_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          optim: str) -> None:
    """byol.predictor_lr_mult=10: from the same weights and gradients, the predictor moves 10x as far, the
    rest exactly as far, with each optimizer (a first step of each is linear in its lr, weight decay
    included); the fused LARS kernel (one lr for all) is refused with the fix."""
    from fastbyol.errors import FastByolError
    from fastbyol.step.train_step import optimizer_step

    moves = {}
    start: dict[str, torch.Tensor] = {}
    for mult in (1.0, 10.0):
        t = start_run(_cfg(tmp_path, f"mult{mult:g}", ["run.max_steps=1", f"byol.predictor_lr_mult={mult}",
                                                        f"optim.name={optim}"]))
        if not start:
            start = _params(t)
        t.pair.load_state_dict(start)
        t.optimizer.state.clear()  # fresh momentum: the step is lr x the trust-scaled gradient
        named = {n: p for n, p in t.pair.named_parameters() if p.requires_grad and not n.startswith("target")}
        g = torch.Generator().manual_seed(1)
        for p in named.values():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer_step(t.optimizer, 5.0)  # moves of ~1e-4, far above float32 rounding
        moves[mult] = {n: p.detach() - start[n] for n, p in named.items()}
    assert any(n.startswith("predictor") for n in moves[1.0]) and any(n.startswith("online") for n in moves[1.0])
    for name, move in moves[1.0].items():
        want = move * 10 if name.startswith("predictor") else move
        torch.testing.assert_close(moves[10.0][name], want, rtol=1e-3, atol=5e-7)
    if optim != "lars":
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(FastByolError, match="predictor_lr_mult=10.0 needs the per-tensor LARS: set run.kernels=off"):
        start_run(_cfg(tmp_path, "fused", ["run.max_steps=1", "byol.predictor_lr_mult=10", "run.kernels=on"]))


def test_accumulated_gradient_equals_full_batch_mean(tmp_path: Path) -> None:
    """Micro-batch gradients scaled by 1/accum add up to the mean of the micro-batch gradients
    (BatchNorm statistics stay per micro-batch, as with any accumulation)."""
    from fastbyol.data.views import Views
    from fastbyol.step.train_step import forward_backward

    t = start_run(_cfg(tmp_path, "g", ["run.max_steps=1"]))
    g = torch.Generator().manual_seed(0)
    views = [Views(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g))
             for _ in range(2)]
    weight = t.pair.predictor[0].weight
    grads = []
    for v in views:
        t.pair.zero_grad(set_to_none=True)
        forward_backward(t.pair, v, None, 1.0, bf16=False, loss_fn=t.method.loss)
        grads.append(weight.grad.clone())
    t.pair.zero_grad(set_to_none=True)
    for v in views:
        forward_backward(t.pair, v, None, 0.5, bf16=False, loss_fn=t.method.loss)
    torch.testing.assert_close(weight.grad, (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", [["run.precision=bf16"], ["model.channels_last=on"]])
def test_bf16_and_channels_last_paths_run_on_cpu(tmp_path: Path, extra: list[str]) -> None:
    """The CUDA defaults (bf16 autocast, channels-last) taken explicitly on the CPU for one step."""
    t = start_run(_cfg(tmp_path, "p", ["run.max_steps=1", "run.log_every=1", "optim.batch_size=4", *extra]))
    t.train()
    rows = read_metrics(tmp_path / "p" / "metrics.jsonl")
    assert len(rows) == 1 and 0 < rows[0]["loss"] < 8
    if "model.channels_last=on" in extra:
        w = t.pair.online.encoder.net.conv1.weight
        assert w.is_contiguous(memory_format=torch.channels_last)


def test_online_probe_learns_without_touching_the_encoder_gradient(tmp_path: Path) -> None:
    """The probe (official: classifier on stop_gradient(embedding)) is logged, and its loss changes no
    encoder gradient: the same batch gives the same encoder grads with the probe on and off."""
    t = start_run(_cfg(tmp_path, "probe", ["model.online_probe=true", "run.max_steps=4", "run.log_every=2"]))
    t.train()
    rows = read_metrics(tmp_path / "probe" / "metrics.jsonl")
    assert all("probe_loss" in r and 0 <= r["probe_top1"] <= 100 for r in rows)
    assert t.pair.probe is not None and t.pair.probe.out_features == 8
    assert any(p is t.pair.probe.weight for g in t.optimizer.param_groups for p in g["params"])

    from fastbyol.data.views import Views
    from fastbyol.step.train_step import forward_backward

    g = torch.Generator().manual_seed(0)
    views = Views(torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g))
    labels = torch.tensor([0, 1, 2, 3])
    conv = t.pair.online.encoder.net.conv1.weight
    state = {k: v.clone() for k, v in t.pair.state_dict().items()}
    t.pair.zero_grad(set_to_none=True)
    out = forward_backward(t.pair, views, labels, 1.0, bf16=False, loss_fn=t.method.loss)
    with_probe = conv.grad.clone()
    assert out.probe_loss is not None and t.pair.probe.weight.grad is not None
    t.pair.load_state_dict(state)  # BatchNorm running stats moved: restore them
    probe, t.pair.probe = t.pair.probe, None
    t.pair.zero_grad(set_to_none=True)
    forward_backward(t.pair, views, None, 1.0, bf16=False, loss_fn=t.method.loss)
    t.pair.probe = probe
    torch.testing.assert_close(conv.grad, with_probe, rtol=0, atol=0)


def test_synthetic_on_device_source(tmp_path: Path) -> None:
    """The throughput source: random tensors made once on the device, the same every step, no labels."""
    t = start_run(_cfg(tmp_path, "syn", ["data.source=synthetic", "run.max_steps=2", "run.log_every=1"]))
    assert t.source.kind == "synthetic" and t.images_per_epoch == 64
    batches = list(t.source.batches(0, 4, 2))
    assert batches[0].views.view1 is batches[1].views.view1 and batches[0].labels is None
    assert batches[0].views.view1.shape == (4, 3, 16, 16)
    t.train()
    assert len(read_metrics(tmp_path / "syn" / "metrics.jsonl")) == 2
    from fastbyol.config_checks import ConfigError

    with pytest.raises(ConfigError, match="online_probe=true needs labelled data"):
        _cfg(tmp_path, "syn2", ["data.source=synthetic", "model.online_probe=true"])
