"""Telemetry in a run: phase timing, FLOPs and MFU, the NVML sampler's rows and timeline (replayed on the
CPU), TensorBoard, the profiler window, and ``fastbyol bench``."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fastbyol.cli import main
from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.engine.flops import gflop_per_image
from fastbyol.engine.trainer import resume_run, start_run
from fastbyol.telemetry.phases import PhaseTimer
from fastbyol.telemetry.sinks import read_metrics, scalars
from fastbyol.telemetry.throughput import peak_bf16_tflops, throughput_fields

TINY = ["data.num_images=64", "optim.batch_size=8", "model.proj_hidden=64", "model.proj_dim=32",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off",
        "optim.warmup_epochs=0.25", "run.epochs=2"]
PHASES = {"data_wait", "forward", "backward", "optimizer", "ema"}


def _cfg(tmp_path: Path, name: str, extra: list[str]) -> Any:
    return build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={name}", *TINY, *extra])


def _replay_file(path: Path, gpus: int = 2, n: int = 12) -> Path:
    """Recorded NVML samples (values of an H100 under load, written by hand): what the sampler replays."""
    with open(path, "w", encoding="utf-8") as f:
        for k in range(n):
            for gpu in range(gpus):
                f.write(json.dumps({"t": k / 4, "step": 0, "gpu": gpu, "sm_util_pct": 90 + gpu, "mem_util_pct": 40,
                                    "mem_used_mib": 30_000 + k, "power_w": 600.0 + 10 * gpu, "energy_j": 150.0 * k,
                                    "sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "temp_c": 60 + k // 4,
                                    "clock_events": 0x4 if k == 3 else 0, "pcie_tx_mbs": 100.0,
                                    "pcie_rx_mbs": 2000.0}) + "\n")
    return path


# -- pieces ------------------------------------------------------------------------------------------------

def test_phase_timer_sums_phases_per_interval_on_the_cpu() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        timer.start("forward")
        time.sleep(0.02)
        timer.start("backward")  # closes forward
        time.sleep(0.04)
        timer.stop()
        with timer.host_range("data_wait"):  # a range only: no device time
            time.sleep(0.01)
    totals = timer.read()
    assert set(totals) == {"forward", "backward"}
    assert 38 <= totals["forward"] <= 80 and 78 <= totals["backward"] <= 160
    assert timer.read() == {}  # a new interval
    off = PhaseTimer(torch.device("cpu"), enabled=False)
    off.start("forward")
    off.stop()
    assert off.read() == {}


def test_peak_table_and_mfu_arithmetic() -> None:
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5  # the longest matching key wins over "H100"
    assert peak_bf16_tflops("NVIDIA GeForce GTX 1080") is None
    f = throughput_fields(img_per_s=2000.0, world=8, gflop_per_image=65.0, peak_tflops=1000.0)
    assert f["img_per_s_per_gpu"] == 250.0
    assert f["tflop_per_s"] == pytest.approx(130.0)  # 65 GFLOP x 2000 img/s
    assert f["mfu_pct"] == pytest.approx(100 * 130.0 / 8000.0)
    assert "mfu_pct" not in throughput_fields(100.0, 1, 65.0, None)
    assert throughput_fields(100.0, 1, None, 989.4) == {"img_per_s_per_gpu": 100.0}


def test_flop_count_of_resnet50_matches_the_known_figure() -> None:
    """ResNet-50 at 224 px is 4.09 GMAC per forward (torchvision's figure). A BYOL image (two views) runs
    the encoder forward 4 times (online and target, both views) and the online backward twice (2x the
    forward each) = 8 forwards = 16 x 4.09 GFLOP, less the first convolution's unneeded input gradient,
    plus the heads: 65.1 GFLOP measured."""
    cfg = build_config("synthetic-r50")
    gflop = gflop_per_image(cfg, 224)
    assert abs(gflop - 16 * 4.089) / (16 * 4.089) < 0.01
    rng = torch.get_rng_state()
    gflop_per_image(cfg, 32)
    assert torch.equal(rng, torch.get_rng_state())  # counting leaves the run's RNG alone


def test_profile_window_is_validated() -> None:
    for bad in ("3:1", "abc", "5", "-1:2"):
        with pytest.raises(ConfigError, match="run.profile"):
            build_config("smoke", overrides=[f"run.profile={bad}"])


def test_tensorboard_tags_flatten_a_row() -> None:
    row = {"step": 4, "loss": 1.5, "bf": True, "phase_ms": {"forward": 3.0}, "gpus": [
        {"gpu": 1, "power_w": 300.0, "clock_events": ["sw_power_cap"], "temp_c": None}]}
    assert scalars(row) == {"loss": 1.5, "phase_ms/forward": 3.0, "gpu1/power_w": 300.0}


# -- in a run ------------------------------------------------------------------------------------------------

def test_cpu_run_logs_phases_flops_and_says_why_gpu_telemetry_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FASTBYOL_GPU_REPLAY", raising=False)
    trainer = start_run(_cfg(tmp_path, "on", ["run.max_steps=4", "run.log_every=2"]))
    trainer.train()
    assert "fastbyol: GPU telemetry off: the run is on the CPU" in capsys.readouterr().err
    rows = read_metrics(tmp_path / "on" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert set(row["phase_ms"]) == PHASES and all(v >= 0 for v in row["phase_ms"].values())
        assert row["phase_ms"]["forward"] > 0 and row["phase_ms"]["backward"] > 0
        assert row["tflop_per_s"] == pytest.approx(trainer.gflop_per_image * row["img_per_s"] / 1e3)
        assert row["img_per_s_per_gpu"] == row["img_per_s"] and row["peak_rss_gib"] > 0.1
        assert "mfu_pct" not in row and "gpus" not in row  # no peak for a CPU, no NVML
    info = json.loads((tmp_path / "on" / "telemetry.json").read_text())
    assert info["gpu_telemetry"] is False and info["reason"] == "the run is on the CPU"
    assert info["gflop_per_image"] == pytest.approx(gflop_per_image(trainer.cfg, 16))
    assert not (tmp_path / "on" / "gpu_samples.jsonl").exists()

    start_run(_cfg(tmp_path, "off", ["run.max_steps=2", "run.log_every=2", "run.telemetry=off"])).train()
    row = read_metrics(tmp_path / "off" / "metrics.jsonl")[0]
    assert "phase_ms" not in row and "tflop_per_s" not in row and "img_per_s" in row


def test_replayed_gpu_samples_reach_rows_and_the_timeline_and_resume_truncates_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTBYOL_GPU_REPLAY", str(_replay_file(tmp_path / "h100.jsonl")))
    extra = ["run.log_every=2", "run.ckpt_every=2", "run.telemetry_hz=50"]
    start_run(_cfg(tmp_path, "gpu", [*extra, "run.max_steps=4"])).train()
    run_dir = tmp_path / "gpu"
    rows = read_metrics(run_dir / "metrics.jsonl")
    for row in rows:
        gpus = row["gpus"]
        assert [g["gpu"] for g in gpus] == [0, 1] and all(g["samples"] >= 1 for g in gpus)
        assert gpus[1]["power_w"] == pytest.approx(610.0) and gpus[0]["sm_util_pct"] == pytest.approx(90.0)
    samples = read_metrics(run_dir / "gpu_samples.jsonl")
    assert {s["gpu"] for s in samples} == {0, 1} and max(s["step"] for s in samples) <= 4
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    info = json.loads((run_dir / "telemetry.json").read_text())
    assert info["gpu_telemetry"] is True and [d["gpu"] for d in info["devices"]] == [0, 1]

    # A run killed after its step-4 checkpoint had logged samples of later steps: resume drops them.
    with open(run_dir / "gpu_samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({**samples[-1], "step": 5, "power_w": -1.0}) + "\n")
    resume_run(str(run_dir), ["run.max_steps=6"]).train()
    after = read_metrics(run_dir / "gpu_samples.jsonl")
    assert all(s["power_w"] != -1.0 for s in after) and max(s["step"] for s in after) >= 5
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [2, 4, 6]


def test_tensorboard_and_profile_window(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "--preset", "smoke", "--profile", "1:3", f"run.out_dir={tmp_path}", "run.name=p",
                 *TINY, "run.max_steps=4", "run.log_every=2", "run.tensorboard=true"]) == 0
    run_dir = tmp_path / "p"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "tau", "img_per_s", "phase_ms/forward", "phase_ms/optimizer"} <= tags
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    trace = json.loads((run_dir / "profile" / "trace-steps-1-2-rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert PHASES <= names  # the phases are named ranges in the trace
    assert "aten::convolution_backward" in (run_dir / "profile" / "summary-steps-1-2-rank0.txt").read_text()


def test_resumed_tensorboard_shows_each_step_once(tmp_path: Path) -> None:
    """Killed after logging steps 1-6 with its last checkpoint at step 4 (here: resumed from ckpt-4 of a run
    that went on to step 6): the resumed run logs 5 and 6 again, and TensorBoard shows each step once, with
    the values of metrics.jsonl (which the resume truncates the same way)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=tb", *TINY, "run.max_steps=6",
                 "run.log_every=1", "run.ckpt_every=4", "run.keep_last=2", "run.tensorboard=true"]) == 0
    run_dir = tmp_path / "tb"
    assert main(["train", "--resume", str(run_dir / "checkpoints" / "ckpt-00000004.pt"), "run.max_steps=8"]) == 0
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]


def test_tensorboard_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["train", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=t", *TINY,
                 "run.max_steps=1", "run.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastbyol: error: run.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                   "or set run.tensorboard=false"]
    assert not (tmp_path / "t").exists()  # nothing left behind


# -- fastbyol bench ------------------------------------------------------------------------------------------

def test_bench_sweep_writes_csv_with_environment_and_telemetry_overhead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTBYOL_GPU_REPLAY", str(_replay_file(tmp_path / "h100.jsonl")))
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--batch", "4", "--data", "synthetic,torch", "--compile", "off,reduce-overhead",
                 "--steps", "2", "--rounds", "2", "--warmup", "1", "--out", str(out), "data.image_size=16",
                 "data.workers=0"]) == 0
    (csv_path,) = out.glob("*-bench.csv")
    assert csv_path.with_suffix(".md").is_file()
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert len(rows) == 2 * 2 * 2  # data x compile x telemetry
    for row in rows:
        assert row["date"] and row["commit"] and row["torch"] == torch.__version__ and row["device"].startswith("cpu")
    ran = [r for r in rows if r["compile"] == "off"]
    skipped = [r for r in rows if r["compile"] == "reduce-overhead"]
    assert all(r["status"] == "ok" for r in ran)
    assert all(r["status"].startswith("skipped: run.compile=reduce-overhead uses CUDA graphs") for r in skipped)
    for row in ran:
        assert float(row["median_ms"]) > 0 and float(row["img_per_s"]) > 0 and int(row["steps"]) == 2
        assert float(row["gflop_per_image"]) > 0 and row["arch"] == "resnet18"
    on = [r for r in ran if r["telemetry"] == "on"]
    assert all(r["telemetry_overhead_pct"] != "" and float(r["forward_ms"]) > 0 for r in on)
    assert all(r["gpu_power_w"] and float(r["gpu_power_w"]) == pytest.approx(1210.0) for r in on)  # 600 + 610 W
    assert {r["data"] for r in ran} == {"synthetic", "torch"}
    assert float(next(r for r in ran if r["data"] == "torch")["data_wait_ms"]) > 0


def test_bench_rejects_bad_axes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--data", "webdataset"]) == 2
    assert "--data webdataset is not a data source: use synthetic, torch, dali" in capsys.readouterr().err
    assert main(["bench", "--batch", "a,b"]) == 2
    assert "--batch 'a,b'" in capsys.readouterr().err
