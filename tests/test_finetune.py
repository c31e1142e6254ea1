"""Semi-supervised fine-tuning (``fastbyol.eval.finetune``): the labelled subset is class-balanced, reproducible
from its seed and written so it can be read back; the loop trains encoder and head and leaves the caller's
encoder alone. Whether fine-tuning beats the linear probe on digits: tests/test_demo.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from fastbyol.data.builders import make_synthetic
from fastbyol.data.folder import ImageFiles
from fastbyol.errors import FastByolError
from fastbyol.eval.finetune import (
    Classifier,
    class_balanced_subset,
    finetune,
    holdout_subset,
    read_subset,
    subset_files,
    sweep,
    write_subset,
)


def _labels() -> list[int]:
    """Classes of unequal sizes (1300, 732, 40, 1) in a shuffled order, as a real training folder has."""
    labels = [0] * 1300 + [1] * 732 + [2] * 40 + [3]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(5)).tolist()
    return [labels[i] for i in order]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_subset_takes_the_same_fraction_of_every_class(fraction: float) -> None:
    labels = _labels()
    chosen = class_balanced_subset(labels, fraction, seed=3)
    assert chosen == sorted(set(chosen))
    counts, sizes = Counter(labels[i] for i in chosen), Counter(labels)
    for c, n in sizes.items():
        assert counts[c] == max(1, round(fraction * n)), (c, counts[c], n)
    if fraction == 1.0:
        assert chosen == list(range(len(labels)))


def test_subset_is_fixed_by_its_seed() -> None:
    labels = _labels()
    assert class_balanced_subset(labels, 0.1, 0) == class_balanced_subset(list(labels), 0.1, 0)
    assert class_balanced_subset(labels, 0.1, 0) != class_balanced_subset(labels, 0.1, 1)
    # A class's draw depends on (seed, class) only: removing another class leaves it unchanged.
    without_3 = [c if c != 3 else 2 for c in labels]
    keep0 = [i for i in class_balanced_subset(labels, 0.1, 0) if labels[i] == 0]
    assert keep0 == [i for i in class_balanced_subset(without_3, 0.1, 0) if without_3[i] == 0]
    with pytest.raises(FastByolError, match=r"use a fraction in \(0, 1\]"):
        class_balanced_subset(labels, 0.0, 0)


def test_holdout_is_balanced_outside_the_subset_and_the_sweep_chooses_by_it() -> None:
    labels = _labels()
    labelled = class_balanced_subset(labels, 0.1, seed=0)
    held = holdout_subset(labels, labelled, seed=0, max_images=500)
    assert not set(held) & set(labelled) and held == sorted(set(held))
    counts, rest = Counter(labels[i] for i in held), Counter(labels) - Counter(labels[i] for i in labelled)
    share = 500 / sum(rest.values())
    assert all(counts[c] == max(1, round(share * n)) for c, n in rest.items() if n), (counts, rest)
    assert holdout_subset(labels, labelled, 0, 500) == held != holdout_subset(labels, labelled, 1, 500)
    model = Classifier(torch.nn.Flatten(), 3, 2)
    runs = {0.1: {"holdout_top1": 50.0, "top1": 90.0}, 0.2: {"holdout_top1": 70.0, "top1": 60.0},
            0.4: {"holdout_top1": 70.0, "top1": 99.0}}
    _, chosen, lines = sweep([0.1, 0.2, 0.4], lambda lr: (model, runs[lr]))
    assert chosen is runs[0.2]  # the best held-out top-1, the first of equals; never the best validation top-1
    assert [line["lr_at_1024"] for line in lines] == [0.1, 0.2, 0.4]


def test_written_subset_reads_back_and_lists_name_files(tmp_path: Path) -> None:
    make_synthetic(str(tmp_path / "d"), num_classes=3, train_per_class=10, val_per_class=1, size=16)
    root = str(tmp_path / "d" / "train")
    files = ImageFiles.scan(root)
    chosen = class_balanced_subset(files.labels, 0.2, seed=1)
    write_subset(tmp_path / "subset.txt", files, chosen, root, "header\nsecond line")
    text = (tmp_path / "subset.txt").read_text()
    assert text.startswith("# header\n# second line\n") and len(text.splitlines()) == 2 + len(chosen)
    assert read_subset(str(tmp_path / "subset.txt"), files, root) == chosen
    # SimCLR's lists: bare file names, one per line.
    names = [Path(files.paths[i]).name for i in (0, 5)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
    assert read_subset(str(tmp_path / "names.txt"), files, root) == [0, 5]
    (tmp_path / "bad.txt").write_text("class000/nope.jpg\n")
    with pytest.raises(FastByolError, match="line 1: class000/nope.jpg is not an image under"):
        read_subset(str(tmp_path / "bad.txt"), files, root)
    with pytest.raises(FastByolError, match="cannot read the subset list"):
        read_subset(str(tmp_path / "missing.txt"), files, root)


def test_finetune_trains_encoder_and_head_on_a_copy(tmp_path: Path) -> None:
    make_synthetic(str(tmp_path / "d"), num_classes=3, train_per_class=6, val_per_class=2, size=16)
    train, val = ImageFiles.scan(str(tmp_path / "d" / "train")), ImageFiles.scan(str(tmp_path / "d" / "val"))
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    labelled = subset_files(train, class_balanced_subset(train.labels, 0.5, 0))
    model, result = finetune(encoder, labelled, val, 3, 16, torch.device("cpu"), epochs=3, batch_size=4, lr=50.0)
    assert isinstance(model, Classifier) and model.head.weight.shape == (3, 4)
    assert result["steps"] == 3 * (9 // 4) and result["train_images"] == 9 and result["val_images"] == 6
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the caller's is untouched
    assert not torch.equal(model.encoder.state_dict()["0.weight"], before["0.weight"])  # the copy was trained
    assert model.head.weight.abs().sum() > 0
    again, result2 = finetune(encoder, labelled, val, 3, 16, torch.device("cpu"), epochs=3, batch_size=4, lr=50.0,
                              workers=1)  # seeded order and views: a worker process gives the same run
    assert torch.equal(again.head.weight, model.head.weight) and result2["top1"] == result["top1"]
    with pytest.raises(FastByolError, match="at least 2"):
        finetune(encoder, subset_files(train, [0]), val, 3, 16, torch.device("cpu"))
