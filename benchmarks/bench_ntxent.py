"""NT-Xent (SimCLR) loss forward + backward: the PyTorch reference against the fused Triton kernel.

One process, two views z1, z2 [B, D] (D = 128, SimCLR's projection width): q = k = cat(z1, z2), M = N = 2B, so
the logits are [2B, 2B]. The reference materialises them in fp32 (plus the masked copy, the softmax and their
gradients: several [2B, 2B] fp32 tensors); the kernel keeps each 64 x 64 tile on chip and recomputes it in the
backward from the saved per-row logsumexp, so its memory is O(B D). Both are matmul-bound at these sizes:
the FLOPs counted are the minimum, 2MND for the logits forward and 2 x 2MND for the dq and dk products in the
backward (the kernel's logit recomputation is its own cost), against a measured matmul ceiling.

Run from the repository root: ``python -m benchmarks.bench_ntxent [--quick] [--device cpu]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastbyol.kernels.ntxent import ntxent, ntxent_ref

from benchmarks.harness import assert_close_at, environment, parse_args, time_fn, triton_runs_here, write_results
from fastbyol.step.ntxent import pair_indices

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TEMPERATURE = 0.1  # the official SimCLR README's ImageNet pretraining flag (--temperature=0.1)
# Tolerances as tests/test_kernel_ntxent.py's VALUE_TOL and GRAD_RTOL (the full grid lives there).
VALUE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}


def _inputs(b: int, d: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """z = cat(z1, z2) [2B, D] requiring grad, and the single-process (pos_index, self_index)."""
    z = torch.randn(2 * b, d, dtype=dtype, device=device).requires_grad_()
    return (z, *pair_indices(b, 0, 1, device=device))


def _step(f: LossFn, x: Inputs) -> Callable[[], torch.Tensor]:
    """One forward + backward with q = k = z; the grad set to None so backward writes it fresh."""
    z, pos_index, self_index = x

    def run() -> torch.Tensor:
        z.grad = None
        loss = f(z, z, pos_index, self_index, TEMPERATURE)
        loss.backward()
        return loss
    return run


def _check(b: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
    """The kernel's loss and gradient against the reference on one fresh input; raises on a mismatch."""
    x = _inputs(b, d, dtype, device)
    want = _step(ntxent_ref, x)().detach()
    want_grad = x[0].grad.clone()  # type: ignore[union-attr]
    got = _step(ntxent, x)().detach()
    rtol = VALUE_RTOL[dtype]
    assert_close_at(got, want, rtol, rtol, f"ntxent B={b} D={d} {dtype}")
    assert x[0].grad is not None
    atol = GRAD_RTOL[dtype] * want_grad.abs().max().item()  # host sync: outside any timed region
    assert_close_at(x[0].grad, want_grad, GRAD_RTOL[dtype], atol, f"grad z B={b} D={d} {dtype}")


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, warmup: int, iters: int) -> float:
    """Measured [n, n] x [n, n] matmul throughput in TFLOP/s (2 n^3 FLOPs): the ceiling for the logit tiles.
    fp32 with TF32 off, as the kernel's fp32 path (``input_precision="ieee"``) and the reference use."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    timing = time_fn(lambda: a @ b, device, warmup=warmup, iters=iters)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12


def _peak_mib(f: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory of one call above what was allocated before it, MiB; None on the CPU (no counter)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    f()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device: torch.device = args.device
    if not triton_runs_here(device):
        raise SystemExit("bench_ntxent: Triton on the CPU needs TRITON_INTERPRET=1 set before Python starts")
    batches, d = ((4, 9), 16) if args.quick else ((256, 1024, 4096), 128)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    env = environment(device)

    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        # --quick: a 256-wide matmul on the CPU, a smoke value; otherwise 8192 (~1 TFLOP: ms on an H100).
        ceiling = matmul_tflops(device, dtype, 256 if args.quick else 8192, max(args.warmup, 3), max(args.iters, 20))
        print(f"measured {dtype} matmul {ceiling:.2f} TFLOP/s")
        for b in batches:
            _check(b, d, dtype, device)
            m = 2 * b
            flops = 3 * 2 * m * m * d  # logits forward, dq and dk products backward (see the docstring)
            ref_ms = None
            for name, f in (("ref", ntxent_ref), ("triton", ntxent)):
                step = _step(f, _inputs(b, d, dtype, device))
                timing = time_fn(step, device, warmup=args.warmup, iters=args.iters)
                ref_ms = timing.median_ms if ref_ms is None else ref_ms
                tflops = flops / (timing.median_ms * 1e-3) / 1e12
                rows.append({
                    "variant": name, "B": b, "M": m, "N": m, "D": d, "dtype": str(dtype).removeprefix("torch."),
                    "temperature": TEMPERATURE, "median_ms": timing.median_ms, "p10_ms": timing.p10_ms,
                    "p90_ms": timing.p90_ms, "iters": timing.iters, "tflop_per_s": tflops,
                    "pct_of_matmul": 100.0 * tflops / ceiling, "matmul_tflop_per_s": ceiling,
                    "speedup_vs_ref": ref_ms / timing.median_ms, "peak_mib": _peak_mib(step, device),
                })
    write_results(rows, env, args.out, "ntxent")


if __name__ == "__main__":
    main()
