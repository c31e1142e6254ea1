"""Feature extraction for evaluation (issue 20): images/s of ``extract_features`` over one image folder with
0, 1, 2... DataLoader workers, the same encoder, the same images, in one run.

Each variant is one full pass of ``fastbyol.eval.features.extract_features`` (centre views: decode, bicubic
resize, centre crop, normalise; batches of ``--batch-size`` through a ResNet-18 in eval mode): with 0 workers
this process decodes and runs the encoder in turn; with N it runs the encoder while N processes decode. Every
variant's features are compared with an untimed 0-worker pass at the same thread count bit for bit
(``same_as_0_workers``); that pass also warms up (page cache, oneDNN's kernels). Then ``--rounds`` timed passes
per variant (median, p10, p90).

Two ceilings beside every row: ``decode_img_per_s``, one process producing views alone (no encoder), and
``forward_img_per_s``, the encoder alone on one batch of views already in memory. With workers the rate is
at most the smaller of the forward's and N times the decode's, less what the workers take from the encoder's
cores: on a CPU the encoder and the workers share the same cores (``--threads`` sets the encoder's intra-op
threads; the default sweeps the CPU count and 1). ``load_1m`` is the load average when the variant ran: on a
shared machine another job's processes compete for the same cores.

Without ``--folder`` a synthetic folder is written first (``fastbyol data make synthetic``: ``--images``
procedural JPEGs of ``--source-size`` px, quality 95).

Run from the repository root: ``python -m benchmarks.eval_features [--quick] [--images 3000]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks.harness import add_image_folder_args, environment, image_folder, parse_args, quantile, write_results
from fastbyol.config import ModelConfig
from fastbyol.data.folder import ImageFiles
from fastbyol.eval.features import CenterViews, extract_features
from fastbyol.model.backbone import Encoder


def decode_rate(files: ImageFiles, size: int, images: int) -> float:
    """Centre views/s of one process with no encoder (what one worker can feed)."""
    views = CenterViews(files, size)
    t0 = time.perf_counter()
    for i in range(images):
        views[i % len(views)]
    return images / (time.perf_counter() - t0)


def forward_rate(encoder: torch.nn.Module, files: ImageFiles, size: int, batch_size: int, device: torch.device,
                 rounds: int) -> float:
    """Images/s of the encoder alone, on one batch of views already in memory (median of ``rounds``)."""
    views = CenterViews(files, size)
    x = torch.stack([views[i % len(views)][0] for i in range(batch_size)]).to(device)
    seconds = []
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        for i in range(rounds + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            encoder(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the forward's kernels have finished
            if i:  # the first call warms up
                seconds.append(time.perf_counter() - t0)
    return batch_size / statistics.median(seconds)


def _extra(parser: argparse.ArgumentParser) -> None:
    add_image_folder_args(parser, images=(3000, 48), side=(96, 40))
    parser.add_argument("--size", type=int, default=None, help="evaluation crop side (default 64; quick 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default 256; quick 16)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated (0,1,2)")
    parser.add_argument("--threads", default=None,
                        help="encoder intra-op thread counts, comma-separated (default: the CPU count and 1; "
                             "quick: the current count only)")
    parser.add_argument("--rounds", type=int, default=None, help="timed passes per variant (default 3; quick 1)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    args.size = args.size or (32 if args.quick else 64)
    args.batch_size = args.batch_size or (16 if args.quick else 256)
    args.rounds = args.rounds or (1 if args.quick else 3)
    workers = [int(w) for w in args.workers.split(",")]
    cpus = os.cpu_count() or 1
    threads_default = str(torch.get_num_threads()) if args.quick else ",".join(dict.fromkeys([str(cpus), "1"]))
    threads = [int(t) for t in (args.threads or threads_default).split(",")]
    device = args.device
    # Eval mode throughout: a train-mode forward (forward_rate's) would move the BatchNorm statistics.
    encoder = Encoder.from_config(ModelConfig(arch="resnet18", small_stem=False), init="torchvision").to(device).eval()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = image_folder(args, tmp)
        files = ImageFiles.scan(str(folder))
        decode = decode_rate(files, args.size, min(len(files), 500))
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            # Untimed: warms the page cache and oneDNN's kernels; the bits every variant must give (the
            # thread count may change a convolution's summation order, so one reference per count).
            reference, _ = extract_features(encoder, files, args.size, device, batch_size=args.batch_size)
            forward = forward_rate(encoder, files, args.size, args.batch_size, device, rounds=max(args.rounds, 2))
            for n_workers in workers:
                seconds, same = [], True
                load = os.getloadavg()[0]
                for _ in range(args.rounds):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    features, _ = extract_features(encoder, files, args.size, device, batch_size=args.batch_size,
                                                   workers=n_workers)
                    seconds.append(time.perf_counter() - t0)  # features are on the CPU: the device has finished
                    same = same and torch.equal(features, reference)
                seconds.sort()
                median = statistics.median(seconds)
                rows.append({
                    "workers": n_workers, "threads": n_threads, "images": len(files), "size": args.size,
                    "batch_size": args.batch_size, "median_s": median, "p10_s": quantile(seconds, 0.1),
                    "p90_s": quantile(seconds, 0.9), "rounds": args.rounds, "img_per_s": len(files) / median,
                    "decode_img_per_s": decode, "forward_img_per_s": forward, "same_as_0_workers": same,
                    "load_1m": load, "cpus": cpus,
                    "folder": str(args.folder) if args.folder else f"synthetic {args.source_size}px JPEG q95",
                })
    for row in rows:
        base = [r["img_per_s"] for r in rows if r["threads"] == row["threads"] and r["workers"] == 0]
        row["speedup_vs_0_workers"] = row["img_per_s"] / base[0] if base else None
    write_results(rows, environment(device), args.out, "eval-features")


if __name__ == "__main__":
    main()
