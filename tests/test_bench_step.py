"""benchmarks/bench_step.py on the CPU: the real trainer's step timed eager and with the kernels (Triton
interpreter), FLOPs counted from the model, every row with its environment."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_bench_step_quick(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "benchmarks.bench_step", "--quick", "--device", "cpu", "--out", str(tmp_path),
           "--variants", "eager,eager_kernels", "--warmup", "1", "--iters", "1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*-step.csv")
    rows = list(csv.DictReader(path.open(newline="")))
    assert [r["variant"] for r in rows] == ["eager", "eager_kernels"]
    assert [r["kernels"] for r in rows] == ["False", "True"]
    for row in rows:
        assert row["commit"] and row["torch"] and row["device"].startswith("cpu")
        for key in ("median_ms", "img_per_s", "gflop_per_image"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (key, row)
    # ResNet-18, small stem, 32 px: ~1.2 GFLOP per view forward; an image costs two views x (online
    # forward + backward = 3 forwards, target forward = 1) = 8 forwards, ~9 GFLOP.
    assert 6 < float(rows[0]["gflop_per_image"]) < 12


def test_bench_step_rejects_unknown_variant(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_step", "--quick", "--device", "cpu",
                           "--out", str(tmp_path), "--variants", "fastest"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "unknown variant fastest" in proc.stderr
