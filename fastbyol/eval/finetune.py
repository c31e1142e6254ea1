"""Semi-supervised fine-tuning: the BYOL paper's protocol on a fraction of the labels (its Table 2; appendix C,
"Semi-supervised training on ImageNet", which follows SimCLR's protocol).

The pretrained online encoder plus a linear head (zero-initialised) are trained together, with cross-entropy,
on a class-balanced subset of the training labels (1% or 10% of ImageNet in the paper: about 13 or 128
images per class):

    views      training: random-resized crop + horizontal flip (nothing else); test: resize the shorter
               side to size * 256/224 (bicubic) and centre-crop, as linear evaluation (BYOL.md)
    optimizer  SGD, Nesterov momentum 0.9, no weight decay and no other regulariser; learning rate decayed
               by a cosine over every step, no warm-up; BatchNorm in training mode (batch statistics)
    schedule   batch 1024, 30 or 50 epochs, learning rate from {0.005, 0.01, 0.02, 0.05, 0.1}: the paper
               sweeps both on a held-out part of the training set and reports the best

The defaults here are the paper's: batch 1024, 30 epochs, and the learning rate chosen from that grid (at batch
1024, scaled linearly for other batch sizes: ``lr * batch / 1024``) by the top-1 on a held-out part of the other
training images (``holdout_subset``, ``sweep``); ``fastbyol eval finetune --epochs --lr --batch-size`` change them.
The subset is drawn per class from a seed (``class_balanced_subset``) and written out beside the result, or
read from a list (``read_subset``: SimCLR's published ``1percent.txt`` / ``10percent.txt`` name ImageNet
training files one per line), so a number can be reproduced.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fastbyol.data.folder import ImageFiles
from fastbyol.data.stream import mix_seed
from fastbyol.errors import FastByolError
from fastbyol.eval.features import CenterViews, extract_features
from fastbyol.eval.knn import topk_accuracy
from fastbyol.lr import half_cosine, set_lr

MOMENTUM = 0.9
DEFAULT_EPOCHS = 30
DEFAULT_BATCH = 1024
LR_GRID = (0.005, 0.01, 0.02, 0.05, 0.1)
"""The paper's learning rates at batch 1024; the default sweep, each fine-tuned and the best on a held-out part of
the training set kept."""
DEFAULT_LR = 0.02
"""One learning rate of the grid, for a single fine-tuning (``finetune``)."""
HOLDOUT_IMAGES = 10_000
"""The held-out set's size at most (the paper's local validation set: ~10k ImageNet training images)."""
REFERENCE_BATCH = 1024
FRACTIONS = (0.01, 0.1, 1.0)
"""The paper's label fractions; any fraction in (0, 1] is accepted."""


def class_balanced_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Indices (sorted) of ``round(fraction * n_c)`` images of every class c, at least one, chosen uniformly
    from that class by a generator seeded with (``seed``, c): the same subset for the same labels and seed,
    whatever order the classes are visited in, and every class as represented as its size allows."""
    if not 0.0 < fraction <= 1.0:
        raise FastByolError(f"labels fraction {fraction}: use a fraction in (0, 1], e.g. 0.01, 0.1 or 1.0")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen: list[int] = []
    for label, members in sorted(by_class.items()):
        take = max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(mix_seed(seed, label)))
        chosen.extend(members[j] for j in order[:take].tolist())
    return sorted(chosen)


def holdout_subset(labels: list[int], labelled: list[int], seed: int, max_images: int = HOLDOUT_IMAGES) -> list[int]:
    """Indices (sorted) of a class-balanced held-out set for choosing the learning rate, drawn from the training
    images outside ``labelled``: the same share of every class's remaining images, ``max_images`` in all at
    most (the paper held out about 10,000 ImageNet training images), each class with at least one left."""
    taken = set(labelled)
    rest: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        if i not in taken:
            rest.setdefault(label, []).append(i)
    share = min(1.0, max_images / max(1, sum(len(m) for m in rest.values())))
    chosen: list[int] = []
    for label, members in sorted(rest.items()):
        take = max(1, round(share * len(members)))
        order = torch.randperm(len(members), generator=torch.Generator().manual_seed(mix_seed(seed, label, 2)))
        chosen.extend(members[j] for j in order[:take].tolist())
    return sorted(chosen)


def subset_files(files: ImageFiles, indices: list[int]) -> ImageFiles:
    return ImageFiles([files.paths[i] for i in indices], [files.labels[i] for i in indices])


def write_subset(path: Path, files: ImageFiles, indices: list[int], root: str, header: str) -> None:
    """The subset as text: '# ' header lines, then one '<path under root>\\t<label>' line per image."""
    from fastbyol.files import atomic_write_bytes

    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{os.path.relpath(files.paths[i], root)}\t{files.labels[i]}" for i in indices]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def read_subset(path: str, files: ImageFiles, root: str) -> list[int]:
    """Indices of the images a subset list names: one per line, as a path under ``root`` or a bare file name
    (SimCLR's lists: ``n01440764_10026.JPEG``); text after a tab, '#' lines and blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FastByolError(f"cannot read the subset list {path}: {getattr(e, 'strerror', None) or e}") from None
    by_rel = {os.path.relpath(p, root): i for i, p in enumerate(files.paths)}
    by_name: dict[str, int] = {}
    for i, p in enumerate(files.paths):
        by_name.setdefault(os.path.basename(p), i)
    chosen = set()
    for n, line in enumerate(text.splitlines(), 1):
        name = line.split("\t", 1)[0].strip()
        if not name or name.startswith("#"):
            continue
        index = by_rel.get(name, by_name.get(name))
        if index is None:
            raise FastByolError(f"subset list {path}, line {n}: {name} is not an image under {root}: pass the "
                                "training folder the list was made for")
        chosen.add(index)
    if not chosen:
        raise FastByolError(f"subset list {path} names no image: one file name (or path under {root}) per line")
    return sorted(chosen)


class Classifier(torch.nn.Module):
    """The encoder followed by a linear head on its (flattened) features: what fine-tuning trains."""

    def __init__(self, encoder: torch.nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(feature_dim, num_classes)
        torch.nn.init.zeros_(self.head.weight)  # as the linear probe: no random direction to unlearn
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).flatten(1))


@torch.no_grad()
def feature_dim(encoder: torch.nn.Module, size: int, device: torch.device) -> int:
    """The encoder's output width, from a forward of two blank images in eval mode (mode restored)."""
    was_training = encoder.training
    encoder.eval()
    try:
        return int(encoder(torch.zeros(2, 3, size, size, device=device)).flatten(1).shape[1])
    finally:
        encoder.train(was_training)


def finetune(encoder: torch.nn.Module, train: ImageFiles, val: ImageFiles, num_classes: int, size: int,
             device: torch.device, *, epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH,
             lr: float = DEFAULT_LR, seed: int = 0, workers: int = 0,
             progress: Callable[[int, int, float], None] | None = None, loader: str = "torch",
             holdout: ImageFiles | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Fine-tune a copy of ``encoder`` (the argument is left as it was) with a new linear head on ``train``
    (the labelled subset); return the classifier and its top-1/top-5 % on ``val``'s centre views.

    ``lr`` is the learning rate at batch 1024, used as ``lr * batch_size / 1024``. Each epoch shuffles with a
    generator seeded by (``seed``, epoch) and draws image i's crop and flip from (``seed``, epoch, i), so any
    number of ``workers`` gives the same run. A last partial batch is dropped when the subset holds more than
    one batch (a batch of one image has no BatchNorm statistics). bf16 autocast on CUDA.
    ``progress(step, total_steps, loss)`` is called after every step (reading the loss there is a host sync:
    pass None in timed runs). ``loader`` decodes the validation images (``extract_features``). With a ``holdout``
    set (training images outside the subset), its top-1 is reported too (``holdout_top1``), to choose ``lr`` by."""
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise FastByolError(f"fine-tuning needs epochs >= 1, batch size >= 1 and lr > 0 (got {epochs}, "
                            f"{batch_size}, {lr})")
    if len(train) < 2:
        raise FastByolError(f"the labelled subset holds {len(train)} image: fine-tuning needs at least 2 "
                            "(BatchNorm's batch statistics); use a larger labels fraction")
    tuned = copy.deepcopy(encoder).to(device)
    model = Classifier(tuned, feature_dim(tuned, size, device), num_classes).to(device)
    peak_lr = lr * batch_size / REFERENCE_BATCH
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=MOMENTUM, nesterov=True, weight_decay=0.0)
    drop_last = len(train) > batch_size
    steps_per_epoch = len(train) // batch_size if drop_last else 1
    total, step = epochs * steps_per_epoch, 0
    cuda = device.type == "cuda"
    model.train()
    loss = torch.zeros((), device=device)
    for epoch in range(epochs):
        views = DataLoader(CenterViews(train, size, epoch=epoch, seed=seed), batch_size=batch_size,
                           shuffle=True, drop_last=drop_last, num_workers=workers, pin_memory=cuda,
                           generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 1)))
        for x, y in views:
            set_lr(opt, peak_lr * half_cosine(step, total))
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress(step, total, float(loss.detach()))
    def accuracy(files: ImageFiles) -> tuple[float, float]:
        scores, labels = extract_features(model, files, size, device, batch_size=min(batch_size, 256),
                                          workers=workers, loader=loader)
        return topk_accuracy(scores, labels, 1), topk_accuracy(scores, labels, 5)

    top1, top5 = accuracy(val)
    result = {"top1": top1, "top5": top5, "final_loss": float(loss.detach()), "epochs": epochs, "steps": step,
              "batch_size": batch_size, "lr_at_1024": lr, "lr": peak_lr, "train_images": len(train),
              "val_images": len(val)}
    if holdout is not None:
        result["holdout_top1"], result["holdout_images"] = accuracy(holdout)[0], len(holdout)
    return model, result


def sweep(lrs: Sequence[float], run: Callable[[float], tuple[Classifier, dict[str, Any]]]
          ) -> tuple[Classifier, dict[str, Any], list[dict[str, float]]]:
    """``run(lr)`` for each learning rate; the classifier and result with the best held-out top-1 (the first of
    equals), and one line per rate (lr, held-out and validation top-1). The choice never reads the validation
    split: its numbers are reported for the chosen rate, and listed for the others."""
    best: tuple[Classifier, dict[str, Any]] | None = None
    lines = []
    for lr in lrs:
        model, result = run(lr)
        lines.append({"lr_at_1024": lr, "holdout_top1": result.get("holdout_top1", float("nan")),
                      "top1": result["top1"]})
        if best is None or result.get("holdout_top1", 0.0) > best[1].get("holdout_top1", 0.0):
            best = (model, result)
    assert best is not None, "sweep() needs at least one learning rate"
    return best[0], best[1], lines
