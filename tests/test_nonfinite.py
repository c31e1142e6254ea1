"""A NaN injected into one step's loss (issue 8): with run.nonfinite=skip the run completes, the step is
counted and left no trace in the weights, momentum or BatchNorm statistics; with stop the run ends with a
diagnostic and the last good checkpoint is intact."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fastbyol.cli import main
from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.engine import checkpoint
from fastbyol.engine.trainer import NonFiniteStop, Trainer, start_run
from fastbyol.telemetry.sinks import read_metrics

TINY = ["data.num_images=64", "optim.batch_size=8", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off",
        "optim.warmup_epochs=0.25", "run.epochs=2", "run.telemetry=off", "run.keep_last=50"]


def _poison(trainer: Trainer, bad_step: int) -> None:
    """Make the loss of optimizer step ``bad_step`` (counted from 1) NaN, as an fp16 overflow or a bad
    batch would: the metric and the loss that is backpropagated."""
    forward, calls = trainer.forward, [0]

    def poisoned(*args: Any) -> Any:
        total, out = forward(*args)
        calls[0] += 1
        if calls[0] == bad_step:
            nan = torch.tensor(float("nan"), device=total.device)
            total, out = total * nan, out._replace(loss=out.loss * nan)
        return total, out

    trainer.forward = poisoned


def _state(run_dir: Path, step: int) -> dict[str, Any]:
    return checkpoint.load(run_dir / "checkpoints" / checkpoint.checkpoint_name(step))


@pytest.mark.parametrize(("kernels", "optim"), [("off", "lars"), ("on", "lars"), ("off", "sgd")])
def test_skip_leaves_no_trace_and_counts_the_step(tmp_path: Path, kernels: str, optim: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [f"run.out_dir={tmp_path}", "run.name=skip", *TINY, "run.nonfinite=skip", "run.max_steps=4",
                 "run.ckpt_every=1", "run.log_every=4", f"run.kernels={kernels}", f"optim.name={optim}"]
    trainer = start_run(build_config("smoke", overrides=overrides))
    _poison(trainer, 3)
    assert trainer.train()["step"] == 4
    run_dir = tmp_path / "skip"
    before, after = _state(run_dir, 2), _state(run_dir, 3)
    for name, value in before["model"].items():  # weights, target and BatchNorm statistics untouched
        assert value.equal(after["model"][name]), name
    for k, state in before["optimizer"]["state"].items():
        assert state["momentum_buffer"].equal(after["optimizer"]["state"][k]["momentum_buffer"]), k
    assert after["nonfinite_skipped"] == 1 and after["step"] == 3
    final = _state(run_dir, 4)
    assert all(bool(torch.isfinite(v).all()) for v in final["model"].values() if v.is_floating_point())
    assert not _state(run_dir, 4)["model"]["online.encoder.net.conv1.weight"].equal(
        after["model"]["online.encoder.net.conv1.weight"])  # training went on after the skip
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["step"], r["nonfinite_steps"]) for r in rows] == [(4, 1)]
    assert math.isnan(rows[0]["loss"])  # the interval's mean includes the bad step; the count says why
    err = capsys.readouterr().err
    assert "fastbyol: skipped 1 non-finite step(s) (optimizer, EMA and BatchNorm statistics untouched), the " \
           "first at step 3: loss=nan" in err


def test_stop_ends_with_a_diagnostic_and_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [f"run.out_dir={tmp_path}", "run.name=stop", *TINY, "run.max_steps=8", "run.ckpt_every=2",
                 "run.log_every=4"]
    trainer = start_run(build_config("smoke", overrides=overrides))
    _poison(trainer, 3)
    with pytest.raises(NonFiniteStop) as caught:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("non-finite loss or gradients at step 3: loss=nan; largest gradient norms: ")
    culprit = message.split("largest gradient norms: ")[1].split(",")[0]
    assert culprit.endswith(" nan") and culprit.split()[0] in trainer.guard.names
    kept = checkpoint.list_checkpoints(tmp_path / "stop" / "checkpoints")
    assert [s for s, _ in kept] == [2]  # the step-4 checkpoint (after the bad step) was never written
    assert f"the last checkpoint, {kept[0][1]}, is from before it" in message
    good = checkpoint.load(kept[0][1])  # intact: loads, checksum verified, finite
    assert all(bool(torch.isfinite(v).all()) for v in good["model"].values() if v.is_floating_point())


def test_skip_limit_and_cli_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import fastbyol.engine.trainer as trainer_module

    real_start = trainer_module.start_run

    def start_poisoned(cfg: Any) -> Trainer:
        trainer = real_start(cfg)
        _poison(trainer, 2)
        return trainer

    monkeypatch.setattr(trainer_module, "start_run", start_poisoned)
    code = main(["train", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=limit", *TINY,
                 "run.max_steps=4", "run.log_every=2", "run.nonfinite=skip", "run.nonfinite_max_skips=0"])
    assert code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fastbyol: error")]
    assert line.startswith("fastbyol: error: non-finite loss or gradients at step 2: ")
    assert "(1 bad step(s); more than 0 skipped steps)" in line and "set run.nonfinite=skip" in line
    with pytest.raises(ConfigError, match="run.nonfinite=skip is not supported with run.engine=deepspeed"):
        build_config("smoke", overrides=["run.nonfinite=skip", "run.engine=deepspeed"])
