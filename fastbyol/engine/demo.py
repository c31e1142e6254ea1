"""``fastbyol demo``: build the digits folder, pretrain BYOL on it, and show the representation was learned:
kNN and linear-probe accuracy of the BYOL encoder next to the same architecture at random initialisation."""

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
from fastbyol.files import atomic_write_bytes


def run_demo(out_dir: str, overrides: list[str], linear_epochs: int = 80) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = Path(out_dir)
    data = root / "digits"
    if not (data / "fastbyol-dataset.json").is_file():
        counts = make_digits(str(data))
        print(f"fastbyol demo: wrote {counts['train']} train / {counts['val']} val digit images to {data}",
              file=sys.stderr)
    cfg = build_config("digits", overrides=[f"data.path={data / 'train'}", f"run.out_dir={root}",
                                            f"run.name=byol-{time.strftime('%Y%m%d-%H%M%S')}", *overrides])
    trainer = start_run(cfg)
    print(f"fastbyol demo: pretraining {cfg.model.arch} with BYOL on {trainer.device.type} for "
          f"{trainer.total_steps} steps -> {trainer.run_dir}", file=sys.stderr)
    summary = trainer.train()
    size = cfg.data.image_size
    rows = {}
    t_eval = time.perf_counter()
    rows["BYOL (online encoder)"] = evaluate_encoder(trainer.pair.online.encoder, str(data), size, trainer.device,
                                                     linear_epochs=linear_epochs)
    random_init = calibrated_random_encoder(cfg.model, cfg.run.seed + 7, str(data), size, trainer.device)
    rows["random init (BN calibrated)"] = evaluate_encoder(random_init, str(data), size, trainer.device,
                                                           linear_epochs=linear_epochs)
    result = {
        "arch": cfg.model.arch, "device": trainer.device.type, "steps": summary["step"],
        "pretrain_img_per_s": summary["img_per_s"], "pretrain_s": summary["wall_s"],
        "eval_s": time.perf_counter() - t_eval, "total_s": time.perf_counter() - t0,
        "rows": rows, "run_dir": str(trainer.run_dir),
    }
    atomic_write_bytes(trainer.run_dir / "demo.json", json.dumps(result, indent=2).encode())
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'encoder':30s} {'kNN-20 top-1':>13s} {'linear top-1':>13s}",
             f"{'-' * 30} {'-' * 13} {'-' * 13}"]
    for name, r in result["rows"].items():
        lines.append(f"{name:30s} {r['knn20']['top1']:12.1f}% {r['linear']['top1']:12.1f}%")
    lines.append(f"{result['arch']} on {result['device']}: pretraining {result['steps']} steps at "
                 f"{result['pretrain_img_per_s']:.1f} img/s in {result['pretrain_s']:.0f} s; evaluation "
                 f"{result['eval_s']:.0f} s; total {result['total_s']:.0f} s")
    return "\n".join(lines)
