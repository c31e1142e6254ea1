"""Reading an image folder against reading its tar shards (issue 19): images/s and MB/s of the bytes, for read
only and for read + decode, same images, same order, one thread.

Each variant is what a DataLoader worker does per sample: ``ImageFiles`` (open, read, close one file; for
decode, PIL's ``load_rgb``) against ``ShardImages`` (one ``pread`` on a descriptor kept open; ``decode_rgb`` of
the bytes). Images are visited in the stream's order (epoch 0's permutation, ``StreamOrder``): random access,
as in training. One untimed warm-up pass, then ``--rounds`` timed passes (median, p10, p90).

The page cache is warm (the folder was just written, then read by the warm-up): this measures the per-file
system-call and file-system cost on a local disk's cache, not a disk or a network. On a networked cluster
file system (Lustre, GPFS, NFS) every open of a loose file is a metadata round trip to a server, so the gap
is larger there; this script does not measure that.

Without ``--folder`` a synthetic folder is written first (``fastbyol data make synthetic``: ``--images``
procedural JPEGs of ``--source-size`` px, quality 95), then packed (``fastbyol data pack``, timed).

Run from the repository root: ``python -m benchmarks.shard_read [--quick] [--images 10000]``.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.harness import add_image_folder_args, environment, image_folder, parse_args, time_fn, write_results
from fastbyol.data.folder import ImageFiles, scan_image_folder
from fastbyol.data.shards import ShardImages, open_shards, pack_folder, parse_size
from fastbyol.data.stream import StreamOrder


def read_pass(images: ImageFiles | ShardImages, order: list[int]) -> int:
    """Read every image's bytes in ``order``; the bytes read."""
    return sum(len(images.read(i)) for i in order)


def decode_pass(images: ImageFiles | ShardImages, order: list[int]) -> int:
    """Read and decode every image in ``order`` to RGB (what a worker does before augmenting); the pixels."""
    total = 0
    for i in order:
        image, _ = images[i]
        total += image.width * image.height
    return total


def _extra(parser: argparse.ArgumentParser) -> None:
    add_image_folder_args(parser, images=(10_000, 64), side=(400, 64))
    parser.add_argument("--decode-images", type=int, default=None,
                        help="images per read+decode pass, the first of the order (default 1000; quick 16)")
    parser.add_argument("--shard-size", default="256MB", help="fastbyol data pack --shard-size (default 256MB)")
    parser.add_argument("--rounds", type=int, default=None, help="timed passes per variant (default 5; quick 2)")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    args.decode_images = args.decode_images or (16 if args.quick else 1000)
    args.rounds = args.rounds or (2 if args.quick else 5)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = image_folder(args, tmp)
        paths, labels, _ = scan_image_folder(str(folder))
        report = pack_folder(str(folder), str(Path(tmp) / "shards"), parse_size(args.shard_size))
        sources: dict[str, ImageFiles | ShardImages] = {"folder": ImageFiles(paths, labels),
                                                        "shards": open_shards(str(Path(tmp) / "shards"))}
        stream = StreamOrder(len(paths), seed=0)
        order = [stream.index_at(p) for p in range(len(paths))]
        decode_order = order[:args.decode_images]
        for work, run, visit in (("read", read_pass, order), ("read+decode", decode_pass, decode_order)):
            nbytes = read_pass(sources["folder"], visit)
            for name, images in sources.items():
                timing = time_fn(partial(run, images, visit), args.device, warmup=1, iters=args.rounds)
                seconds = timing.median_ms / 1e3
                rows.append({
                    "source": name, "work": work, "images": len(visit), "mb": nbytes / 1e6,
                    "img_per_s": len(visit) / seconds, "mb_per_s": nbytes / 1e6 / seconds,
                    "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                    "rounds": timing.iters, "shards": len(report.shards), "shard_size": args.shard_size,
                    "folder": str(args.folder) if args.folder else f"synthetic {args.source_size}px JPEG q95",
                    "pack_s": report.seconds if name == "shards" else None, "page_cache": "warm",
                })
    for row in rows:
        folder_rate = next(r["img_per_s"] for r in rows if r["work"] == row["work"] and r["source"] == "folder")
        row["speedup_vs_folder"] = row["img_per_s"] / folder_rate
    write_results(rows, environment(args.device), args.out, "shard-read")


if __name__ == "__main__":
    main()
