"""Compile every Triton launch the project makes for real NVIDIA GPUs, ahead of time, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) never lowers a kernel to PTX, so what a GPU would reject (a compile
error, shared memory above the per-block limit, registers spilled to local memory) goes unseen on the CPU.
This script:

1. calls the project's own launchers (``fastbyol.kernels.*``: the code training runs) on small CPU tensors of
   every dtype and shape class training uses, inside ``compiling_for(capability)``, so each launcher takes
   its GPU branch (tiles, warps, stages chosen for that capability), with ``JITFunction.run`` replaced by a
   recorder: nothing executes, each launch's kernel, arguments and options are kept;
2. binds each recorded launch as Triton's own launcher does (``create_function_from_signature``, the
   backend's specialisation of pointers' alignment and integers' divisibility, ``_pack_args``) and
   ``triton.compile``s it for that capability;
3. reads registers, stack and local memory from the cubin (``cuobjdump -res-usage``), spill stores and loads
   from ``ptxas -v`` on the PTX, and shared memory from the compiled metadata.

It fails (exit 1) on a compile error, on shared memory above the architecture's per-block limit (a launch
would raise OutOfResources), and on any spill for sm_90 (the H100/H200 the project is tuned for). It prints
the table (kernel, case, dtype, arch, registers, spills, shared memory) and with ``--out`` writes it as CSV
and markdown. Run it with the interpreter off::

    python -m benchmarks.aot_compile --out benchmarks/results            # sm_80 86 89 90 100 120
    python -m benchmarks.aot_compile --arch 90 --only ntxent              # one architecture, some kernels

``scripts/aot_triton36.sh`` runs the same under triton 3.6.0 (the GPU machines' version) in a side
environment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from fastbyol.kernels import byol_loss, ema, lars, ntxent
from fastbyol.kernels.launch import compiling_for, interpreted
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import interpreter as triton_interpreter
from triton.runtime import jit as triton_jit

KERNEL_MODULES = (byol_loss, ema, lars, ntxent)

ARCHS = (80, 86, 89, 90, 100, 120)
KIB = 1024
# Opt-in shared memory per block (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
SHARED_LIMIT = {80: 163 * KIB, 86: 99 * KIB, 89: 99 * KIB, 90: 227 * KIB, 100: 227 * KIB, 120: 99 * KIB}
NO_SPILL_ARCHS = (90,)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Launch:
    """One recorded launch: which kernel, from which case, with what arguments."""

    case: str
    dtype: str
    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def base_name(self) -> str:
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"

    @property
    def name(self) -> str:
        """The kernel, with its boolean constexprs (FUSE_EMA, DOT_FP32): one name per compiled variant."""
        extra = "".join(f"[{k}={int(v)}]" for k, v in self.kwargs.items() if isinstance(v, bool))
        return f"{self.base_name}{extra}"


@contextlib.contextmanager
def _recording(into: list[tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> Iterator[None]:
    """``kernel[grid](...)`` records (kernel, args, kwargs) instead of compiling and launching. Interpreted
    kernels (``TRITON_INTERPRET=1``) are recorded too, so a test can read what the launchers choose; only
    ``JITFunction``s can be compiled."""
    classes = (triton_jit.JITFunction, triton_interpreter.InterpretedFunction)
    originals = [cls.run for cls in classes]

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        into.append((self, args, dict(kwargs)))

    for cls in classes:
        cls.run = record  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, original in zip(classes, originals):
            cls.run = original  # type: ignore[method-assign]


def launchable_kernels() -> set[str]:
    """``module.name`` of every kernel the launchers can start: the @triton.jit objects named ``*_kernel`` (the
    others are device functions they call)."""
    return {f"{module.__name__.rsplit('.', 1)[-1]}.{name}" for module in KERNEL_MODULES
            for name, value in vars(module).items()
            if name.endswith("_kernel") and isinstance(value, triton.runtime.KernelInterface)}


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _loss_cases(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    # BYOL's predictor/projection width is 256 (BYOL.md); an odd width exercises the masked tail.
    for d in (256, 100):
        p1, p2, z1, z2 = (_randn(8, d, dtype=dtype) for _ in range(4))

        def loss(p1: torch.Tensor = p1, p2: torch.Tensor = p2, z1: torch.Tensor = z1, z2: torch.Tensor = z2) -> None:
            byol_loss.byol_loss_rows(p1, p2, z1, z2)
            byol_loss.byol_loss_grad_p(torch.ones(()), p1, p2, z1, z2)

        yield f"byol_loss D={d}", loss
    # SimCLR: 2B anchors x 128 dims against the 2B global keys; with W ranks each rank has 2B/W anchors.
    for m, n, d in ((64, 64, 128), (32, 64, 128), (48, 48, 100)):
        q, k = _randn(m, d, dtype=dtype), _randn(n, d, dtype=dtype)
        pos = torch.arange(m) % n
        slf = (torch.arange(m) + 1) % n

        def run(q: torch.Tensor = q, k: torch.Tensor = k, pos: torch.Tensor = pos, slf: torch.Tensor = slf) -> None:
            _, lse = ntxent.ntxent_rows(q, k, pos, slf, 0.1)
            ntxent.ntxent_grads(torch.ones(()), q, k, pos, slf, lse, 0.1)

        yield f"ntxent M={m} N={n} D={d}", run


def _optimizer_cases(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    # A flat buffer of a few tensors, one excluded (a bias), one spanning several chunks: the layout comes from
    # the launcher's own chunk size for the target.
    sizes = (3 * 4096 + 17, 64, 5000)
    segments, offset = [], 0
    for i, size in enumerate(sizes):
        segments.append((offset, size, i == 1))
        offset += size
    param, grad, momentum = _randn(offset, dtype=dtype), _randn(offset, dtype=dtype), torch.zeros(offset)
    target = _randn(sizes[0] + sizes[1], dtype=dtype)
    lr, tau = torch.tensor([0.1]), torch.tensor([0.99])

    def lars_step() -> None:
        layout = lars.build_layout(segments, "cpu")
        lars.lars_flat(param, grad, momentum, layout, lr, 1.5e-6, 0.9, 1e-3)

    def lars_ema_step() -> None:
        layout = lars.build_layout(segments, "cpu")
        lars.lars_ema_flat(param, grad, momentum, layout, lr, 1.5e-6, 0.9, 1e-3, target, tau)

    def lars_sharded() -> None:
        layout = lars.shard_layout(segments, 100, offset - 100, "cpu")
        sums = lars.lars_shard_sums(param[100:offset - 100], grad[100:offset - 100], layout, 1.5e-6)
        lars.lars_shard_apply(param[100:offset - 100], grad[100:offset - 100], momentum[100:offset - 100],
                              layout, sums, lr, 1.5e-6, 0.9, 1e-3)

    yield "lars_flat", lars_step
    yield "lars_ema_flat", lars_ema_step
    yield "lars_shard", lars_sharded
    online = _randn(offset, dtype=dtype)
    ema_target = _randn(offset, dtype=dtype)
    yield "ema_flat_", lambda: ema.ema_flat_(ema_target, online, tau)


def capture(capability: int, only: str | None = None) -> list[Launch]:
    """Every launch the launchers make for a GPU of ``capability``, in call order (repeats included:
    ``_compile_arch`` compiles each distinct one once)."""
    launches: list[Launch] = []
    torch.manual_seed(0)
    for dtype_name, dtype in DTYPES.items():
        cases = list(_loss_cases(dtype)) + list(_optimizer_cases(dtype))
        for case, run in cases:
            if only and not re.search(only, case):
                continue
            recorded: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
            with compiling_for(capability), _recording(recorded):
                run()
            for kernel, args, kwargs in recorded:
                launches.append(Launch(case, dtype_name, kernel, args, kwargs))
    return launches


@dataclass
class Compiled:
    """What the compile of one launch for one architecture gave."""

    kernel: str
    case: str
    dtype: str
    arch: int
    status: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    seconds: float = 0.0
    error: str = ""

    def problems(self) -> list[str]:
        found = []
        if self.status != "ok":
            found.append(f"compile failed: {self.error}")
            return found
        if self.shared_bytes is not None and self.shared_limit is not None and self.shared_bytes > self.shared_limit:
            found.append(f"shared memory {self.shared_bytes / KIB:.1f} KiB > the {self.shared_limit // KIB} KiB "
                         f"per-block limit of sm_{self.arch}")
        spilled = (self.spill_stores or 0) + (self.spill_loads or 0) + (self.local_bytes or 0)
        if self.arch in NO_SPILL_ARCHS and spilled:
            found.append(f"spills on sm_{self.arch}: {self.spill_stores} B stores, {self.spill_loads} B loads, "
                         f"{self.local_bytes} B local memory per thread")
        return found


def _nvidia_tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _bind(launch: Launch, target: GPUTarget) -> tuple[ASTSource, dict[str, Any]]:
    """What ``JITFunction.run`` would compile for these arguments on ``target`` (its binder and _pack_args)."""
    kernel = launch.kernel
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or False
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def _resources(cubin: bytes, ptx: str, arch: int) -> dict[str, int]:
    """Registers and local bytes of the cubin Triton built; spill bytes from ptxas -v on its PTX."""
    found: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path, ptx_path = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        cubin_path.write_bytes(cubin)
        ptx_path.write_text(ptx)
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", str(cubin_path)], capture_output=True,
                               text=True, check=True).stdout
        for key, field in (("REG", "registers"), ("LOCAL", "local_bytes")):
            match = re.search(rf"\b{key}:(\d+)", usage)
            if match:
                found[field] = int(match.group(1))
        sm = re.search(r"^\.target\s+(\S+)", ptx, re.M)
        ptxas = _nvidia_tool("ptxas-blackwell" if arch >= 100 else "ptxas")
        if not Path(ptxas).exists():
            ptxas = _nvidia_tool("ptxas")
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm.group(1) if sm else f'sm_{arch}'}", str(ptx_path), "-o",
                              str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True).stderr
        match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if match:
            found["spill_stores"], found["spill_loads"] = int(match.group(1)), int(match.group(2))
    return found


def compile_launch(launch: Launch, arch: int, bound: tuple[ASTSource, dict[str, Any]] | None = None) -> Compiled:
    """``triton.compile`` one launch for ``arch`` (``bound``: its ``_bind`` result, if already made) and read what
    the GPU would get; a failure is a row with status 'error'."""
    row = Compiled(launch.name, launch.case, launch.dtype, arch, "ok", shared_limit=SHARED_LIMIT.get(arch))
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        src, options = bound or _bind(launch, target)
        compiled = triton.compile(src, target=target, options=options)
        meta = compiled.metadata
        row.shared_bytes, row.num_warps, row.num_stages = int(meta.shared), int(meta.num_warps), int(meta.num_stages)
        res = _resources(compiled.asm["cubin"], compiled.asm["ptx"], arch)
        row.registers, row.local_bytes = res.get("registers"), res.get("local_bytes")
        row.spill_stores, row.spill_loads = res.get("spill_stores"), res.get("spill_loads")
    except Exception as exc:  # a compile error is a result of this check, not a crash of it
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        row.status, row.error = "error", f"{type(exc).__name__}: {first_line}"
    row.seconds = time.perf_counter() - start
    return row


def _compile_arch(arch: int, only: str | None) -> list[Compiled]:
    """Capture for ``arch`` and compile each distinct launch once (a worker process's whole job): the same
    binary (e.g. the norms kernel of lars_flat and lars_ema_flat) is bound again but not compiled again."""
    rows: list[Compiled] = []
    seen: set[str] = set()
    for launch in capture(arch, only):
        try:
            bound = _bind(launch, GPUTarget("cuda", arch, 32))
        except Exception:  # compile_launch binds again and reports the error as its row
            rows.append(compile_launch(launch, arch))
            continue
        src, options = bound
        key = f"{launch.kernel.fn.__qualname__}|{src.hash()}|{sorted(options.items())}"
        if key not in seen:
            seen.add(key)
            rows.append(compile_launch(launch, arch, bound))
    return rows


def run(archs: tuple[int, ...], only: str | None = None, jobs: int = 1) -> list[Compiled]:
    if jobs > 1 and len(archs) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            parts = list(pool.map(_compile_arch, archs, [only] * len(archs)))
    else:
        parts = [_compile_arch(arch, only) for arch in archs]
    return [row for part in parts for row in part]


def _table_rows(rows: list[Compiled]) -> list[dict[str, Any]]:
    return [{"kernel": r.kernel, "case": r.case, "dtype": r.dtype, "arch": f"sm_{r.arch}", "status": r.status,
             "registers": r.registers, "spill_stores_B": r.spill_stores, "spill_loads_B": r.spill_loads,
             "local_B": r.local_bytes, "shared_KiB": None if r.shared_bytes is None else round(r.shared_bytes / KIB, 1),
             "shared_limit_KiB": None if r.shared_limit is None else r.shared_limit // KIB,
             "num_warps": r.num_warps, "num_stages": r.num_stages, "compile_s": round(r.seconds, 2)}
            for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="compute capabilities, comma-separated (default: %(default)s)")
    parser.add_argument("--only", default=None, help="regular expression: only the cases it matches")
    parser.add_argument("--jobs", type=int, default=min(len(ARCHS), os.cpu_count() or 1),
                        help="worker processes, one architecture each (default: the cores)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV and markdown here")
    parser.add_argument("--name", default="aot-compile", help="results file name suffix (default: %(default)s)")
    args = parser.parse_args(argv)
    if interpreted():
        parser.error("TRITON_INTERPRET is 1: interpreted kernels cannot be compiled (run with it unset)")
    archs = tuple(int(a) for a in args.arch.split(","))
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        parser.error(f"--arch {unknown} unknown: choose from {','.join(map(str, ARCHS))}")
    start = time.perf_counter()
    rows = run(archs, args.only, args.jobs)
    table = _table_rows(rows)
    from fastbyol.telemetry.results import environment, markdown_table, write_results

    env = environment(torch.device("cpu"))
    if args.out:
        write_results(table, env, args.out, args.name)
    else:
        sys.stdout.write(markdown_table(table, env))
    problems = [f"{r.kernel} ({r.case}, {r.dtype}) on sm_{r.arch}: {p}" for r in rows for p in r.problems()]
    if not args.only:  # every kernel the launchers can start must have been captured and compiled
        for arch in archs:
            compiled = {r.kernel.split("[", 1)[0] for r in rows if r.arch == arch}
            problems += [f"{name} on sm_{arch}: never launched by a capture case (add one to _loss_cases or "
                         f"_optimizer_cases)" for name in sorted(launchable_kernels() - compiled)]
    print(f"aot_compile: {len(rows)} compiles ({len({(r.kernel, r.case, r.dtype) for r in rows})} launches x "
          f"{len(archs)} architectures) under triton {triton.__version__} in {time.perf_counter() - start:.0f} s; "
          f"{len(problems)} problems")
    for problem in problems:
        print(f"  FAIL {problem}")
    if not rows:
        print("aot_compile: nothing was captured", file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
