"""``fastbyol demo``: build the demo's datasets (the shapes, then the digits as a quick sanity row), pretrain on
each with BYOL (and, with ``--method byol,simclr``, SimCLR on the same data, augmentation family, schedule and
encoder), and show what was learned: kNN and linear-probe accuracy of each pretrained encoder next to the
baselines with nothing learned, evaluated the same way: the raw pixels, and the same architecture at random
initialisation, torchvision's (the standard random network) and fastbyol's own (Haiku's, the paper presets'
starting point), BatchNorm calibrated on the training images. Then the paper's semi-supervised columns: every
row's linear probe and fine-tuning on the same 10% of the labels (``fastbyol eval finetune``)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastbyol.config import TIMM_PREFIX
from fastbyol.config_parse import build_config
from fastbyol.data.builders import make_digits, make_shapes
from fastbyol.engine.evaluate import calibrated_random_encoder, evaluate_encoder, finetune_encoder
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
# The fine-tune columns: the paper's semi-supervised protocol on 10% of each class's labels (about 15 digits or
# shapes per class), at a CPU's budget: batch 32 (the paper's 1024 is more than the subset), its 30 epochs (120
# steps on the digits), and a sweep of two learning rates (at batch 1024; 0.006 and 0.031 at 32) instead of its
# 0.005-0.1, which move a zero-initialised head too little in 120 steps. The best rate depends on the encoder: a
# ResNet-18 after 10 epochs of BYOL from torchvision's init fine-tuned to 88.9% at 0.2 and 70.2% at 1.0, one after
# 1 epoch from Haiku's init to 14.2% at 0.2 and 69.9% at 1.0 (benchmarks/NOTES.md, issue 20), so each row keeps
# the rate with the better top-1 on the held-out training images. Every row is fine-tuned the same way: the random
# inits' rows are supervised training from scratch on the same labels.
FINETUNE_FRACTION = 0.1
FINETUNE_EPOCHS = 30
FINETUNE_BATCH = 32
FINETUNE_LRS = (0.2, 1.0)


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
             datasets: tuple[str, ...] = ("shapes", "digits"), arch: str | None = None,
             finetune_epochs: int = FINETUNE_EPOCHS) -> dict[str, Any]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise FastByolError(f"--method {','.join(unknown) or '(none)'}: use byol, simclr or byol,simclr")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise FastByolError(f"--dataset {','.join(unknown) or '(none)'}: use shapes, digits or shapes,digits")
    t0 = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = [*arch_overrides(arch), *overrides]
    tables = {name: _demo_dataset(Path(out_dir), name, overrides, linear_epochs, methods, stamp, finetune_epochs)
              for name in datasets}
    result = {"datasets": tables, "total_s": time.perf_counter() - t0}
    for table in tables.values():
        for run in table["runs"].values():
            atomic_write_bytes(Path(run["run_dir"]) / "demo.json", json.dumps(result, indent=2).encode())
    return result


def _demo_dataset(root: Path, name: str, overrides: list[str], linear_epochs: int, methods: tuple[str, ...],
                  stamp: str, finetune_epochs: int = FINETUNE_EPOCHS) -> dict[str, Any]:
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

    def evaluate(label: str, encoder: torch.nn.Module, run_dir: Path) -> None:
        """kNN and linear on every label; with ``finetune_epochs``, the linear probe and fine-tuning on 10%."""
        rows[label] = evaluate_encoder(encoder, str(data), cfg.data.image_size, trainer.device,
                                       linear_epochs=linear_epochs)
        if finetune_epochs:
            slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")  # "random-init-torchvision-bn-cal"
            rows[label]["semi"] = finetune_encoder(
                encoder, str(data), cfg.data.image_size, trainer.device,
                run_dir / f"finetune-{FINETUNE_FRACTION:g}" / slug, fraction=FINETUNE_FRACTION, seed=cfg.run.seed,
                epochs=finetune_epochs, batch_size=FINETUNE_BATCH, lrs=FINETUNE_LRS, linear_epochs=linear_epochs,
                workers=0)

    for method in methods:
        suffix, label = METHODS[method]
        cfg = build_config(name + suffix, overrides=[f"data.path={data / 'train'}", f"run.out_dir={root}",
                                                     f"run.name={name}-{method}-{stamp}", *overrides])
        trainer = start_run(cfg)
        print(f"fastbyol demo: pretraining {cfg.model.arch} with {method} on {name} ({trainer.device.type}, "
              f"{trainer.total_steps} steps) -> {trainer.run_dir}", file=sys.stderr)
        summary = trainer.train()
        t_eval = time.perf_counter()
        evaluate(label, trainer.pair.encoder, trainer.run_dir)
        eval_s += time.perf_counter() - t_eval
        runs[method] = {"steps": summary["step"], "pretrain_img_per_s": summary["img_per_s"],
                        "pretrain_s": summary["wall_s"], "run_dir": str(trainer.run_dir)}
    t_eval = time.perf_counter()
    first = runs[methods[0]]
    evaluate(RAW_PIXELS, RawPixels(), Path(first["run_dir"]))
    random_inits = ([(RANDOM_TIMM, "torchvision")] if cfg.model.arch.startswith(TIMM_PREFIX) else  # timm's own init
                    [(RANDOM_TORCHVISION, "torchvision"), (RANDOM_FASTBYOL, "haiku")])
    for label, init in random_inits:
        random_init = calibrated_random_encoder(cfg.model, cfg.run.seed + 7, str(data), cfg.data.image_size,
                                                trainer.device, init=init)
        evaluate(label, random_init, Path(first["run_dir"]))
    return {"arch": cfg.model.arch, "device": trainer.device.type, "steps": first["steps"],
            "pretrain_img_per_s": first["pretrain_img_per_s"], "pretrain_s": first["pretrain_s"],
            "eval_s": eval_s + time.perf_counter() - t_eval, "total_s": time.perf_counter() - t0,
            "rows": rows, "runs": runs, "run_dir": first["run_dir"]}


def format_table(result: dict[str, Any]) -> str:
    """One table per dataset, then the total time."""
    parts = [f"{name}\n{_format_one(table)}" for name, table in result["datasets"].items()]
    return "\n\n".join(parts) + f"\ntotal {result['total_s']:.0f} s"


def _format_one(result: dict[str, Any]) -> str:
    semi = all("semi" in r for r in result["rows"].values())
    pct = f"{100 * FINETUNE_FRACTION:g}%"
    extra = [f"linear {pct}", f"fine-tune {pct}"] if semi else []  # top-1 too, on the labels' fraction
    width = max([13, *(len(h) for h in extra)])
    lines = [" ".join([f"{'encoder':34s}", *(f"{h:>{width}s}" for h in ["kNN-20 top-1", "linear top-1", *extra])]),
             " ".join(["-" * 34, *["-" * width] * (2 + len(extra))])]
    for name, r in result["rows"].items():
        values = [r["knn20"]["top1"], r["linear"]["top1"]]
        if semi:
            values += [r["semi"]["linear"]["top1"], r["semi"]["finetune"]["top1"]]
        lines.append(" ".join([f"{name:34s}", *(f"{v:{width - 1}.1f}%" for v in values)]))
    runs = result.get("runs") or {"byol": result}
    pretraining = "; ".join(f"{method} {run['steps']} steps at {run['pretrain_img_per_s']:.1f} img/s in "
                            f"{run['pretrain_s']:.0f} s" for method, run in runs.items())
    lines.append(f"{result['arch']} on {result['device']}: pretraining {pretraining}; evaluation "
                 f"{result['eval_s']:.0f} s; total {result['total_s']:.0f} s")
    return "\n".join(lines)
