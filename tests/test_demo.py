"""Pretraining learns: SimCLR on the demo's shapes beats the standard random network (torchvision's init) by a wide
margin; BYOL and SimCLR on the digits improve on the random network they start from. The demo command runs end to
end.

Slow (one to two minutes each on a 2-core CPU) but run by CI: the end-to-end proof that the loss, LARS, EMA
and augmentations work together (and NT-Xent with its global negatives, for SimCLR). BYOL does not yet beat
torchvision's random network at the demo's budget on either dataset (benchmarks/NOTES.md, issue 16): that
test is the one still missing here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastbyol.config import Config
from fastbyol.config_parse import build_config
from fastbyol.data.builders import make_digits, make_shapes
from fastbyol.engine.demo import FINETUNE_BATCH, FINETUNE_EPOCHS, FINETUNE_FRACTION, FINETUNE_LRS
from fastbyol.engine.evaluate import calibrated_random_encoder, evaluate_encoder, finetune_encoder
from fastbyol.engine.trainer import start_run

MARGIN = 10.0  # kNN-20 top-1 points
# One epoch on the digits from the official ResNet-18's init (init=haiku): the run's own random start is already a
# good digits encoder (89.4% kNN-20, BN calibrated), and one epoch adds 2.2 (BYOL) and 3.1 (SimCLR) points (2-core
# AMD EPYC, 2026-12-07). Before issue 30's init fix the start zeroed every residual branch (~36%), which is what
# the old 10-point margin measured against. A broken step (collapse, no update, wrong target) falls to or below it.
DIGITS_MARGIN = 1.0


@pytest.mark.slow
def test_simclr_on_shapes_beats_the_standard_random_network(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    make_shapes(str(data))
    # 3 epochs (70 steps), not the preset's 10: it was the slowest test of the suite (487 s on a busy 2-core CPU),
    # for a margin SimCLR already has at epoch 3 (measured: 44.8 linear against the random network's 16.2, 118 s
    # with one other job on the machine; 2026-12-07).
    cfg = build_config("shapes-simclr", overrides=[f"data.path={data / 'train'}", f"run.out_dir={tmp_path}",
                                                   "run.name=r", "run.progress=off", "run.epochs=3"])
    trainer = start_run(cfg)
    trainer.train()
    cpu = torch.device("cpu")
    learned = evaluate_encoder(trainer.pair.online.encoder, str(data), 32, cpu, linear_epochs=80)["linear"]["top1"]
    net = calibrated_random_encoder(cfg.model, cfg.run.seed + 7, str(data), 32, cpu, init="torchvision")
    rand = evaluate_encoder(net, str(data), 32, cpu, linear_epochs=80)["linear"]["top1"]
    print(f"linear top-1 on shapes: simclr {learned:.1f}% vs torchvision random init {rand:.1f}%")
    assert learned > rand + 2 * MARGIN, f"simclr {learned:.1f}% does not beat torchvision's random init {rand:.1f}%"


def _pretrain_digits(out: Path, preset: str) -> tuple[Path, Config, torch.nn.Module]:
    """One epoch of ``preset`` on the digits from Haiku's init (the paper presets' start)."""
    data = out / "digits"
    make_digits(str(data))
    cfg = build_config(preset, overrides=[f"data.path={data / 'train'}", f"run.out_dir={out}", "run.name=r",
                                          "run.epochs=1", "optim.warmup_epochs=0.25", "model.init=haiku",
                                          "run.progress=off"])
    trainer = start_run(cfg)
    trainer.train()
    return data, cfg, trainer.pair.online.encoder


@pytest.fixture(scope="module")
def digits_byol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config, torch.nn.Module]:
    return _pretrain_digits(tmp_path_factory.mktemp("digits-byol"), "digits")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["digits", "digits-simclr"])
def test_pretraining_improves_on_its_own_random_start_on_digits(tmp_path: Path, preset: str,
                                                                request: pytest.FixtureRequest) -> None:
    data, cfg, encoder = (request.getfixturevalue("digits_byol") if preset == "digits"
                          else _pretrain_digits(tmp_path, preset))
    cpu = torch.device("cpu")
    learned = evaluate_encoder(encoder, str(data), 32, cpu, linear_epochs=None)["knn20"]["top1"]
    random_start = calibrated_random_encoder(cfg.model, cfg.run.seed, str(data), 32, cpu, init="haiku")
    rand = evaluate_encoder(random_start, str(data), 32, cpu, linear_epochs=None)["knn20"]["top1"]
    print(f"kNN-20 top-1: {preset} {learned:.1f}% vs its random start {rand:.1f}%")
    assert learned > rand + DIGITS_MARGIN, (f"{preset} {learned:.1f}% does not beat its random start {rand:.1f}% by "
                                            f"{DIGITS_MARGIN}")


@pytest.mark.slow
def test_finetuning_on_a_tenth_of_the_digits_beats_the_linear_probe(
        digits_byol: tuple[Path, Config, torch.nn.Module], tmp_path: Path) -> None:
    """The paper's semi-supervised protocol at the demo's budget (``demo.FINETUNE_*``): fine-tuning the encoder
    on 10% of each class's labels against a linear probe of the same checkpoint on the same labels."""
    data, cfg, encoder = digits_byol
    result = finetune_encoder(encoder, str(data), 32, torch.device("cpu"), tmp_path / "ft", fraction=FINETUNE_FRACTION,
                              seed=0, epochs=FINETUNE_EPOCHS, batch_size=FINETUNE_BATCH, lrs=FINETUNE_LRS, workers=0)
    tuned, linear = result["finetune"]["top1"], result["linear"]["top1"]
    print(f"10% of the digits' labels: fine-tune {tuned:.1f}% vs linear probe {linear:.1f}% ({tuned - linear:+.1f}); "
          f"sweep {result['sweep']}")
    assert result["subset_images"] == 143 and result["images_per_class"] == {"min": 14, "max": 15}
    assert result["holdout_images"] == 1438 - 143  # every other training image: fewer than 10,000
    assert [line["lr_at_1024"] for line in result["sweep"]] == list(FINETUNE_LRS)
    best = max(result["sweep"], key=lambda line: line["holdout_top1"])  # chosen on held-out images, not on val
    assert result["finetune"]["lr_at_1024"] == best["lr_at_1024"] and result["finetune"]["top1"] == best["top1"]
    assert (tmp_path / "ft" / "subset.txt").is_file() and (tmp_path / "ft" / "classifier.pt").is_file()
    assert tuned > linear, f"fine-tuning {tuned:.1f}% falls {linear - tuned:.1f} points short of the linear probe"


def test_demo_command_end_to_end_in_miniature(tmp_path: Path) -> None:
    """`fastbyol demo`'s own path (both datasets, runs, every row, tables, demo.json), cut to 2 steps."""
    import json

    from fastbyol.engine.demo import format_table, run_demo

    result = run_demo(str(tmp_path), ["run.max_steps=2", "run.progress=off"], linear_epochs=1,
                      methods=("byol", "simclr"), finetune_epochs=0)
    assert list(result["datasets"]) == ["shapes", "digits"]
    for name, table in result["datasets"].items():
        assert list(table["rows"]) == ["BYOL (online encoder)", "SimCLR (encoder)", "raw pixels",
                                       "random init, torchvision (BN cal.)", "random init, fastbyol (BN cal.)"]
        assert table["rows"]["raw pixels"]["feature_dim"] == 3 * 32 * 32
        assert table["steps"] == 2 and table["runs"]["simclr"]["steps"] == 2
        config = (Path(table["runs"]["simclr"]["run_dir"]) / "config.yaml").read_text()
        assert config.startswith(f"preset: {name}-simclr")
        assert (tmp_path / name / "fastbyol-dataset.json").is_file()
        written = json.loads((Path(table["run_dir"]) / "demo.json").read_text())
        assert written["datasets"][name]["steps"] == 2
    text = format_table(result)
    assert text.startswith("shapes\n") and "\ndigits\n" in text
    assert "kNN-20 top-1" in text and "random init, torchvision (BN cal.)" in text and "simclr 2 steps" in text
    assert "fine-tune" not in text  # --finetune-epochs 0: no semi-supervised columns


def test_demo_rejects_an_unknown_dataset(tmp_path: Path) -> None:
    from fastbyol.engine.demo import run_demo
    from fastbyol.errors import FastByolError

    with pytest.raises(FastByolError, match="--dataset cifar: use shapes, digits or shapes,digits"):
        run_demo(str(tmp_path), [], datasets=("cifar",))
    from fastbyol.cli import _parser

    assert _parser().parse_args(["demo"]).finetune_epochs == FINETUNE_EPOCHS  # the command runs what run_demo does


def test_demo_takes_a_timm_vit_with_its_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastbyol demo --arch timm:vit_tiny_patch16_224`, cut to 2 steps: the ViT with 4 px patches in 6 blocks,
    AdamW, and one random-init row (timm's own initialisation)."""
    from fastbyol.engine import demo
    from fastbyol.engine.demo import format_table, run_demo

    monkeypatch.setattr(demo, "FINETUNE_LRS", (1.0,))  # one rate, no held-out pass: the sweep has its own tests
    result = run_demo(str(tmp_path), ["run.max_steps=2", "run.progress=off"], linear_epochs=1,
                      datasets=("digits",), arch="timm:vit_tiny_patch16_224", finetune_epochs=1)
    table = result["datasets"]["digits"]
    for row in table["rows"].values():  # the fine-tune columns: each row on the same 143 labelled images
        assert row["semi"]["subset_images"] == 143 and row["semi"]["finetune"]["epochs"] == 1
    assert "linear top-1    linear 10% fine-tune 10%" in format_table(result)
    assert (Path(table["run_dir"]) / "finetune-0.1" / "raw-pixels" / "subset.txt").is_file()
    assert table["arch"] == "timm:vit_tiny_patch16_224" and table["steps"] == 2
    assert list(table["rows"]) == ["BYOL (online encoder)", "raw pixels", "random init, timm (BN cal.)"]
    assert table["rows"]["BYOL (online encoder)"]["feature_dim"] == 192
    config = (Path(table["run_dir"]) / "config.yaml").read_text()
    assert "patch_size: 4" in config and "depth: 6" in config and "name: adamw" in config
