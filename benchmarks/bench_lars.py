"""One BYOL optimizer step (LARS) + target EMA over a BYOL ResNet-50 online network's parameters (~35 M fp32).

The online network is the online tower + predictor; the target is the online tower's twin, i.e. the first
``n_paired`` elements of the flat online buffer (``ByolPair.flatten_pairs_``). Biases and BatchNorm
parameters are excluded from weight decay and the trust ratio (``lars_param_groups``). Variants:

- ``loop``: ``fastbyol.step.lars.lars_ref`` tensor by tensor from Python, written back with ``copy_``, then
  a per-tensor EMA loop: the naive baseline;
- ``foreach``: the ``LARS`` optimizer (``torch._foreach`` ops) on parameters that are views into the flat
  buffer, then ``ema_update_`` (one ``_foreach_lerp_``) over the paired views;
- ``triton_unfused``: ``fastbyol.kernels.lars.lars_flat`` then ``fastbyol.kernels.ema.ema_flat_``;
- ``triton_fused``: ``fastbyol.kernels.lars.lars_ema_flat`` (the EMA written from the update's registers).

Run from the repository root: ``python -m benchmarks.bench_lars [--quick] [--device cpu]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from fastbyol.kernels.ema import ema_flat_
from fastbyol.kernels.lars import LarsLayout, build_layout, lars_ema_flat, lars_ema_flat_ref, lars_flat

from benchmarks.harness import copy_bandwidth_gbs, environment, parse_args, time_fn, triton_runs_here, write_results
from fastbyol.step.ema import ema_ref, ema_update_
from fastbyol.step.lars import LARS, lars_param_groups, lars_ref

# byol-r50-300ep's optimiser (BYOL.md, "Optimiser"); lr is the peak 0.2 * 4096 / 256, tau the base tau.
# The cost does not depend on these values.
LR = 3.2
TAU = 0.99
WEIGHT_DECAY = 1.5e-6
MOMENTUM = 0.9
ETA = 1e-3
MAX_ABS_DIFF = 1e-5

# --quick: odd, non-power-of-two shapes, a few thousand values; (shape, excluded). The first QUICK_PAIRED
# tensors stand for the online tower (paired with the target), the rest for the predictor.
QUICK_TENSORS: list[tuple[tuple[int, ...], bool]] = [
    ((16, 3, 7, 7), False), ((16,), True), ((16,), True), ((33, 17), False), ((33,), True), ((5, 3, 3, 3), False),
    ((1,), True),
    ((40, 33), False), ((40,), True), ((40,), True), ((7, 40), False), ((7,), True),
]
QUICK_PAIRED = 7


class Spec(NamedTuple):
    """The flat online buffer's tensors in order, and how many leading values the target twins."""

    shapes: list[tuple[int, ...]]
    excluded: list[bool]
    n_paired: int


def byol_r50_spec() -> Spec:
    """Shapes and exclusions of the ResNet-50 BYOL online network, built on the meta device (no memory),
    in ``flatten_pairs_`` order: paired online-tower parameters (``param_pairs`` order), then the rest."""
    from fastbyol.config_parse import build_config
    from fastbyol.model.byol import ByolPair

    # data.source only satisfies validation (a folder source needs a path); the model config is the preset's.
    cfg = build_config("byol-r50-300ep", None, ["data.source=synthetic"])
    with torch.device("meta"):
        pair = ByolPair(cfg.model, seed=0)
    groups = lars_param_groups(named for module in pair.online_modules() for named in module.named_modules())
    excluded_ids = {id(p) for g in groups if g["excluded"] for p in cast("list[torch.Tensor]", g["params"])}
    online, _ = pair.param_pairs()
    ordered = pair.online_flat_order()
    return Spec([tuple(p.shape) for p in ordered], [id(p) in excluded_ids for p in ordered],
                sum(p.numel() for p in online))


def quick_spec() -> Spec:
    shapes = [s for s, _ in QUICK_TENSORS]
    return Spec(shapes, [e for _, e in QUICK_TENSORS],
                sum(torch.Size(s).numel() for s in shapes[:QUICK_PAIRED]))


class State(NamedTuple):
    """Flat fp32 buffers of one run: param, grad, momentum (all n values) and target (n_paired values)."""

    param: torch.Tensor
    grad: torch.Tensor
    momentum: torch.Tensor
    target: torch.Tensor

    def clone(self) -> State:
        return State(*(t.clone() for t in self))


def _views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Views into the flat buffer, one per tensor, in order (no copies)."""
    out, start = [], 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        out.append(flat[start:start + n].view(shape))
        start += n
    return out


Factory = Callable[[State], Callable[[], None]]


def variants(spec: Spec, layout: LarsLayout, device: torch.device) -> dict[str, Factory]:
    """Name -> factory: given fresh buffers, return the zero-argument step (LARS + EMA) to time."""
    lr_t = torch.tensor([LR], dtype=torch.float32, device=device)
    tau_t = torch.tensor([TAU], dtype=torch.float32, device=device)
    n_paired_tensors = 0
    total = 0
    for shape in spec.shapes:
        if total >= spec.n_paired:
            break
        total += torch.Size(shape).numel()
        n_paired_tensors += 1

    def loop(s: State) -> Callable[[], None]:
        ps, gs, ms = _views(s.param, spec.shapes), _views(s.grad, spec.shapes), _views(s.momentum, spec.shapes)
        ts = _views(s.target, spec.shapes[:n_paired_tensors])

        def run() -> None:
            with torch.no_grad():
                for p, g, m, excluded in zip(ps, gs, ms, spec.excluded):
                    new_p, new_m = lars_ref(p, g, m, lr=LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM,
                                            eta=ETA, excluded=excluded)
                    m.copy_(new_m)
                    p.copy_(new_p)
                for t, p in zip(ts, ps):
                    t.copy_(ema_ref(t, p, TAU))
        return run

    def foreach(s: State) -> Callable[[], None]:
        params = [torch.nn.Parameter(v) for v in _views(s.param, spec.shapes)]  # share the flat storage
        adapted = [p for p, e in zip(params, spec.excluded) if not e]
        excluded = [p for p, e in zip(params, spec.excluded) if e]
        opt = LARS([{"params": adapted, "excluded": False}, {"params": excluded, "excluded": True}], lr=LR,
                   weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, eta=ETA)
        for p, g, m in zip(params, _views(s.grad, spec.shapes), _views(s.momentum, spec.shapes)):
            p.grad = g
            opt.state[p]["momentum_buffer"] = m  # the flat momentum, not zeros: the check compares it
        targets = _views(s.target, spec.shapes[:n_paired_tensors])
        onlines: list[torch.Tensor] = list(params[:n_paired_tensors])

        def run() -> None:
            opt.step()
            ema_update_(targets, onlines, TAU)
        return run

    def triton_unfused(s: State) -> Callable[[], None]:
        def run() -> None:
            lars_flat(s.param, s.grad, s.momentum, layout, lr_t, WEIGHT_DECAY, MOMENTUM, ETA)
            ema_flat_(s.target, s.param[:spec.n_paired], tau_t)
        return run

    def triton_fused(s: State) -> Callable[[], None]:
        return lambda: lars_ema_flat(s.param, s.grad, s.momentum, layout, lr_t, WEIGHT_DECAY, MOMENTUM, ETA,
                                     s.target, tau_t)

    table: dict[str, Factory] = {"loop": loop, "foreach": foreach}
    if not triton_runs_here(device):
        print("triton variants skipped: no GPU and TRITON_INTERPRET is not 1")
        return table
    table["triton_unfused"] = triton_unfused
    table["triton_fused"] = triton_fused
    return table


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device: torch.device = args.device
    spec = quick_spec() if args.quick else byol_r50_spec()
    sizes = [torch.Size(s).numel() for s in spec.shapes]
    n_values = sum(sizes)
    segments, offset = [], 0
    for n, excluded in zip(sizes, spec.excluded):
        segments.append((offset, n, excluded))
        offset += n
    layout = build_layout(segments, device)
    env = environment(device)
    # --quick copies 4 MiB: cache-resident on most CPUs, so a smoke value there, not a DRAM ceiling.
    ceiling = copy_bandwidth_gbs(device, nbytes=(1 << 22) if args.quick else None, warmup=max(args.warmup, 3),
                                 iters=max(args.iters, 20))
    print(f"{len(sizes)} tensors ({sum(spec.excluded)} excluded), {n_values} values, {spec.n_paired} paired; "
          f"measured copy bandwidth {ceiling:.1f} GB/s")

    # Random non-zero initial buffers; every variant starts from its own copy of the same values.
    gen = torch.Generator(device=device).manual_seed(0)
    initial = State(torch.randn(n_values, generator=gen, device=device),
                    1e-2 * torch.randn(n_values, generator=gen, device=device),
                    1e-3 * torch.randn(n_values, generator=gen, device=device),
                    torch.randn(spec.n_paired, generator=gen, device=device))
    expected = initial.clone()
    lars_ema_flat_ref(expected.param, expected.grad, expected.momentum, layout,
                      torch.tensor([LR], dtype=torch.float32, device=device), WEIGHT_DECAY, MOMENTUM, ETA,
                      expected.target, torch.tensor([TAU], dtype=torch.float32, device=device))

    # The minimum bytes a fused implementation must move per step (fp32, 4 B/value):
    #   norms pass: read p, g                         ->  8 B per value
    #   update pass: read p, g, m; write p, m          -> 20 B per value
    #   EMA, paired values only: read + write target   ->  8 B per paired value
    # = 28 * n_values + 8 * n_paired. Unfused variants move more; they are rated against the same minimum.
    min_bytes = 28 * n_values + 8 * spec.n_paired

    rows: list[dict[str, Any]] = []
    for name, make in variants(spec, layout, device).items():
        state = initial.clone()
        step = make(state)
        step()
        # Host syncs, outside the timed region.
        diff = max((state.param - expected.param).abs().max().item(),
                   (state.target - expected.target).abs().max().item())
        if not diff <= MAX_ABS_DIFF:
            raise RuntimeError(f"lars variant {name}: max abs diff {diff:.3g} from lars_ema_flat_ref "
                               f"> {MAX_ABS_DIFF}")
        # Buffers are re-used across timed calls: later steps see the updated values, same cost.
        timing = time_fn(step, device, warmup=args.warmup, iters=args.iters)
        gbs = min_bytes / (timing.median_ms * 1e-3) / 1e9
        rows.append({
            "variant": name, "n_tensors": len(sizes), "n_values": n_values, "n_paired": spec.n_paired,
            "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
            "iters": timing.iters, "gb_per_s": gbs, "pct_of_copy_bw": 100.0 * gbs / ceiling,
            "copy_bw_gb_per_s": ceiling, "max_abs_diff": diff,
        })
    median = {r["variant"]: r["median_ms"] for r in rows}
    for row in rows:
        row["speedup_vs_loop"] = median["loop"] / row["median_ms"]
        row["speedup_vs_foreach"] = median["foreach"] / row["median_ms"]
        row["speedup_fused_vs_unfused"] = (median["triton_unfused"] / row["median_ms"]
                                           if row["variant"] == "triton_fused" else None)
    write_results(rows, env, args.out, "lars")


if __name__ == "__main__":
    main()
