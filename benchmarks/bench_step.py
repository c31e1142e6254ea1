"""The full BYOL training step, img/s and MFU: eager vs compiled vs compiled + kernels.

One step = forward of both views through online and target, the loss, backward, LARS and the target EMA:
exactly ``Trainer.forward_backward_step`` + ``Trainer.update`` of a run built from the ``synthetic-r50``
preset (ResNet-50, 224 px, bf16 autocast and channels-last on CUDA). The data are one synthetic batch made
on the device once and reused, so this is the step's own throughput, with no input pipeline (the DALI
pipeline has its own benchmark). An image is one pair of views.

Variants (``--variants``): ``eager`` (compile off, kernels off: the reference path), ``eager_kernels``,
``compiled`` (torch.compile default mode, kernels off), ``compiled_kernels``, and ``compiled_ro_kernels``
(mode reduce-overhead: CUDA graphs). MFU = achieved FLOP/s / the device's dense bf16 peak, with FLOPs
counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real model (``fastbyol.engine.flops``:
convolutions and matmuls, forward and backward; elementwise work is not counted, as is the convention).

Each variant is one case of ``fastbyol bench`` (``fastbyol.engine.bench.run_case``: the same trainer, step,
warm-up and event timing), with telemetry off; this script names the five variants and adds the speed-up.

Run from the repository root: ``python -m benchmarks.bench_step [--quick] [--batch 256]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import environment, parse_args, triton_runs_here, write_results
from fastbyol.engine.bench import QUICK_OVERRIDES, Sweep, run_case

VARIANTS = {  # name -> (run.compile, run.kernels)
    "eager": ("off", "off"),
    "eager_kernels": ("off", "on"),
    "compiled": ("default", "off"),
    "compiled_kernels": ("default", "on"),
    "compiled_ro_kernels": ("reduce-overhead", "on"),
}


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--batch", type=int, default=None, help="images per step (default 256; quick 8)")
        parser.add_argument("--variants", default=None,
                            help=f"comma-separated, from {', '.join(VARIANTS)} (default: all on CUDA; "
                                 "eager and eager_kernels with --quick)")
        parser.add_argument("--peak-tflops", type=float, default=None,
                            help="the device's dense bf16 peak, for MFU where its name is not in the table")

    args = parse_args("Full BYOL step: img/s eager vs compiled vs compiled + kernels, and MFU", extra)
    args.batch = args.batch or (8 if args.quick else 256)
    default = "eager,eager_kernels" if args.quick or args.device.type != "cuda" else ",".join(VARIANTS)
    names = (args.variants or default).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench_step: unknown variant {unknown[0]}: choose from {', '.join(VARIANTS)}")
    if not triton_runs_here(args.device):
        names = [n for n in names if VARIANTS[n][1] == "off"]
        print("bench_step: no GPU and TRITON_INTERPRET unset: the kernels variants are skipped")
    overrides = [f"run.device={args.device.type}", *(QUICK_OVERRIDES if args.quick else [])]
    if args.peak_tflops:
        overrides.append(f"run.peak_tflops={args.peak_tflops}")
    # Warm-up covers compilation and, for reduce-overhead, the CUDA-graph recording runs.
    sweep = Sweep(overrides=overrides, steps=args.iters, rounds=1,
                  warmup=args.warmup if args.quick else max(args.warmup, 3))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            compile_mode, kernels = VARIANTS[name]
            case = {"method": "byol", "batch": args.batch, "compile": compile_mode, "kernels": kernels,
                    "channels_last": "auto",
                    "data": "synthetic", "telemetry": ("off",)}
            (row,) = run_case(sweep, case, Path(tmp), "")
            rows.append({"variant": name, "arch": row["arch"], "image_size": row["image_size"], "batch": args.batch,
                         "bf16": row["bf16"], "channels_last": row["channels_last_used"],
                         "compile": row["compile_used"], "kernels": row["kernels_used"],
                         **{k: row.get(k) for k in ("median_ms", "p10_ms", "p90_ms", "steps", "img_per_s",
                                                    "gflop_per_image", "tflop_per_s", "mfu_pct", "peak_mem_gib")},
                         "speedup_vs_eager": None})
    base = next((r["median_ms"] for r in rows if r["variant"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = base / row["median_ms"] if base else None
    write_results(rows, environment(args.device), args.out, "step")


if __name__ == "__main__":
    main()
