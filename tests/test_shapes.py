"""The demo's shapes: deterministic by (seed, index), ten upright mirror-symmetric silhouettes, always whole and
visible, and a dataset folder the trainer and the evaluator read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastbyol.cli import main
from fastbyol.config_parse import build_config
from fastbyol.data.builders import make_shapes
from fastbyol.data.shapes import CLASSES, MIN_GREY_GAP, shape_image, silhouette
from fastbyol.errors import FastByolError
from fastbyol.model.byol import ByolPair
from fastbyol.presets import PRESETS


def test_images_are_deterministic_rgb_and_labels_cycle() -> None:
    img, label = shape_image(13, seed=2, size=32)
    assert img.mode == "RGB" and img.size == (32, 32) and label == 3
    assert np.array_equal(np.asarray(img), np.asarray(shape_image(13, seed=2, size=32)[0]))
    assert not np.array_equal(np.asarray(img), np.asarray(shape_image(13, seed=3, size=32)[0]))
    assert [shape_image(i, 0, 16)[1] for i in range(25)] == [i % 10 for i in range(25)]


@pytest.mark.parametrize("name", CLASSES)
def test_silhouettes_are_distinct_mirror_symmetric_and_inside_the_unit_box(name: str) -> None:
    grid = np.arange(-150, 151) / 100  # exactly mirror symmetric, unlike linspace
    y, x = np.meshgrid(grid, grid, indexing="ij")
    mask = silhouette(name, x, y)
    assert 0.15 < mask.mean() * 9 < 3.2  # a real area, well inside the 3 x 3 box
    assert not mask[(np.abs(x) > 1.11) | (np.abs(y) > 1.11)].any()
    assert np.array_equal(mask, mask[:, ::-1])  # the horizontal flip keeps the class
    for other in CLASSES:
        if other != name:
            assert (mask != silhouette(other, x, y)).mean() > 0.03, (name, other)


def test_every_shape_is_inside_and_stands_out_from_its_background() -> None:
    for index in range(40):
        pixels = np.asarray(shape_image(index, seed=0, size=32)[0]).astype(float) / 255
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        background = np.median(border, axis=0)
        grey_gap = np.abs(pixels - background).mean(-1)
        # The shape at most touches the border (its centre is a radius from each edge), and it is visible.
        assert (np.abs(border - background).mean(-1) > 0.1).mean() < 0.2
        assert (grey_gap > MIN_GREY_GAP * 0.8).sum() > 20


def test_make_shapes_writes_the_folder_and_the_cli_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    counts = make_shapes(str(tmp_path / "a"), train_per_class=3, val_per_class=2, size=24)
    assert counts == {"train": 30, "val": 20}
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == sorted(CLASSES)
    assert len(list((tmp_path / "a" / "val" / "ring").glob("*.png"))) == 2
    meta = json.loads((tmp_path / "a" / "fastbyol-dataset.json").read_text())
    assert meta["source"] == "fastbyol.data.shapes" and meta["classes"] == list(CLASSES)
    assert main(["data", "make", "shapes", str(tmp_path / "b"), "--train-per-class", "1", "--val-per-class", "1"]) == 0
    assert "wrote 10 train and 10 val images" in capsys.readouterr().out
    with pytest.raises(FastByolError, match="already holds a dataset"):
        make_shapes(str(tmp_path / "a"))
    with pytest.raises(FastByolError, match="size 8..1024"):
        make_shapes(str(tmp_path / "c"), size=4)


def test_demo_presets_start_from_torchvisions_init_and_paper_presets_from_haikus(tmp_path: Path) -> None:
    for preset in ("shapes", "digits", "shapes-simclr"):
        assert PRESETS[preset]["model"]["init"] == "torchvision"
    cfg = build_config("byol-r50-300ep", overrides=["data.path=/x"])
    assert cfg.model.init == "haiku" and cfg.model.target_init == "independent"
    small = build_config("shapes", overrides=[f"data.path={tmp_path}", "model.proj_hidden=8", "model.proj_dim=4"])
    pair = ByolPair(small.model)
    last_bn = pair.online.encoder.net.layer1[0].bn2.weight
    assert last_bn.abs().min() > 0  # no zero-init residual: torchvision's ResNet default
