"""BYOL loss forward + backward: the PyTorch reference against the fused Triton kernel.

Both take (p1, p2, z1, z2) of shape [B, D]: p (the online predictions) requires grad, z (the target
projections) is detached. The reference launches a dozen elementwise and reduction kernels per direction,
each a round trip through memory; the fused kernel reads each row once forward and recomputes the row sums
in the backward instead of saving them, so both are bandwidth-bound at these sizes.

Run from the repository root: ``python -m benchmarks.bench_loss [--quick] [--device cpu]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastbyol.kernels.byol_loss import byol_loss, byol_loss_ref

from benchmarks.harness import (
    assert_close_at,
    copy_bandwidth_gbs,
    environment,
    parse_args,
    time_fn,
    triton_runs_here,
    write_results,
)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Loss-value tolerances per dtype (the brief's; the kernel tests hold the full grid with gradients).
VALUE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Gradient tolerances, as tests/test_kernel_byol_loss.py's GRAD_RTOL: bf16 stores grad p in 8 mantissa bits.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}


def _inputs(b: int, d: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Fresh random p1, p2 (requiring grad) and z1, z2 (detached)."""
    p1, p2, z1, z2 = (torch.randn(b, d, dtype=dtype, device=device) for _ in range(4))
    return [p1.requires_grad_(), p2.requires_grad_(), z1, z2]


def _step(f: LossFn, x: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One forward + backward; grads set to None so backward writes them fresh instead of accumulating."""
    p1, p2, z1, z2 = x

    def run() -> torch.Tensor:
        p1.grad = None
        p2.grad = None
        loss = f(p1, p2, z1, z2)
        loss.backward()
        return loss
    return run


def _check(b: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
    """The kernel's loss and gradients against the reference on one fresh input; raises on a mismatch."""
    x = _inputs(b, d, dtype, device)
    want = _step(byol_loss_ref, x)().detach()
    want_grads = [x[0].grad.clone(), x[1].grad.clone()]  # type: ignore[union-attr]
    got = _step(byol_loss, x)().detach()
    rtol = VALUE_RTOL[dtype]
    assert_close_at(got, want, rtol, rtol, f"byol_loss B={b} D={d} {dtype}")
    for name, g, w in zip(("p1", "p2"), (x[0].grad, x[1].grad), want_grads):
        assert g is not None
        atol = GRAD_RTOL[dtype] * w.abs().max().item()  # host sync: outside any timed region
        assert_close_at(g, w, GRAD_RTOL[dtype], atol, f"grad {name} B={b} D={d} {dtype}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device: torch.device = args.device
    if not triton_runs_here(device):
        raise SystemExit("bench_loss: Triton on the CPU needs TRITON_INTERPRET=1 set before Python starts")
    batches, d = ((8, 33), 16) if args.quick else ((256, 1024, 4096), 256)
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    env = environment(device)
    # --quick copies 4 MiB: cache-resident on most CPUs, so a smoke value there, not a DRAM ceiling.
    # At least 20 copies (milliseconds each): the ceiling must not be the noisiest number in the table.
    ceiling = copy_bandwidth_gbs(device, nbytes=(1 << 22) if args.quick else None, warmup=max(args.warmup, 3),
                                 iters=max(args.iters, 20))
    print(f"measured copy bandwidth {ceiling:.1f} GB/s")

    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        for b in batches:
            _check(b, d, dtype, device)
            # Bytes at the minimum traffic: forward reads p1, p2, z1, z2 (4 tensors); backward reads p1, p2,
            # z1, z2 again and writes grad p1, grad p2 (6): 10 [B, D] tensors in the input dtype. The scalar
            # loss and per-row partials are negligible. Extra passes the reference makes are its own cost.
            nbytes = 10 * b * d * torch.empty((), dtype=dtype).element_size()
            ref_ms = None
            for name, f in (("ref", byol_loss_ref), ("triton", byol_loss)):
                timing = time_fn(_step(f, _inputs(b, d, dtype, device)), device, warmup=args.warmup,
                                 iters=args.iters)
                ref_ms = timing.median_ms if ref_ms is None else ref_ms
                gbs = nbytes / (timing.median_ms * 1e-3) / 1e9
                rows.append({
                    "variant": name, "B": b, "D": d, "dtype": str(dtype).removeprefix("torch."),
                    "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                    "iters": timing.iters, "gb_per_s": gbs, "pct_of_copy_bw": 100.0 * gbs / ceiling,
                    "copy_bw_gb_per_s": ceiling, "speedup_vs_ref": ref_ms / timing.median_ms,
                })
    write_results(rows, env, args.out, "loss")


if __name__ == "__main__":
    main()
