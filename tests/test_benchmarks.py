"""The benchmark harness and scripts: each script's --quick run on the CPU (Triton under its interpreter)
writes a CSV whose every row carries the environment and finite positive numbers."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.harness import environment, time_fn, write_results

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run_quick(module: str, out: Path) -> list[dict[str, str]]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
    csvs = list(out.glob("*.csv"))
    assert len(csvs) == 1, csvs
    assert csvs[0].with_suffix(".md").exists()
    with csvs[0].open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_rows(rows: list[dict[str, str]], numeric: list[str]) -> None:
    for row in rows:
        assert row["torch"] == torch.__version__
        assert row["commit"]
        for key in numeric:
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, row)


@pytest.mark.parametrize("module, variants, numeric", [
    ("benchmarks.bench_ema", {"loop", "foreach", "triton_flat"},
     ["median_ms", "p10_ms", "p90_ms", "gb_per_s", "pct_of_copy_bw", "speedup_vs_loop"]),
    ("benchmarks.bench_loss", {"ref", "triton"},
     ["median_ms", "p10_ms", "p90_ms", "gb_per_s", "pct_of_copy_bw", "speedup_vs_ref"]),
    ("benchmarks.bench_ntxent", {"ref", "triton"},
     ["median_ms", "p10_ms", "p90_ms", "tflop_per_s", "pct_of_matmul", "speedup_vs_ref"]),
], ids=["ema", "loss", "ntxent"])
def test_quick_run_writes_rows(tmp_path: Path, module: str, variants: set[str], numeric: list[str]) -> None:
    rows = _run_quick(module, tmp_path)
    assert variants <= {row["variant"] for row in rows}
    _assert_rows(rows, numeric)


def test_time_fn_cpu_statistics() -> None:
    timing = time_fn(lambda: time.sleep(0.001), torch.device("cpu"), warmup=1, iters=9)
    assert timing.iters == 9
    assert 1.0 <= timing.min_ms <= timing.p10_ms <= timing.median_ms <= timing.p90_ms


def test_write_results_merges_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = environment(torch.device("cpu"))
    rows = [{"variant": "a", "median_ms": 1.5}, {"variant": "b", "median_ms": 0.25}]
    path = write_results(rows, env, tmp_path, "unit")
    assert path.exists() and path.with_suffix(".md").exists()
    assert path.name.endswith("-unit.csv") and path.name.startswith(env["date"][:10])
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["variant"] for r in read] == ["a", "b"]
    for r in read:
        for key, value in env.items():
            assert r[key] == ("" if value is None else str(value))
    table = path.with_suffix(".md").read_text()
    assert "| variant | median_ms |" in table and "| b | 0.25 |" in table
    assert table in capsys.readouterr().out


def test_bench_lars_quick_run_writes_rows(tmp_path: Path) -> None:
    rows = _run_quick("benchmarks.bench_lars", tmp_path)
    by_variant = {row["variant"]: row for row in rows}
    assert set(by_variant) == {"loop", "foreach", "triton_unfused", "triton_fused"}
    _assert_rows(rows, ["median_ms", "p10_ms", "p90_ms", "gb_per_s", "pct_of_copy_bw", "speedup_vs_loop",
                        "speedup_vs_foreach"])
    fused = float(by_variant["triton_fused"]["speedup_fused_vs_unfused"])
    assert math.isfinite(fused) and fused > 0
    for row in rows:
        assert int(row["n_values"]) > int(row["n_paired"]) > 0
        assert float(row["max_abs_diff"]) <= 1e-5


def test_telemetry_cost_quick(tmp_path: Path) -> None:
    """benchmarks/telemetry_cost.py: the phase timer's microseconds per step and the sampler thread's CPU
    share (replayed samples here), as a share of a given step time."""
    import json

    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({"t": k, "step": 0, "gpu": 0, "power_w": 600.0}) + "\n" for k in range(4)))
    env = {**os.environ, "FASTBYOL_GPU_REPLAY": str(replay)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.telemetry_cost", "--quick", "--device", "cpu",
                           "--step-ms", "100", "--out", str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("*-telemetry-cost.csv")
    (row,) = list(csv.DictReader(path.open()))
    assert 0 < float(row["phase_timer_us_per_step"]) < 1000 and row["sampler_source"] == "ReplaySource"
    assert int(row["sampler_samples"]) >= 1 and float(row["bound_pct_of_step"]) >= 0


def test_nonfinite_cost_quick(tmp_path: Path) -> None:
    """benchmarks/nonfinite_cost.py: the guard's check for both policies, and skip's snapshot and restore
    with the bytes they protect and the bandwidth they reach."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.nonfinite_cost", "--quick", "--device", "cpu",
                           "--step-ms", "100", "--out", str(tmp_path)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("*-nonfinite-cost.csv")
    rows = {row["policy"]: row for row in csv.DictReader(path.open())}
    assert set(rows) == {"stop", "skip"} and rows["stop"]["snapshot_ms"] == ""
    assert float(rows["stop"]["check_ms"]) > 0 and float(rows["skip"]["protected_mib"]) > 10
    skip = rows["skip"]
    assert float(skip["per_step_ms"]) >= float(skip["snapshot_ms"]) + float(skip["restore_ms"]) > 0
    assert float(skip["pct_of_step"]) == pytest.approx(float(skip["per_step_ms"]), rel=1e-6)  # of 100 ms
