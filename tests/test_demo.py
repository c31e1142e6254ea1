"""BYOL learns, and so does the SimCLR baseline: a short pretraining on the real digits beats the random-init
encoder on kNN (held-out split).

Slow (about a minute each on a 2-core CPU) but run by CI: it is the end-to-end proof that the loss, LARS,
EMA and augmentations work together (and NT-Xent with its global negatives, for SimCLR)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastbyol.config import build_config
from fastbyol.data.builders import make_digits
from fastbyol.engine.evaluate import calibrated_random_encoder, evaluate_encoder
from fastbyol.engine.trainer import start_run

MARGIN = 10.0  # kNN-20 top-1 points; measured margins are ~40 after 2 epochs, see benchmarks/NOTES.md


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["digits", "digits-simclr"])
def test_pretraining_beats_random_init_on_digits(tmp_path: Path, preset: str) -> None:
    data = tmp_path / "digits"
    make_digits(str(data))
    cfg = build_config(preset, overrides=[f"data.path={data / 'train'}", f"run.out_dir={tmp_path}", "run.name=r",
                                            "run.epochs=1", "optim.warmup_epochs=0.25", "run.progress=off"])
    trainer = start_run(cfg)
    trainer.train()
    cpu = torch.device("cpu")
    learned = evaluate_encoder(trainer.pair.online.encoder, str(data), 32, cpu, linear_epochs=None)["knn20"]["top1"]
    random_init = calibrated_random_encoder(cfg.model, cfg.run.seed + 7, str(data), 32, cpu)
    rand = evaluate_encoder(random_init, str(data), 32, cpu, linear_epochs=None)["knn20"]["top1"]
    print(f"kNN-20 top-1: {cfg.method} {learned:.1f}% vs random init {rand:.1f}%")
    assert learned > rand + MARGIN, f"{cfg.method} {learned:.1f}% does not beat random init {rand:.1f}% by {MARGIN}"


def test_demo_command_end_to_end_in_miniature(tmp_path: Path) -> None:
    """`fastbyol demo`'s own path (dataset, run, both rows, table, demo.json), cut to 2 steps."""
    import json

    from fastbyol.engine.demo import format_table, run_demo

    result = run_demo(str(tmp_path), ["run.max_steps=2", "run.progress=off"], linear_epochs=1,
                      methods=("byol", "simclr"))
    assert list(result["rows"]) == ["BYOL (online encoder)", "SimCLR (encoder)", "raw pixels",
                                    "random init, torchvision (BN cal.)", "random init, fastbyol (BN cal.)"]
    assert result["rows"]["raw pixels"]["feature_dim"] == 3 * 32 * 32
    assert result["steps"] == 2 and result["runs"]["simclr"]["steps"] == 2
    assert (Path(result["runs"]["simclr"]["run_dir"]) / "config.yaml").read_text().startswith("preset: digits-simclr")
    table = format_table(result)
    assert "kNN-20 top-1" in table and "random init, torchvision (BN cal.)" in table and "simclr 2 steps" in table
    assert json.loads((Path(result["run_dir"]) / "demo.json").read_text())["steps"] == 2
    assert (tmp_path / "digits" / "fastbyol-dataset.json").is_file()
