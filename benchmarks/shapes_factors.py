"""What a frozen encoder knows about the shapes' nuisances, beside their class (benchmarks/NOTES.md, issue 28).

The shapes (``fastbyol data make shapes``) are drawn from a few factors per image: the class (the silhouette),
and nuisances a good representation need not keep: radius, centre, the background's and the foreground's grey
levels, which of the two is brighter, the gap between them and the colour (hue) difference. Every factor is
recomputed from the image's index and the set's seed (``fastbyol.data.shapes.shape_factors``). For each encoder
(a checkpoint, a run directory, or ``random`` for the standard-init network with calibrated BatchNorm) and for
the raw pixels, the script fits a ridge regression from the centre-view features of the training split to each
factor and reports, on the validation split, R^2 for the continuous factors and accuracy for the two discrete
ones (the class, by a one-vs-rest ridge; which is brighter, by the sign). A representation stuck on a shared
nuisance shows up as high R^2 on it with the class near chance.

    python benchmarks/shapes_factors.py DATA_ROOT TARGET [TARGET ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from fastbyol.data.shapes import shape_factors

FACTORS = ("class", "radius", "cx", "cy", "bg_grey", "fg_grey", "fg_brighter", "grey_gap", "hue_gap")
RIDGE = 1e-2
"""Ridge penalty on standardised features, relative to the number of training rows."""


def factor_table(files: Any, seed: int, size: int) -> torch.Tensor:
    """[N, len(FACTORS)] factors of the images (file names are the generator's indices: 000123.png)."""
    rows = []
    for path in files.paths:
        f = shape_factors(int(Path(path).stem), seed, size)
        rows.append([f[name] for name in FACTORS])
    return torch.tensor(rows, dtype=torch.float64)


def _standardise(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    ones = torch.ones(train.shape[0], 1, dtype=torch.float64), torch.ones(val.shape[0], 1, dtype=torch.float64)
    return torch.cat([(train - mean) / std, ones[0]], 1), torch.cat([(val - mean) / std, ones[1]], 1)


def ridge(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor) -> torch.Tensor:
    """Predictions on ``val_x`` of a ridge regression fitted on (train_x, train_y) (columns of y separately)."""
    x, v = _standardise(train_x.double(), val_x.double())
    reg = RIDGE * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0  # the bias is not penalised
    w = torch.linalg.solve(x.T @ x + reg, x.T @ train_y)
    return v @ w


def probe(train_x: torch.Tensor, val_x: torch.Tensor, train_f: torch.Tensor, val_f: torch.Tensor,
          num_classes: int) -> dict[str, float]:
    """Validation score per factor (accuracy for the class and for which is brighter, R^2 otherwise)."""
    out: dict[str, float] = {}
    classes = train_f[:, 0].long()
    onehot = torch.nn.functional.one_hot(classes, num_classes).double()
    out["class"] = float((ridge(train_x, onehot, val_x).argmax(1) == val_f[:, 0].long()).double().mean())
    for i, name in enumerate(FACTORS[1:], start=1):
        pred = ridge(train_x, train_f[:, i:i + 1], val_x)[:, 0]
        truth = val_f[:, i]
        if name == "fg_brighter":
            out[name] = float(((pred > 0.5).double() == truth).double().mean())
        else:
            out[name] = float(1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())
    return out


def main(argv: list[str] | None = None) -> int:
    from fastbyol.config import ModelConfig
    from fastbyol.engine.evaluate import calibrated_random_encoder, load_checkpoint_encoder, split_files
    from fastbyol.eval.features import extract_features

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the shapes root (train/ and val/, from fastbyol data make shapes)")
    parser.add_argument("targets", nargs="+", help="checkpoint files or run directories, or 'random'")
    parser.add_argument("--json", help="also write the scores here")
    args = parser.parse_args(argv)
    meta = json.loads((Path(args.data) / "fastbyol-dataset.json").read_text())
    if meta.get("source") != "fastbyol.data.shapes":
        print(f"shapes_factors: {args.data} is not a shapes set (fastbyol data make shapes)", file=sys.stderr)
        return 2
    seed, size = int(meta["seed"]), int(meta["size"])
    train, val = split_files(args.data)
    train_f, val_f = factor_table(train, seed, size), factor_table(val, seed, size)
    num_classes = len(meta["classes"])
    cpu = torch.device("cpu")

    def pixels(files: Any) -> torch.Tensor:
        return torch.stack([torch.from_numpy(__import__("numpy").asarray(files[i][0], dtype="float32")).flatten()
                            for i in range(len(files))])

    rows: dict[str, dict[str, float]] = {"raw pixels": probe(pixels(train), pixels(val), train_f, val_f, num_classes)}
    for target in args.targets:
        if target == "random":
            encoder = calibrated_random_encoder(ModelConfig(arch="resnet18", small_stem=False), 0, args.data, size,
                                                cpu, init="torchvision")
        else:
            encoder = load_checkpoint_encoder(target).encoder
        tx, _ = extract_features(encoder, train, size, cpu)
        vx, _ = extract_features(encoder, val, size, cpu)
        rows[target] = probe(tx, vx, train_f, val_f, num_classes)
    print("| encoder | " + " | ".join(FACTORS) + " |")
    print("|---|" + "---|" * len(FACTORS))
    for name, scores in rows.items():
        print(f"| {name} | " + " | ".join(f"{scores[f]:.2f}" for f in FACTORS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
