"""Evaluation centre views decoded by DALI (``fastbyol.eval.dali_features``, ``--loader``), with CPU operators
(``device_id=None``): the views equal PIL's ``center_view`` within a few levels, in the files' order with a short
last batch; features of a small encoder agree with the torch loader's; a corrupt JPEG is one line naming it;
the feature cache keys the two loaders apart; 'auto' picks DALI only for centre views on a GPU. One GPU test
(marker ``cuda``, run by scripts/gpu_check.sh when DALI is carried) checks the "mixed" decoder's views."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastbyol.data.builders import make_synthetic
from fastbyol.data.folder import ImageFiles
from fastbyol.data.procedural import procedural_image
from fastbyol.engine.evaluate import evaluate_encoder
from fastbyol.errors import FastByolError
from fastbyol.eval import features as F
from fastbyol.eval.dali_features import center_batches

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed: pip install 'fastbyol[gpu]'")
pytestmark = pytest.mark.dali

CPU = torch.device("cpu")
# Odd shapes (landscape, portrait, very long, square) so the resize rounds and the crop corner both matter.
SHAPES = ((61, 45), (45, 61), (33, 70), (99, 47), (41, 41))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/: 3 classes x 4 square 48 px JPEGs plus 5 odd-shaped ones (one grayscale, one PNG) = 17 images, an
    odd count; val/: 3 images."""
    root = tmp_path_factory.mktemp("eval-dali") / "d"
    make_synthetic(str(root), num_classes=3, train_per_class=4, val_per_class=1, size=48)
    for i, (w, h) in enumerate(SHAPES):
        img = procedural_image(100 + i, 0, 96, 3)[0].resize((w, h), Image.Resampling.BICUBIC)
        if i == 1:
            img = img.convert("L")
        img.save(root / "train" / "class001" / f"odd{i}.{'png' if i == 2 else 'jpg'}", quality=90)
    return root


def _views(files: ImageFiles, size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    batches = list(center_batches(files, size, CPU, batch_size=batch_size))
    return (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]),
            [len(y) for _, y in batches])


@pytest.mark.parametrize("size", [32, 24])
def test_center_views_equal_pil_within_a_few_levels(data: Path, size: int) -> None:
    """Batch 5 over 17 images: 5, 5, 5, 2. Measured (normalised units; one level is ~0.017): mean |difference|
    0.0027-0.0035 on the synthetic images, max 5 levels at 32 px, 3 at 24 px; the decodes themselves are equal
    here (libjpeg-turbo on both sides), so the gap is the bicubic resize."""
    files = ImageFiles.scan(str(data / "train"))
    assert len(files) == 17
    views, labels, sizes = _views(files, size, batch_size=5)
    assert sizes == [5, 5, 5, 2] and labels.tolist() == files.labels  # every image once, in order
    assert views.shape == (17, 3, size, size) and views.dtype == torch.float32
    assert views.is_contiguous(memory_format=torch.channels_last)
    reference = torch.stack([F.center_view(files[i][0], size) for i in range(len(files))])
    diff = (views - reference).abs()
    # In levels of 0..255 per channel: undo the normalisation's std.
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    levels = diff * std * 255
    per_image = diff.mean(dim=(1, 2, 3))
    print(f"size {size}: mean |diff| {float(diff.mean()):.4f} (worst image {float(per_image.max()):.4f}), "
          f"max {float(levels.max()):.2f} levels, {float((levels > 1.5).float().mean()) * 100:.2f}% of values "
          "> 1.5 levels")
    assert float(diff.mean()) < 0.006 and float(per_image.max()) < 0.012, per_image
    assert float(levels.max()) < 10, levels.amax(dim=(1, 2, 3))


def test_features_close_to_the_torch_loaders(data: Path) -> None:
    """A small seeded conv encoder on both loaders' centre views: same labels and order, features within
    1% of their scale (measured: ~0.1%); ``progress`` after each batch, the last one short."""
    files = ImageFiles.scan(str(data / "train"))
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                                  torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    done: list[int] = []
    f_dali, y_dali = F.extract_features(encoder, files, 32, CPU, batch_size=4, loader="dali", progress=done.append)
    f_torch, y_torch = F.extract_features(encoder, files, 32, CPU, batch_size=4, loader="torch")
    assert done == [4, 8, 12, 16, 17] and encoder.training  # the encoder's mode is given back
    assert f_dali.shape == f_torch.shape == (17, 16) and f_dali.dtype == torch.float32 and y_dali.dtype == torch.int64
    assert torch.equal(y_dali, y_torch)
    rel = float((f_dali - f_torch).abs().max() / f_torch.abs().max())
    print(f"features: max |diff| / max |feature| = {rel:.5f}")
    assert rel < 0.01


def test_corrupt_images_are_one_line_naming_the_file(data: Path, tmp_path: Path) -> None:
    files = ImageFiles.scan(str(data / "train"))
    whole = Path(files.paths[0]).read_bytes()
    truncated, junk = tmp_path / "truncated.jpg", tmp_path / "junk.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])  # the header reads; DALI's decoder stops half-way
    junk.write_bytes(b"not an image at all")  # no header: the feed stops before DALI sees it
    for bad, why in ((truncated, "truncated"), (junk, "not an image")):
        mixed = ImageFiles([*files.paths[:6], str(bad), *files.paths[6:]], [*files.labels[:6], 0, *files.labels[6:]])
        with pytest.raises(FastByolError) as info:
            F.extract_features(torch.nn.Flatten(), mixed, 32, CPU, batch_size=4, loader="dali")
        message = str(info.value)
        assert message.startswith(f"cannot decode image {bad}: ") and why in message and "\n" not in message, message


def test_the_cache_keys_the_loaders_apart(data: Path, tmp_path: Path) -> None:
    """Same encoder, data and size: DALI's features are computed, not read from PIL's file, and the other way
    round; a second DALI evaluation reads its own. The PIL view keeps its old name (old cache files stay valid)."""
    assert F.view_name(None, 0) == F.view_name(None, 0, "torch") == "center"
    assert F.view_name(None, 0, "dali") == "center-dali"
    assert F.view_name(3, 1, "dali") == F.view_name(3, 1) == "augment-e3-s1"  # augmented views: always PIL
    key = F.FeatureKey(encoder="e", data="d", split="train", size=32, view="center", precision="cpu float32")
    dali_key = F.FeatureKey(encoder="e", data="d", split="train", size=32, view="center-dali", precision="cpu float32")
    assert key.digest() != dali_key.digest() and key.version == dali_key.version == F.EVAL_VERSION

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Flatten(1), torch.nn.LazyLinear(8))
    encoder(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    cache = F.FeatureCache(tmp_path / "cache")
    counts = []
    for loader in ("dali", "torch", "dali", "torch"):
        result = evaluate_encoder(encoder, str(data), 32, CPU, knn_k=(3,), linear_epochs=None, batch_size=4,
                                  workers=0, cache=cache, loader=loader)
        assert result["loader"] == loader
        counts.append((cache.read, cache.computed))
    assert counts == [(0, 2), (0, 4), (2, 4), (4, 4)]
    names = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("*.pt"))
    assert names == ["center", "center", "center", "center"]  # train/val x center/center-dali
    assert len(list((tmp_path / "cache").glob("*-center-dali-*.pt"))) == 2


def test_auto_picks_dali_for_centre_views_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert F.resolve_loader("auto", cuda) == "dali" and F.resolve_loader("auto", CPU) == "torch"
    assert F.resolve_loader("auto", cuda, epoch=2) == "torch" and F.resolve_loader("dali", CPU, epoch=2) == "torch"
    assert F.resolve_loader("dali", CPU) == "dali" and F.resolve_loader("torch", cuda) == "torch"
    with pytest.raises(FastByolError, match="loader 'nvjpeg': use one of auto, torch, dali"):
        F.resolve_loader("nvjpeg", CPU)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvidia.dali" else real(name, *a))
    assert F.resolve_loader("auto", cuda) == "torch"  # no DALI: PIL, silently
    with pytest.raises(FastByolError) as info:
        F.resolve_loader("dali", cuda)
    assert str(info.value) == "--loader dali needs nvidia-dali: pip install -e .[gpu], or --loader torch"


def test_cli_takes_loader() -> None:
    from fastbyol.cli import _parser

    parser = _parser()
    for protocol in ("knn", "linear", "finetune"):
        args = parser.parse_args(["eval", protocol, "RUN", "--data", "D", "--loader", "dali"])
        assert isinstance(args, argparse.Namespace) and args.loader == "dali"
        assert parser.parse_args(["eval", protocol, "RUN", "--data", "D"]).loader == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "knn", "RUN", "--data", "D", "--loader", "pil"])


@pytest.mark.cuda
def test_gpu_decoder_views(data: Path) -> None:
    """The "mixed" graph (nvJPEG, GPU resize): the views on the GPU, in order, within a few levels of PIL's and of
    the CPU graph's; two passes of the features equal bit for bit (a cache file stays true)."""
    files = ImageFiles.scan(str(data / "train"))
    gpu = torch.device("cuda", torch.cuda.current_device())
    batches = list(center_batches(files, 32, gpu, batch_size=5))
    views = torch.cat([x for x, _ in batches])
    assert views.device.type == "cuda" and [len(y) for _, y in batches] == [5, 5, 5, 2]
    assert torch.cat([y for _, y in batches]).tolist() == files.labels
    reference = torch.stack([F.center_view(files[i][0], 32) for i in range(len(files))])
    on_cpu = _views(files, 32, 5)[0]
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    for name, other in (("PIL", reference), ("DALI CPU", on_cpu)):
        diff = (views.cpu() - other).abs()
        print(f"GPU vs {name}: mean |diff| {float(diff.mean()):.4f}, max {float((diff * std * 255).max()):.2f} levels")
        assert float(diff.mean()) < 0.01 and float((diff * std * 255).max()) < 16
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Flatten(1)).to(gpu)
    one = F.extract_features(encoder, files, 32, gpu, batch_size=5, loader="dali")
    two = F.extract_features(encoder, files, 32, gpu, batch_size=5, loader="dali")
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert np.array_equal(one[1].numpy(), np.array(files.labels))
