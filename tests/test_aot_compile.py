"""Every Triton launch compiles for real GPUs (sm_80 to sm_120) on this CPU: no compile error, shared memory within
each architecture's per-block limit, no register spill on sm_90 (benchmarks/aot_compile.py; RECIPES.md, "Triton
ahead of time"). The capture itself runs here under the interpreter, to check the launchers take their GPU branch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastbyol.kernels import ema, lars, ntxent
from fastbyol.kernels.launch import INTERPRETER, Target, compiling_for, target_of

from benchmarks import aot_compile

ROOT = Path(__file__).resolve().parents[1]


def test_compiling_for_sets_the_target_only_inside() -> None:
    assert target_of("cpu") == INTERPRETER
    with compiling_for(86) as forced:
        assert forced == Target(False, 86)
        assert target_of("cpu") == Target(False, 86)
        assert lars.chunk_size("cpu") == lars.BLOCK
    assert target_of("cpu") == INTERPRETER
    assert lars.chunk_size("cpu") == lars.INTERPRETER_BLOCK


@pytest.mark.parametrize("arch", [86, 90])
def test_the_capture_takes_every_launchers_gpu_branch(arch: int) -> None:
    launches = aot_compile.capture(arch)
    captured = {launch.base_name for launch in launches}
    assert captured == aot_compile.launchable_kernels(), "a kernel no capture case launches"
    for launch in launches:
        kw = launch.kwargs
        if launch.base_name.startswith("ntxent._ntxent"):
            dtype = aot_compile.DTYPES[launch.dtype]
            d = launch.args[launch.kernel.arg_names.index("D")]
            tiles = ntxent.tiles_for(Target(False, arch), dtype, d)
            assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == (
                tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages)
            assert tiles != ntxent.tiles_for(INTERPRETER, dtype, d)
            assert kw["DOT_FP32"] is False  # the interpreter's bf16 workaround stays off on a GPU
        elif launch.base_name in ("lars._norms_kernel", "lars._update_kernel"):
            assert kw["BLOCK"] == lars.BLOCK and kw["num_warps"] == lars.NUM_WARPS
        elif launch.base_name.startswith("ema."):
            assert kw["BLOCK"] == ema.BLOCK and kw["num_warps"] == ema.NUM_WARPS


def test_problems_are_found_in_each_kind_of_row() -> None:
    ok = aot_compile.Compiled("k", "c", "fp32", 90, "ok", registers=80, spill_stores=0, spill_loads=0, local_bytes=0,
                              shared_bytes=20 * 1024, shared_limit=227 * 1024)
    assert ok.problems() == []
    over = aot_compile.Compiled("k", "c", "fp32", 86, "ok", shared_bytes=128 * 1024, shared_limit=99 * 1024)
    assert "per-block limit" in over.problems()[0]
    spill = aot_compile.Compiled("k", "c", "fp32", 90, "ok", spill_stores=56, spill_loads=56, local_bytes=0)
    assert "spills on sm_90" in spill.problems()[0]
    assert aot_compile.Compiled("k", "c", "fp32", 100, "ok", spill_stores=8, spill_loads=8).problems() == []
    failed = aot_compile.Compiled("k", "c", "fp32", 80, "error", error="CompilationError: x")
    assert "compile failed" in failed.problems()[0]


def _run_aot(tmp_path: Path, *extra: str, env_extra: dict[str, str] | None = None,
             command: list[str] | None = None) -> list[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    cmd = command or [sys.executable, "-m", "benchmarks.aot_compile", "--out", str(tmp_path), *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    sys.stdout.write(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (table,) = tmp_path.glob("*aot-compile*.csv")
    with table.open() as f:
        return list(csv.DictReader(f))


def _check_table(rows: list[dict[str, str]], triton_version: str) -> None:
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in aot_compile.ARCHS}
    assert {r["triton"] for r in rows} == {triton_version}
    for arch in aot_compile.ARCHS:
        kernels = {r["kernel"].split("[")[0] for r in rows if r["arch"] == f"sm_{arch}"}
        assert kernels == aot_compile.launchable_kernels()
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["shared_KiB"]) <= float(r["shared_limit_KiB"]), r
        if r["arch"] == "sm_90":
            assert int(r["spill_stores_B"]) == int(r["spill_loads_B"]) == 0, r


@pytest.mark.slow
def test_every_launch_compiles_for_every_architecture(tmp_path: Path) -> None:
    import triton

    _check_table(_run_aot(tmp_path), triton.__version__)


@pytest.mark.slow
def test_every_launch_compiles_under_the_gpu_machines_triton(tmp_path: Path) -> None:
    """The GPU machines have triton 3.6.0 (with torch 2.11): the same compile in a side environment."""
    rows = _run_aot(tmp_path, command=["bash", str(ROOT / "scripts" / "aot_triton36.sh"), "--out", str(tmp_path)])
    _check_table(rows, "3.6.0")
