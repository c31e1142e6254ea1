"""``fastbyol demo``: build the digits folder, pretrain on it with BYOL (and, with ``--method byol,simclr``,
SimCLR on the same data, augmentation family, schedule and encoder), and show what was learned: kNN and
linear-probe accuracy of each pretrained encoder next to the baselines with nothing learned, evaluated the
same way: the raw pixels, and the same architecture at random initialisation, torchvision's (the standard
random network) and fastbyol's own (Haiku's, where training starts), BatchNorm calibrated on the training
images."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from fastbyol.config import build_config
from fastbyol.data.builders import make_digits
from fastbyol.engine.evaluate import calibrated_random_encoder, evaluate_encoder
from fastbyol.engine.trainer import start_run
from fastbyol.errors import FastByolError
from fastbyol.eval.baselines import RawPixels
from fastbyol.files import atomic_write_bytes

# Each method's preset and its row in the table.
METHODS = {"byol": ("digits", "BYOL (online encoder)"), "simclr": ("digits-simclr", "SimCLR (encoder)")}
# The baselines' rows, below the methods'.
RAW_PIXELS = "raw pixels"
RANDOM_TORCHVISION = "random init, torchvision (BN cal.)"
RANDOM_FASTBYOL = "random init, fastbyol (BN cal.)"


def run_demo(out_dir: str, overrides: list[str], linear_epochs: int = 80,
             methods: tuple[str, ...] = ("byol",)) -> dict[str, Any]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise FastByolError(f"--method {','.join(unknown) or '(none)'}: use byol, simclr or byol,simclr")
    t0 = time.perf_counter()
    root = Path(out_dir)
    data = root / "digits"
    if not (data / "fastbyol-dataset.json").is_file():
        counts = make_digits(str(data))
        print(f"fastbyol demo: wrote {counts['train']} train / {counts['val']} val digit images to {data}",
              file=sys.stderr)
    rows: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    eval_s = 0.0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for method in methods:
        preset, label = METHODS[method]
        cfg = build_config(preset, overrides=[f"data.path={data / 'train'}", f"run.out_dir={root}",
                                              f"run.name={method}-{stamp}", *overrides])
        trainer = start_run(cfg)
        print(f"fastbyol demo: pretraining {cfg.model.arch} with {method} on {trainer.device.type} for "
              f"{trainer.total_steps} steps -> {trainer.run_dir}", file=sys.stderr)
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
    for label, init in ((RANDOM_TORCHVISION, "torchvision"), (RANDOM_FASTBYOL, "haiku")):
        random_init = calibrated_random_encoder(cfg.model, cfg.run.seed + 7, str(data), cfg.data.image_size,
                                                trainer.device, init=init)
        rows[label] = evaluate_encoder(random_init, str(data), cfg.data.image_size, trainer.device,
                                       linear_epochs=linear_epochs)
    first = runs[methods[0]]
    result = {
        "arch": cfg.model.arch, "device": trainer.device.type, "steps": first["steps"],
        "pretrain_img_per_s": first["pretrain_img_per_s"], "pretrain_s": first["pretrain_s"],
        "eval_s": eval_s + time.perf_counter() - t_eval, "total_s": time.perf_counter() - t0,
        "rows": rows, "runs": runs, "run_dir": first["run_dir"],
    }
    for run in runs.values():
        atomic_write_bytes(Path(run["run_dir"]) / "demo.json", json.dumps(result, indent=2).encode())
    return result


def format_table(result: dict[str, Any]) -> str:
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
