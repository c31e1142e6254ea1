"""The kernels path of the training step: flat parameter buffers, fused loss and EMA, equal to the
reference path over 20 CPU steps (Triton interpreter; conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastbyol.config import build_config
from fastbyol.engine.trainer import start_run, use_kernels
from fastbyol.errors import FastByolError
from fastbyol.model.flat import flatten_params_
from fastbyol.telemetry.sinks import read_metrics

TINY = ["data.num_images=64", "optim.batch_size=4", "model.proj_hidden=32", "model.proj_dim=16",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off", "run.epochs=2",
        "optim.warmup_epochs=0.25", "run.max_steps=20", "run.log_every=1", "run.ckpt_every=100"]


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


def test_kernels_on_equals_kernels_off_over_20_steps(tmp_path: Path) -> None:
    """Rounding differs (the kernels accumulate in another order), and batch-4 BatchNorm plus LARS amplify
    it step by step: measured, the loss rows agree to 1e-6 for 8 steps and to 2e-3 after 20, the largest
    parameter difference after 20 steps is 9.5e-4. The bounds below sit just above those."""
    runs = {}
    for kernels in ("off", "on"):
        t = start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={kernels}",
                                                        f"run.kernels={kernels}", *TINY]))
        assert t.kernels == (kernels == "on")
        t.train()
        runs[kernels] = t
    losses = {k: [r["loss"] for r in read_metrics(tmp_path / k / "metrics.jsonl")] for k in runs}
    assert len(losses["on"]) == 20
    for step, (a, b) in enumerate(zip(losses["off"], losses["on"])):
        assert abs(a - b) <= (1e-5 if step < 8 else 5e-3), (step, a, b)
    off, on = runs["off"].pair.state_dict(), runs["on"].pair.state_dict()
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=0, atol=5e-3, msg=name)
    # On the kernels path the target parameters live in the flat buffer the EMA kernel writes.
    _, target = runs["on"].pair.param_pairs()
    assert target[0].untyped_storage().data_ptr() == runs["on"].target_flat.untyped_storage().data_ptr()


def test_kernels_on_without_gpu_or_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(FastByolError, match="run.kernels=on needs a CUDA GPU"):
        use_kernels("on", torch.device("cpu"))
    assert use_kernels("auto", torch.device("cpu")) is False


def test_resume_with_kernels_is_bitwise(tmp_path: Path) -> None:
    """Checkpoints of flat-buffer parameters load back into the buffers: 2 + 2 steps equal 4 straight."""
    from fastbyol.engine.trainer import resume_run

    base = [*TINY, "run.kernels=on", "run.ckpt_every=2"]
    straight = start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=a", *base,
                                                          "run.max_steps=4"]))
    straight.train()
    start_run(build_config("smoke", overrides=[f"run.out_dir={tmp_path}", "run.name=b", *base,
                                               "run.max_steps=2"])).train()
    resumed = resume_run(str(tmp_path / "b"), ["run.max_steps=4"])
    assert resumed.kernels
    resumed.train()
    a, b = straight.pair.state_dict(), resumed.pair.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, target = resumed.pair.param_pairs()
    assert target[0].untyped_storage().data_ptr() == resumed.target_flat.untyped_storage().data_ptr()
