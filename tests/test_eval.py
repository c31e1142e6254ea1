"""kNN, linear probe, export and dataset builders; the eval CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import models

from fastbyol.config_parse import build_config
from fastbyol.data.builders import make_digits, make_synthetic
from fastbyol.data.folder import ImageFiles
from fastbyol.engine.evaluate import encoder_from_checkpoint, export_checkpoint
from fastbyol.engine.trainer import start_run
from fastbyol.errors import FastByolError
from fastbyol.eval.features import CenterViews
from fastbyol.eval.knn import knn_predict, topk_accuracy
from fastbyol.eval.linear import linear_probe


def test_knn_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    train_y = torch.randint(0, 4, (50,), generator=g)
    scores = knn_predict(train_f, train_y, test_f, k=5, num_classes=4, chunk=3)
    for i in range(7):
        sims = torch.nn.functional.cosine_similarity(test_f[i:i + 1], train_f)
        top = sims.argsort(descending=True)[:5]
        want = torch.zeros(4)
        for j in top:
            want[train_y[j]] += torch.exp(sims[j] / 0.07)
        torch.testing.assert_close(scores[i], want, rtol=1e-4, atol=1e-4)
    labels = scores.argmax(1)
    assert topk_accuracy(scores, labels, 1) == 100.0


def test_linear_probe_separates_separable_data_and_not_noise() -> None:
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 16, generator=g) * 4
    y = torch.randint(0, 5, (400,), generator=g)
    x = centers[y] + torch.randn(400, 16, generator=g)
    r = linear_probe(x[:300], y[:300], x[300:], y[300:], 5, epochs=20, batch_size=64)
    assert r["top1"] > 95
    noise = linear_probe(torch.randn(300, 16, generator=g), y[:300], torch.randn(100, 16, generator=g), y[300:], 5,
                         epochs=20, batch_size=64)
    assert noise["top1"] < 45


def test_make_digits_and_synthetic(tmp_path: Path) -> None:
    counts = make_digits(str(tmp_path / "d"), size=32)
    assert counts["train"] + counts["val"] == 1797 and 340 <= counts["val"] <= 380
    train = ImageFiles.scan(str(tmp_path / "d" / "train"))
    assert len(set(train.labels)) == 10
    img, _ = train[0]
    assert img.size == (32, 32) and img.mode == "RGB"
    meta = json.loads((tmp_path / "d" / "fastbyol-dataset.json").read_text())
    assert meta["classes"] == [str(c) for c in range(10)]
    with pytest.raises(FastByolError, match="already holds a dataset"):
        make_digits(str(tmp_path / "d"))
    counts = make_synthetic(str(tmp_path / "s"), num_classes=3, train_per_class=4, val_per_class=2, size=24)
    assert counts == {"train": 12, "val": 6}
    val = ImageFiles.scan(str(tmp_path / "s" / "val"))
    assert sorted(val.labels) == [0, 0, 1, 1, 2, 2]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config("smoke", overrides=[f"run.out_dir={out}", "run.name=r", "run.max_steps=2", "run.progress=off",
                                           "optim.batch_size=4", "data.workers=0", "model.proj_hidden=32",
                                           "model.proj_dim=16", "data.num_images=16"])
    start_run(cfg).train()
    return out / "r"


def test_export_loads_into_torchvision_with_identical_features(tiny_checkpoint: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pth, st = export_checkpoint(str(tiny_checkpoint), str(tmp_path / "enc"))
    assert pth.suffix == ".pth" and st.suffix == ".safetensors"
    encoder, _ = encoder_from_checkpoint(str(tiny_checkpoint))
    # The smoke preset's init=haiku ResNet-18 is the official one: the export says how to load it into torchvision's.
    (note,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastbyol: note:")]
    assert "projection shortcut in layer1[0]" in note
    tv = models.resnet18()
    tv.layer1[0].downsample = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1, bias=False), torch.nn.BatchNorm2d(64))
    missing, unexpected = tv.load_state_dict(torch.load(pth, weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    tv.fc = torch.nn.Identity()  # type: ignore[assignment]
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    encoder.eval()
    tv.eval()
    with torch.no_grad():
        assert torch.equal(tv(x), encoder(x))
    from safetensors.torch import load_file

    st_state = load_file(str(st))
    for k, v in torch.load(pth, weights_only=True).items():
        assert torch.equal(st_state[k], v)
    # The ONLINE encoder, not the target.
    from fastbyol.engine.checkpoint import resolve_resume

    _, state = resolve_resume(str(tiny_checkpoint))
    assert torch.equal(st_state["conv1.weight"], state["model"]["online.encoder.net.conv1.weight"])
    assert not torch.equal(st_state["conv1.weight"], state["model"]["target.encoder.net.conv1.weight"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastbyol", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_eval_cli_runs_and_rejects_another_architecture(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_synthetic(str(data), num_classes=3, train_per_class=6, val_per_class=3, size=32)
    proc = _cli("eval", "knn", str(tiny_checkpoint), "--data", str(data), "--k", "3", "--json",
                str(tmp_path / "knn.json"), cwd=tmp_path)
    assert proc.returncode == 0 and "kNN k=3: top-1" in proc.stdout, proc.stderr
    assert json.loads((tmp_path / "knn.json").read_text())["knn3"]["top1"] >= 0
    proc = _cli("eval", "linear", str(tiny_checkpoint), "--data", str(data), "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0 and "linear probe (2 epochs, centre-view features): top-1" in proc.stdout, proc.stderr
    proc = _cli("eval", "linear", str(tiny_checkpoint), "--data", str(data), "--epochs", "2", "--augment", "--json",
                str(tmp_path / "lin.json"), cwd=tmp_path)
    assert proc.returncode == 0 and "linear probe (2 epochs, augmented views): top-1" in proc.stdout, proc.stderr
    assert json.loads((tmp_path / "lin.json").read_text())["linear"]["augmented"] == 1.0
    proc = _cli("eval", "finetune", str(tiny_checkpoint), "--data", str(data), "--labels-fraction", "0.5",
                "--epochs", "1", "--batch-size", "4", "--lr", "0.1", "0.5", "--linear-epochs", "1", "--json",
                str(tmp_path / "ft.json"), cwd=tmp_path)
    assert proc.returncode == 0 and "labelled images (3 classes, 3-3 each; 1 epochs, 2 steps): top-1" in proc.stdout \
        and "linear probe on the same labels: top-1" in proc.stdout, proc.stderr
    assert "lr 0.1 at batch 1024: held-out top-1" in proc.stdout and "(of 9)" in proc.stdout
    assert proc.stdout.count("<- chosen") == 1
    out = tiny_checkpoint / "finetune-0.5-s0"
    assert json.loads((tmp_path / "ft.json").read_text())["subset"] == str(out / "subset.txt")
    assert {p.name for p in out.iterdir()} == {"subset.txt", "result.json", "classifier.pt"}
    proc = _cli("eval", "finetune", str(tiny_checkpoint), "--data", str(data), "--labels-fraction", "2", cwd=tmp_path)
    assert proc.returncode == 2 and "--labels-fraction 2.0: use a fraction in (0, 1]" in proc.stderr
    proc = _cli("eval", "knn", str(tiny_checkpoint), "--data", str(data), "--arch", "resnet50", cwd=tmp_path)
    assert proc.returncode == 2 and "holds a resnet18 encoder, not resnet50" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("eval", "knn", str(tiny_checkpoint), "--data", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and "has no train/ folder" in proc.stderr


def test_checkpoint_whose_weights_do_not_fit_is_rejected(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint whose config says resnet34 but whose weights are a resnet18's."""
    from fastbyol.engine import checkpoint

    _, state = checkpoint.resolve_resume(str(tiny_checkpoint))
    state["config"]["model"]["arch"] = "resnet34"
    checkpoint.save(state, tmp_path / "checkpoints", 2, keep_last=1)
    with pytest.raises(FastByolError, match="does not fit a resnet34 encoder"):
        encoder_from_checkpoint(str(tmp_path))


def test_digits_jpegs_are_real_images(tmp_path: Path) -> None:
    make_digits(str(tmp_path / "d"), size=16, val_fraction=0.5)
    path = next((tmp_path / "d" / "val" / "7").iterdir())
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.size == (16, 16)


def test_augmented_training_views_are_seeded_crops_and_flips(tmp_path: Path) -> None:
    make_synthetic(str(tmp_path / "s"), num_classes=2, train_per_class=2, val_per_class=0, size=40)
    files = ImageFiles.scan(str(tmp_path / "s" / "train"))
    center = CenterViews(files, 32)[0][0]
    e0, e0_again, e1 = CenterViews(files, 32, epoch=0)[0][0], CenterViews(files, 32, epoch=0)[0][0], \
        CenterViews(files, 32, epoch=1)[0][0]
    assert e0.shape == center.shape == (3, 32, 32)
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1) and not torch.equal(e0, center)


def test_epoch_features_are_used_each_epoch() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    seen: list[int] = []

    def per_epoch(epoch: int) -> torch.Tensor:
        seen.append(epoch)
        return x + 0.01 * epoch

    linear_probe(x, y, x, y, 3, epochs=3, batch_size=16, epoch_features=per_epoch)
    assert seen == [0, 1, 2]
