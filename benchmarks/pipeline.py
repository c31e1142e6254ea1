"""Input pipelines side by side: images/s (two BYOL views each) of the torchvision/PIL pipeline and the
DALI pipeline (full decode, or ROI decode of each view), same folder, same thread count, same output.

Each variant is the real data source of a run (``TorchVisionSource`` with ``data.workers`` = threads,
``DaliSource`` with that many DALI threads; on a GPU DALI decodes with ``device="mixed"``): one warm-up
batch (worker start-up, pipeline build), then ``--batches`` timed batches; per-thread throughput is
total / threads. With ``--train-steps K`` each loader also feeds K steps of a real run (``digits``
preset's model at this image size) and the row carries that run's data-wait fraction (the share of
step time the loop waited for data, as ``metrics.jsonl`` logs it).

``--resizes pil,official`` times each loader with each ``data.resize`` back to back (the pil row, then the
official one, per loader, so the two are minutes apart at most on a machine whose load drifts); a row's
``ratio_vs_torch`` is to the torchvision row of the same resize, its ``ratio_vs_pil`` to the same loader's
pil row.

Without ``--folder`` a synthetic folder of JPEGs is written first (``--images`` images of
``--source-size`` px, quality 95: ImageNet-like decode cost at 320-500 px).

Run from the repository root: ``python -m benchmarks.pipeline [--quick] [--threads 2] [--size 224]
[--resizes pil,official]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import environment, parse_args, write_results
from fastbyol.config_parse import build_config
from fastbyol.data.augment import RESIZES
from fastbyol.data.builders import make_synthetic
from fastbyol.data.loader import build_source

VARIANTS = {"torch": ("torch", "full"), "dali": ("dali", "full"), "dali_roi": ("dali", "roi")}


def _config(folder: Path, variant: str, args: argparse.Namespace, extra: list[str], resize: str = "pil") -> Any:
    loader, decode = VARIANTS[variant]
    return build_config("digits", overrides=[
        f"data.path={folder}", f"data.loader={loader}", f"data.dali_decode={decode}", f"data.resize={resize}",
        f"data.workers={args.threads}", f"data.image_size={args.size}", f"run.device={args.device.type}", *extra])


def images_per_s(folder: Path, variant: str, args: argparse.Namespace, resize: str = "pil") -> float:
    cfg = _config(folder, variant, args, [], resize)
    source = build_source(cfg.data, 0, args.device)
    batches = source.batches(0, args.batch, args.batches + 1)
    next(batches)  # warm-up: workers start, the pipeline builds
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        if args.device.type == "cuda":
            batch.views.view2.sum().item()  # the batch is ready on the device (a sync, outside any step)
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.batches / (time.perf_counter() - t0)


def data_wait(folder: Path, variant: str, args: argparse.Namespace, out: Path, resize: str = "pil") -> float:
    from fastbyol.engine.trainer import start_run
    from fastbyol.telemetry.sinks import read_metrics

    name = f"{variant}-{resize}"
    cfg = _config(folder, variant, args, [
        f"optim.batch_size={args.batch}", f"run.max_steps={args.train_steps}", f"run.log_every={args.train_steps}",
        f"run.out_dir={out}", f"run.name={name}", "run.progress=off", "run.ckpt_every=1000000"], resize)
    start_run(cfg).train()
    return float(read_metrics(out / name / "metrics.jsonl")[-1]["data_wait_frac"])


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--folder", type=Path, default=None, help="image folder (default: synthetic JPEGs)")
        parser.add_argument("--images", type=int, default=None, help="synthetic images (default 512; quick 64)")
        parser.add_argument("--source-size", type=int, default=None, help="synthetic image side (default 400)")
        parser.add_argument("--size", type=int, default=None, help="view size (default 224; quick 32)")
        parser.add_argument("--threads", type=int, default=2, help="DataLoader workers = DALI threads")
        parser.add_argument("--batch", type=int, default=None, help="images per batch (default 64; quick 16)")
        parser.add_argument("--batches", type=int, default=None, help="timed batches (default 8; quick 2)")
        parser.add_argument("--train-steps", type=int, default=0, help="steps of a real run per loader, for "
                                                                         "the data-wait fraction (0: skip)")
        parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
        parser.add_argument("--resizes", default="pil", help=f"data.resize values to time, comma-separated, from "
                                                             f"{', '.join(RESIZES)} (default pil)")

    args = parse_args("Input pipelines: torchvision vs DALI images/s, same folder and threads", extra)
    args.images = args.images or (64 if args.quick else 512)
    args.source_size = args.source_size or (64 if args.quick else 400)
    args.size = args.size or (32 if args.quick else 224)
    args.batch = args.batch or (16 if args.quick else 64)
    args.batches = args.batches or (2 if args.quick else 8)
    names = args.variants.split(",")
    if any(n not in VARIANTS for n in names):
        raise SystemExit(f"pipeline: unknown variant in {args.variants}: choose from {', '.join(VARIANTS)}")
    resizes = args.resizes.split(",")
    if any(r not in RESIZES for r in resizes):
        raise SystemExit(f"pipeline: unknown resize in {args.resizes}: choose from {', '.join(RESIZES)}")
    env = environment(args.device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            classes = 8
            make_synthetic(str(Path(tmp) / "images"), num_classes=classes, train_per_class=args.images // classes,
                           val_per_class=0, size=args.source_size)
            folder = Path(tmp) / "images" / "train"
        for name in names:
            for resize in resizes:
                rate = images_per_s(folder, name, args, resize)
                source = str(args.folder) if args.folder else f"synthetic {args.source_size}px JPEG"
                row: dict[str, Any] = {
                    "variant": name, "resize": resize, "device_kind": args.device.type, "threads": args.threads,
                    "size": args.size, "source": source,
                    "batch": args.batch, "batches": args.batches, "img_per_s": rate,
                    "img_per_s_per_thread": rate / args.threads, "ratio_vs_torch": None, "ratio_vs_pil": None,
                    "data_wait_frac": None,
                }
                if args.train_steps:
                    row["data_wait_frac"] = data_wait(folder, name, args, Path(tmp) / "runs", resize)
                rows.append(row)
    for row in rows:
        torch_rate = next((r["img_per_s"] for r in rows if r["variant"] == "torch" and r["resize"] == row["resize"]),
                          None)
        pil_rate = next((r["img_per_s"] for r in rows if r["variant"] == row["variant"] and r["resize"] == "pil"), None)
        row["ratio_vs_torch"] = row["img_per_s"] / torch_rate if torch_rate else None
        row["ratio_vs_pil"] = row["img_per_s"] / pil_rate if pil_rate else None
    write_results(rows, env, args.out, "pipeline")


if __name__ == "__main__":
    main()
