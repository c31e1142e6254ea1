"""``fastbyol demo``: build the demo's datasets (the shapes, then the digits as a quick sanity row), pretrain on
each with BYOL (and, with ``--method byol,simclr``, SimCLR on the same data, augmentation family, schedule and
encoder), and show what was learned: kNN and linear-probe accuracy of each pretrained encoder next to the
baselines with nothing learned, evaluated the same way: the raw pixels, and the same architecture at random
initialisation, torchvision's (the standard random network) and fastbyol's own (Haiku's, the paper presets'
starting point), BatchNorm calibrated on the training images."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastbyol.config import TIMM_PREFIX, build_config
from fastbyol.data.builders import make_digits, make_shapes
from fastbyol.engine.evaluate import calibrated_random_encoder, evaluate_encoder
from fastbyol.engine.trainer import start_run
from fastbyol.errors import FastByolError
from fastbyol.eval.baselines import RawPixels
from fastbyol.files import atomic_write_bytes

# Each dataset's builder; its presets are "<dataset>" (BYOL) and "<dataset>-simclr".
DATASETS: dict[str, Callable[[str], dict[str, int]]] = {"shapes": make_shapes, "digits": make_digits}
# Each method's preset suffix and its row in the table.
METHODS = {"byol": ("", "BYOL (online encoder)"), "simclr": ("-simclr", "SimCLR (encoder)")}
# The baselines' rows, below the methods'.
RAW_PIXELS = "raw pixels"
RANDOM_TORCHVISION = "random init, torchvision (BN cal.)"
RANDOM_FASTBYOL = "random init, fastbyol (BN cal.)"
RANDOM_TIMM = "random init, timm (BN cal.)"
# What --arch changes besides model.arch for a timm encoder: AdamW (the ViT and ConvNeXt recipes' optimizer;
# the presets' LARS learning rates are tuned for the ResNet-18), and for a timm ViT 4 px patches (64 tokens at
# 32 px) in 6 blocks, so it trains in minutes on a CPU (benchmarks/NOTES.md, issue 18).
TIMM_OVERRIDES = ["optim.name=adamw", "optim.base_lr=1e-3", "optim.weight_decay=0.05"]
VIT_OVERRIDES = ["model.timm_kwargs.patch_size=4", "model.timm_kwargs.depth=6"]


def arch_overrides(arch: str | None) -> list[str]:
    """The demo presets' changes for ``--arch`` (none for the torchvision ResNets); the user's own overrides
    come after them, so any can be set again."""
    if arch is None:
        return []
    if not arch.startswith(TIMM_PREFIX):
        return [f"model.arch={arch}"]
    vit = arch.removeprefix(TIMM_PREFIX).startswith("vit_")
    return [f"model.arch={arch}", *TIMM_OVERRIDES, *(VIT_OVERRIDES if vit else [])]


def run_demo(out_dir: str, overrides: list[str], linear_epochs: int = 80, methods: tuple[str, ...] = ("byol",),
             datasets: tuple[str, ...] = ("shapes", "digits"), arch: str | None = None) -> dict[str, Any]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise FastByolError(f"--method {','.join(unknown) or '(none)'}: use byol, simclr or byol,simclr")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise FastByolError(f"--dataset {','.join(unknown) or '(none)'}: use shapes, digits or shapes,digits")
    t0 = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = [*arch_overrides(arch), *overrides]
    tables = {name: _demo_dataset(Path(out_dir), name, overrides, linear_epochs, methods, stamp) for name in datasets}
    result = {"datasets": tables, "total_s": time.perf_counter() - t0}
    for table in tables.values():
        for run in table["runs"].values():
            atomic_write_bytes(Path(run["run_dir"]) / "demo.json", json.dumps(result, indent=2).encode())
    return result


def _demo_dataset(root: Path, name: str, overrides: list[str], linear_epochs: int, methods: tuple[str, ...],
                  stamp: str) -> dict[str, Any]:
    """Pretrain each method on dataset ``name`` and evaluate it beside the baselines: one table."""
    t0 = time.perf_counter()
    data = root / name
    if not (data / "fastbyol-dataset.json").is_file():
        counts = DATASETS[name](str(data))
        print(f"fastbyol demo: wrote {counts['train']} train / {counts['val']} val {name} images to {data}",
              file=sys.stderr)
    rows: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    eval_s = 0.0
    for method in methods:
        suffix, label = METHODS[method]
        cfg = build_config(name + suffix, overrides=[f"data.path={data / 'train'}", f"run.out_dir={root}",
                                                     f"run.name={name}-{method}-{stamp}", *overrides])
        trainer = start_run(cfg)
        print(f"fastbyol demo: pretraining {cfg.model.arch} with {method} on {name} ({trainer.device.type}, "
              f"{trainer.total_steps} steps) -> {trainer.run_dir}", file=sys.stderr)
        summary = trainer.train()
        t_eval = time.perf_counter()
        rows[label] = evaluate_encoder(trainer.pair.online.encoder, str(data), cfg.data.image_size, trainer.device,
                                       linear_epochs=linear_epochs)
        eval_s += time.perf_counter() - t_eval
        runs[method] = {"steps": summary["step"], "pretrain_img_per_s": summary["img_per_s"],
                        "pretrain_s": summary["wall_s"], "run_dir": str(trainer.run_dir)}
    t_eval = time.perf_counter()
    rows[RAW_PIXELS] = evaluate_encoder(RawPixels(), str(data), cfg.data.image_size, trainer.device,
                                        linear_epochs=linear_epochs)
    random_inits = ([(RANDOM_TIMM, "torchvision")] if cfg.model.arch.startswith(TIMM_PREFIX) else  # timm's own init
                    [(RANDOM_TORCHVISION, "torchvision"), (RANDOM_FASTBYOL, "haiku")])
    for label, init in random_inits:
        random_init = calibrated_random_encoder(cfg.model, cfg.run.seed + 7, str(data), cfg.data.image_size,
                                                trainer.device, init=init)
        rows[label] = evaluate_encoder(random_init, str(data), cfg.data.image_size, trainer.device,
                                       linear_epochs=linear_epochs)
    first = runs[methods[0]]
    return {"arch": cfg.model.arch, "device": trainer.device.type, "steps": first["steps"],
            "pretrain_img_per_s": first["pretrain_img_per_s"], "pretrain_s": first["pretrain_s"],
            "eval_s": eval_s + time.perf_counter() - t_eval, "total_s": time.perf_counter() - t0,
            "rows": rows, "runs": runs, "run_dir": first["run_dir"]}


def format_table(result: dict[str, Any]) -> str:
    """One table per dataset, then the total time."""
    parts = [f"{name}\n{_format_one(table)}" for name, table in result["datasets"].items()]
    return "\n\n".join(parts) + f"\ntotal {result['total_s']:.0f} s"


def _format_one(result: dict[str, Any]) -> str:
    lines = [f"{'encoder':34s} {'kNN-20 top-1':>13s} {'linear top-1':>13s}",
             f"{'-' * 34} {'-' * 13} {'-' * 13}"]
    for name, r in result["rows"].items():
        lines.append(f"{name:34s} {r['knn20']['top1']:12.1f}% {r['linear']['top1']:12.1f}%")
    runs = result.get("runs") or {"byol": result}
    pretraining = "; ".join(f"{method} {run['steps']} steps at {run['pretrain_img_per_s']:.1f} img/s in "
                            f"{run['pretrain_s']:.0f} s" for method, run in runs.items())
    lines.append(f"{result['arch']} on {result['device']}: pretraining {pretraining}; evaluation "
                 f"{result['eval_s']:.0f} s; total {result['total_s']:.0f} s")
    return "\n".join(lines)
