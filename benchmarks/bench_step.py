"""The full BYOL training step, img/s and MFU: eager vs compiled vs compiled + kernels.

One step = forward of both views through online and target, the loss, backward, LARS and the target EMA:
exactly ``Trainer.forward_backward_step`` + ``Trainer.update`` of a run built from the ``synthetic-r50``
preset (ResNet-50, 224 px, bf16 autocast and channels-last on CUDA). The data are one synthetic batch made
on the device once and reused, so this is the step's own throughput, with no input pipeline (the DALI
pipeline has its own benchmark). An image is one pair of views.

Variants (``--variants``): ``eager`` (compile off, kernels off: the reference path), ``eager_kernels``,
``compiled`` (torch.compile default mode, kernels off), ``compiled_kernels``, and ``compiled_ro_kernels``
(mode reduce-overhead: CUDA graphs). MFU = achieved FLOP/s / the device's dense bf16 peak, with FLOPs
counted by ``torch.utils.flop_counter.FlopCounterMode`` on one eager step of the real model (convolutions
and matmuls, forward and backward; elementwise work is not counted, as is the convention).

Run from the repository root: ``python -m benchmarks.bench_step [--quick] [--batch 256]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import environment, parse_args, time_fn, triton_runs_here, write_results
from fastbyol.config import build_config
from fastbyol.engine.trainer import Trainer, start_run
from fastbyol.step.train_step import forward_loss

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (no sparsity).
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5,
                    "H200": 989.4, "A100": 312.0}
VARIANTS = {  # name -> (run.compile, run.kernels)
    "eager": ("off", "off"),
    "eager_kernels": ("off", "on"),
    "compiled": ("default", "off"),
    "compiled_kernels": ("default", "on"),
    "compiled_ro_kernels": ("reduce-overhead", "on"),
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(variant: str, args: argparse.Namespace, out_dir: Path) -> Trainer:
    compile_mode, kernels = VARIANTS[variant]
    overrides = [f"run.device={args.device.type}", f"run.compile={compile_mode}", f"run.kernels={kernels}",
                 f"optim.batch_size={args.batch}", f"run.out_dir={out_dir}", f"run.name={variant}",
                 "run.progress=off", "run.max_steps=1000"]
    if args.quick:  # seconds on a CPU: the smallest ResNet on small images, narrow heads
        overrides += ["model.arch=resnet18", "model.small_stem=true", "data.image_size=32",
                      "model.proj_hidden=64", "model.proj_dim=32"]
    return start_run(build_config("synthetic-r50", overrides=overrides))


def step_fn(trainer: Trainer) -> tuple[Any, Any]:
    batch = next(trainer.source.batches(0, trainer.batch_size, 1))
    trainer.step = trainer.total_steps // 2  # any step past warm-up: the cost does not depend on lr or tau

    def step() -> None:
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.forward_backward_step(batch, 1.0)
        trainer.update()

    return step, batch


def flops_per_step(trainer: Trainer, batch: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    compiled, trainer.forward = trainer.forward, forward_loss  # count on the eager graph: same math
    try:
        with counter:
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.forward_backward_step(batch, 1.0)
    finally:
        trainer.forward = compiled
    return float(counter.get_total_flops())


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
    env = environment(args.device)
    peak = peak_tflops(args.device, args.peak_tflops)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            trainer = build(name, args, Path(tmp))
            step, batch = step_fn(trainer)
            flops = flops_per_step(trainer, batch) if not rows else rows[0]["gflop_per_step"] * 1e9
            if args.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(args.device)
            # Warm-up covers compilation and, for reduce-overhead, the CUDA-graph recording runs.
            warmup = args.warmup if args.quick else max(args.warmup, 3)
            timing = time_fn(step, args.device, warmup=warmup, iters=args.iters)
            img_per_s = args.batch / (timing.median_ms / 1e3)
            achieved = flops / (timing.median_ms / 1e3) / 1e12
            rows.append({
                "variant": name, "arch": trainer.cfg.model.arch, "image_size": trainer.cfg.data.image_size,
                "batch": args.batch, "bf16": trainer.bf16, "channels_last": trainer.channels_last,
                "compile": trainer.compile_mode, "kernels": trainer.kernels,
                "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                "iters": timing.iters, "img_per_s": img_per_s,
                "gflop_per_step": flops / 1e9, "gflop_per_image": flops / 1e9 / args.batch,
                "tflop_per_s": achieved, "mfu_pct": 100 * achieved / peak if peak else None,
                "max_mem_gb": torch.cuda.max_memory_allocated(args.device) / 1e9 if args.device.type == "cuda"
                else None,
                "speedup_vs_eager": None,
            })
            del trainer, step, batch
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    base = next((r["median_ms"] for r in rows if r["variant"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = base / row["median_ms"] if base else None
    write_results(rows, env, args.out, "step")


if __name__ == "__main__":
    main()
