"""The kernels path of the training step: flat parameter buffers, fused loss and EMA, equal to the
reference path over 6 CPU steps (Triton interpreter; conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastbyol.kernels.flat_lars import FlatLARS
from torch import nn
from twin_steps import step_from_the_same_state

from fastbyol.config_parse import build_config
from fastbyol.engine.trainer import start_run, use_kernels
from fastbyol.errors import FastByolError
from fastbyol.model.flat import flatten_params_
from fastbyol.telemetry.sinks import read_metrics

TINY = ["data.num_images=64", "optim.batch_size=4", "model.proj_hidden=32", "model.proj_dim=16",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off", "run.epochs=2",
        "optim.warmup_epochs=0.25", "run.max_steps=10", "run.log_every=1", "run.ckpt_every=100"]
# 6 steps (the warm-up's 4 and 2 after it): the interpreted kernels cost ~5-10 s a step on a 2-core CPU (20 steps
# were 3.3 min per test, 10 steps 100 s on a busy machine).
STEPS = 6


def test_flat_buffer_views_keep_values_shapes_and_strides() -> None:
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    lin = nn.Linear(5, 4)
    params = [conv.weight, conv.bias, lin.weight, lin.bias]
    before = [(p.detach().clone(), p.stride()) for p in params]
    flat = flatten_params_(params)
    assert flat.numel() == sum(p.numel() for p in params)
    for p, (value, stride) in zip(params, before):
        assert torch.equal(p, value) and p.stride() == stride
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat.zero_()  # writing the buffer writes the parameters
    assert all(torch.count_nonzero(p) == 0 for p in params)
    lin.load_state_dict({"weight": torch.ones(4, 5), "bias": torch.ones(4)})  # and loading writes the buffer
    assert float(flat.sum()) == 24.0


def test_kernels_on_equals_kernels_off_step_by_step(tmp_path: Path) -> None:
    """6 steps, each from the same state on both paths (fused loss + flat LARS+EMA kernels vs the PyTorch
    reference): every step's loss, parameters, target and momentum agree to fp32 rounding. After each
    step the kernels run is reset to the reference's state, so differences cannot compound."""
    runs = {k: start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={k}",
                                                          f"run.kernels={k}", *TINY]))
            for k in ("off", "on")}
    off, on = runs["off"], runs["on"]
    assert on.kernels and not off.kernels and isinstance(on.optimizer, FlatLARS)
    batches = off.source.batches(0, off.batch_size, STEPS)
    worst = {"loss": 0.0, "params": 0.0, "momentum": 0.0}
    for _ in range(STEPS):
        step_from_the_same_state(off, on, next(batches))
        worst["loss"] = max(worst["loss"], abs(off.meter.means()["loss"] - on.meter.means()["loss"]))
        a, b = off.pair.state_dict(), on.pair.state_dict()
        worst["params"] = max(worst["params"], max(float((a[k] - b[k]).abs().max()) for k in a))
        ma, mb = off.optimizer.state_dict()["state"], on.optimizer.state_dict()["state"]
        worst["momentum"] = max(worst["momentum"], max(float((ma[i]["momentum_buffer"] - mb[i]["momentum_buffer"])
                                                             .abs().max()) for i in ma))
    assert worst["loss"] <= 1e-5 and worst["params"] <= 1e-5 and worst["momentum"] <= 1e-5, worst
    # On the kernels path the parameters, grads, momentum and target live in the flat buffers.
    online, target = on.pair.param_pairs()
    assert target[0].untyped_storage().data_ptr() == on.updater.target_flat.untyped_storage().data_ptr()
    assert online[0].grad is not None
    assert online[0].grad.untyped_storage().data_ptr() == on.optimizer.grad_flat.untyped_storage().data_ptr()
    predictor = next(on.pair.predictor.parameters())
    assert predictor.untyped_storage().data_ptr() == on.updater.online_flat.untyped_storage().data_ptr()


def test_kernels_on_follows_kernels_off_over_5_free_steps(tmp_path: Path) -> None:
    """The two paths left to run free. Rounding differs (the kernels sum in another order) and batch-4
    BatchNorm plus LARS amplify it step by step, the faster since the smoke preset's ResNet-18 is the official
    one (no zero-initialised residual BN, issue 30): measured on the 2-core CPU, the loss rows (~4.1) differ
    relatively by 7e-8, 1e-7, 3e-7, 2.7e-6 and 7.7e-6 over the first 5 steps, then 8e-4 at step 6 and 3% at
    step 10; on CI's machine step 5 was already 5.1e-5 apart. So the first 3 steps are held to 3e-5 of the loss
    and steps 4 and 5 to 1e-3 (a bug shows at the first steps, as the step-by-step test above pins from equal
    states)."""
    losses = {}
    for kernels in ("off", "on"):
        t = start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={kernels}",
                                                        f"run.kernels={kernels}", *TINY, "run.max_steps=5"]))
        t.train()
        losses[kernels] = [r["loss"] for r in read_metrics(tmp_path / kernels / "metrics.jsonl")]
    assert len(losses["on"]) == 5
    for step, (a, b) in enumerate(zip(losses["off"], losses["on"])):
        assert abs(a - b) <= (3e-5 if step < 3 else 1e-3) * abs(a), (step, a, b)


def test_kernels_on_without_gpu_or_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(FastByolError, match="run.kernels=on needs a CUDA GPU"):
        use_kernels("on", torch.device("cpu"))
    assert use_kernels("auto", torch.device("cpu")) is False


def test_kernels_auto_leaves_the_kernels_on_unless_the_fused_optimizer_meets_a_predictor_multiple() -> None:
    """run.kernels=auto on a GPU: a predictor at 10x the lr turns the kernels off only with the optimizer fused
    with the EMA (LARS: one lr for all); with SGD or AdamW the kernels do the EMA alone and keep the groups' lr."""
    from fastbyol.config_parse import build_config
    from fastbyol.engine.trainer import kernels_misfit

    def misfit(*overrides: str) -> str | None:
        return kernels_misfit(build_config("smoke", overrides=list(overrides)))

    assert misfit() is None and misfit("optim.name=sgd") is None
    assert misfit("byol.predictor_lr_mult=10", "optim.name=sgd") is None
    assert misfit("byol.predictor_lr_mult=10", "optim.name=adamw") is None
    why = misfit("byol.predictor_lr_mult=10")
    assert why is not None and why.startswith("byol.predictor_lr_mult=10.0: the Triton kernels are off")
    assert misfit("byol.predictor_lr_mult=10", "method=simclr") is None  # SimCLR has no predictor


def test_resume_with_kernels_is_bitwise(tmp_path: Path) -> None:
    """Checkpoints of flat-buffer parameters (and LARS's momentum, non-zero after one step) load back into the
    buffers: 1 + 1 steps equal 2 straight (the interpreted kernels cost ~10 s a step here)."""
    from fastbyol.engine.trainer import resume_run

    base = [*TINY, "run.kernels=on", "run.ckpt_every=1"]
    straight = start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=a", *base,
                                                          "run.max_steps=2"]))
    straight.train()
    start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=b", *base,
                                               "run.max_steps=1"])).train()
    resumed = resume_run(str(tmp_path / "b"), ["run.max_steps=2"])
    assert resumed.kernels
    resumed.train()
    a, b = straight.pair.state_dict(), resumed.pair.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, target = resumed.pair.param_pairs()
    assert target[0].untyped_storage().data_ptr() == resumed.updater.target_flat.untyped_storage().data_ptr()
