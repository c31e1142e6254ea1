"""benchmarks/pipeline.py on the CPU: torchvision and DALI (full and ROI decode) timed on one folder with
one thread count, every row with its environment and the ratio to torchvision."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_quick(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed: pip install 'fastbyol[gpu]'")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--quick", "--device", "cpu", "--out",
                           str(tmp_path), "--train-steps", "2"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*-pipeline.csv")
    rows = list(csv.DictReader(path.open(newline="")))
    assert [r["variant"] for r in rows] == ["torch", "dali", "dali_roi"]
    assert float(rows[0]["ratio_vs_torch"]) == 1.0
    for row in rows:
        assert row["commit"] and row["torch"] and row["threads"] == "2"
        for key in ("img_per_s", "img_per_s_per_thread", "ratio_vs_torch"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (key, row)
        assert 0.0 <= float(row["data_wait_frac"]) <= 1.0
