"""Target EMA ``xi = tau * xi + (1 - tau) * theta`` over a BYOL ResNet-50 target's parameters (~33 M fp32).

The update reads target and online and writes target once per step: 12 bytes per fp32 value and no reuse,
so it is bandwidth-bound and the ceiling is the device's copy bandwidth. Variants:

- ``loop``: one ``mul_`` + ``add_`` per tensor from Python: 2 launches x 164 tensors, and an extra round trip
  of the target through memory between the two ops;
- ``foreach``: ``fastbyol.step.ema.ema_update_`` (one ``torch._foreach_lerp_`` over all pairs);
- ``triton_flat``: ``fastbyol.kernels.ema.ema_flat_`` over one flat buffer each, one launch.

Run from the repository root: ``python -m benchmarks.bench_ema [--quick] [--device cpu]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastbyol.kernels.ema import ema_flat_, ema_flat_ref

from benchmarks.harness import copy_bandwidth_gbs, environment, parse_args, time_fn, triton_runs_here, write_results
from fastbyol.step.ema import ema_update_

TAU = 0.99  # byol-r50-300ep's base tau (BYOL.md, "Schedules"); the cost does not depend on its value
# Odd, non-power-of-two shapes for --quick: seconds under TRITON_INTERPRET=1, tails in every block.
QUICK_SHAPES: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (33, 17), (5,), (128, 65), (7, 3, 3, 3), (1,), (1000,)]
MAX_ABS_DIFF = 1e-6


def target_shapes() -> list[tuple[int, ...]]:
    """The target parameters' shapes of the ResNet-50 BYOL pair, built on the meta device (no memory)."""
    from fastbyol.config_parse import build_config
    from fastbyol.model.byol import ByolPair

    # data.source only satisfies validation (a folder source needs a path); the model config is the preset's.
    cfg = build_config("byol-r50-300ep", None, ["data.source=synthetic"])
    with torch.device("meta"):
        pair = ByolPair(cfg.model, seed=0)
    _, target = pair.param_pairs()
    return [tuple(p.shape) for p in target]


def _split(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Separate tensors (own allocations, as unflattened parameters are) holding the flat buffer's values."""
    out, start = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        out.append(flat[start:start + n].view(shape).clone())
        start += n
    return out


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def variants(device: torch.device) -> dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], Callable[[], None]]]:
    """Name -> factory: given fresh (targets, onlines) lists, return the zero-argument update to time."""
    tau_t = torch.tensor([TAU], dtype=torch.float32, device=device)

    def loop(t: list[torch.Tensor], o: list[torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for xi, theta in zip(t, o):
                    xi.mul_(TAU).add_(theta, alpha=1.0 - TAU)
        return run

    def foreach(t: list[torch.Tensor], o: list[torch.Tensor]) -> Callable[[], None]:
        return lambda: ema_update_(t, o, TAU)

    def triton_flat(t: list[torch.Tensor], o: list[torch.Tensor]) -> Callable[[], None]:
        t_flat, o_flat = _cat(t), _cat(o)
        t[:] = [t_flat]  # the check reads the result back through the list
        return lambda: ema_flat_(t_flat, o_flat, tau_t)

    table: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], Callable[[], None]]] = {
        "loop": loop, "foreach": foreach}
    if not triton_runs_here(device):
        print("triton variants skipped: no GPU and TRITON_INTERPRET is not 1")
        return table
    table["triton_flat"] = triton_flat
    return table


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device: torch.device = args.device
    shapes = QUICK_SHAPES if args.quick else target_shapes()
    n_values = sum(torch.Size(s).numel() for s in shapes)
    env = environment(device)
    # --quick copies 4 MiB: cache-resident on most CPUs, so a smoke value there, not a DRAM ceiling.
    # At least 20 copies (milliseconds each): the ceiling must not be the noisiest number in the table.
    ceiling = copy_bandwidth_gbs(device, nbytes=(1 << 22) if args.quick else None, warmup=max(args.warmup, 3),
                                 iters=max(args.iters, 20))
    print(f"{len(shapes)} tensors, {n_values} values; measured copy bandwidth {ceiling:.1f} GB/s")
    tau_t = torch.tensor([TAU], dtype=torch.float32, device=device)

    rows: list[dict[str, Any]] = []
    for name, make in variants(device).items():
        # Fresh uniform [0, 1) values (never zeros: an unwritten or wrongly weighted element shows), so every
        # result is within 1 and fp32 rounding differences between variants stay near 1e-7.
        target_flat = torch.rand(n_values, dtype=torch.float32, device=device)
        online_flat = torch.rand(n_values, dtype=torch.float32, device=device)
        expected = target_flat.clone()
        ema_flat_ref(expected, online_flat, tau_t)
        targets, onlines = _split(target_flat, shapes), _split(online_flat, shapes)
        update = make(targets, onlines)
        update()
        diff = (_cat(targets) - expected).abs().max().item()  # a host sync, outside the timed region
        if not diff <= MAX_ABS_DIFF:
            raise RuntimeError(f"ema variant {name}: max abs diff {diff:.3g} from ema_flat_ref > {MAX_ABS_DIFF}")
        # Repeated updates keep values in [0, 1): a convex combination of values in [0, 1).
        timing = time_fn(update, device, warmup=args.warmup, iters=args.iters)
        gbs = 3 * n_values * 4 / (timing.median_ms * 1e-3) / 1e9  # read xi, read theta, write xi
        rows.append({
            # tensors the call takes: 1 flat buffer pair for triton_flat, one per parameter for the others
            "variant": name, "n_tensors": len(targets),
            "n_values": n_values, "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
            "iters": timing.iters, "gb_per_s": gbs, "pct_of_copy_bw": 100.0 * gbs / ceiling,
            "copy_bw_gb_per_s": ceiling,
        })
    loop_ms = next(r["median_ms"] for r in rows if r["variant"] == "loop")
    for row in rows:
        row["speedup_vs_loop"] = loop_ms / row["median_ms"]
    write_results(rows, env, args.out, "ema")


if __name__ == "__main__":
    main()
