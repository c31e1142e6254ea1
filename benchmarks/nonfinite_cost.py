"""What the non-finite guard costs per optimizer step (issue 8), measured on the trainer's own guard.

Every step runs ``NonFiniteGuard.check`` (one ``_foreach_norm`` over the gradients, a few device ops): the
price of ``run.nonfinite=stop``. ``run.nonfinite=skip`` adds ``snapshot`` (copy every tensor a step writes:
online and target weights, LARS momentum, BatchNorm statistics) and ``restore_if_bad`` (a ``torch.where``
over the same tensors): 2 + 3 = 5 passes over those bytes, bandwidth-bound. The trainer is built exactly as
``fastbyol train`` builds it (synthetic data, ``--arch``; one real step first so every gradient exists), and
the three calls are timed as the loop makes them. Bytes moved are set against the measured copy bandwidth
and the cost against ``--step-ms``.

Run from the repository root: ``python -m benchmarks.nonfinite_cost [--arch resnet50] [--step-ms 100]``.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from typing import Any

import torch

from benchmarks.harness import copy_bandwidth_gbs, environment, parse_args, time_fn, write_results
from fastbyol.config_parse import build_config
from fastbyol.engine.trainer import start_run


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="resnet50", help="encoder (default resnet50; --quick: resnet18)")
    parser.add_argument("--kernels", default="off", help="run.kernels: off (per-tensor) or on (flat buffers)")
    parser.add_argument("--step-ms", type=float, default=0.0,
                        help="a measured training step in ms, to express the cost as a share of it")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    device: torch.device = args.device
    arch = "resnet18" if args.quick and args.arch == "resnet50" else args.arch
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ("stop", "skip"):
            cfg = build_config("synthetic-r50", overrides=[
                f"model.arch={arch}", "optim.batch_size=4", "data.image_size=32", f"run.device={device.type}",
                f"run.nonfinite={policy}", f"run.kernels={args.kernels}", "run.telemetry=off", "run.compile=off",
                f"run.out_dir={tmp}", f"run.name={policy}", "run.progress=off"])
            trainer = start_run(cfg)
            batches = trainer.source.batches(0, trainer.batch_size, 1)
            trainer.train_step(batches)  # every gradient and momentum buffer exists from here on
            guard = trainer.guard
            loss: dict[str, torch.Tensor | None] = {"loss": trainer._last_out.loss}
            check = time_fn(partial(guard.check, loss), device, args.warmup, args.iters)
            row: dict[str, Any] = {"policy": policy, "arch": arch, "kernels": trainer.kernels,
                                   "check_ms": check.median_ms, "protected_mib": None, "snapshot_ms": None,
                                   "restore_ms": None, "gb_per_s": None}
            total = check.median_ms
            if guard.protect is not None:
                ok = guard.check(loss)
                snap = time_fn(guard.snapshot, device, args.warmup, args.iters)
                restore = time_fn(partial(guard.restore_if_bad, ok), device, args.warmup, args.iters)
                protected = sum(t.numel() * t.element_size() for t in guard.protect)
                moved = 5 * protected  # snapshot reads + writes; restore reads both, writes one
                total += snap.median_ms + restore.median_ms
                row.update(protected_mib=protected / 2**20, snapshot_ms=snap.median_ms,
                           restore_ms=restore.median_ms,
                           gb_per_s=moved / ((snap.median_ms + restore.median_ms) * 1e-3) / 1e9)
            row["per_step_ms"] = total
            if args.step_ms:
                row["pct_of_step"] = 100.0 * total / args.step_ms
            rows.append(row)
            del trainer, batches
    ceiling = copy_bandwidth_gbs(device)
    for row in rows:
        row["copy_bw_gb_per_s"] = ceiling
        row["pct_of_copy_bw"] = None if row["gb_per_s"] is None else 100.0 * row["gb_per_s"] / ceiling
    write_results(rows, environment(device), args.out, "nonfinite-cost")


if __name__ == "__main__":
    main()
