"""Evaluation and export composed from checkpoints: what ``fastbyol eval``, ``export`` and ``demo`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastbyol.config import Config, ModelConfig, config_from_dict
from fastbyol.data.folder import ImageFiles
from fastbyol.engine import checkpoint
from fastbyol.errors import FastByolError
from fastbyol.eval.export import export_bytes, online_encoder_state
from fastbyol.eval.features import CenterViews, extract_features
from fastbyol.eval.knn import knn_accuracy
from fastbyol.eval.linear import linear_probe
from fastbyol.files import atomic_write_bytes
from fastbyol.model.backbone import Encoder


def encoder_from_checkpoint(target: str, expect_arch: str | None = None) -> tuple[Encoder, Config]:
    """The ONLINE encoder of a checkpoint file or run directory (never the target)."""
    _, state = checkpoint.resolve_resume(target)
    cfg = config_from_dict(state["config"])
    if expect_arch and expect_arch != cfg.model.arch:
        raise FastByolError(f"checkpoint {target} holds a {cfg.model.arch} encoder, not {expect_arch}: "
                            f"pass a {expect_arch} checkpoint or drop --arch")
    encoder = Encoder.from_config(cfg.model)
    try:
        encoder.load_state_dict(online_encoder_state(state["model"]))
    except RuntimeError as e:
        raise FastByolError(f"checkpoint {target} does not fit a {cfg.model.arch} encoder "
                            f"({str(e).splitlines()[0]}): it was written for another architecture") from None
    return encoder, cfg


@torch.no_grad()
def calibrate_batchnorm(encoder: Encoder, files: ImageFiles, size: int, device: torch.device,
                        batches: int = 8, batch_size: int = 128) -> None:
    """Set BatchNorm running statistics from training images (a forward in train mode, no gradient), so a
    random-init encoder normalises its features like a trained one: a fair baseline, not a broken one."""
    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    encoder.train()
    loader = torch.utils.data.DataLoader(CenterViews(files, size), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for i, (x, _) in enumerate(loader):
        if i == batches:
            break
        encoder(x.to(device))
    encoder.eval()


def calibrated_random_encoder(cfg: ModelConfig, seed: int, data_root: str, size: int,
                              device: torch.device, init: str = "haiku") -> Encoder:
    """A baseline: the same architecture at random initialisation (seeded; ``init`` 'haiku' as training
    starts, or 'torchvision', the standard random network), BatchNorm calibrated on the training split of
    ``data_root``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder.from_config(cfg, init=init).to(device)
    calibrate_batchnorm(encoder, split_files(data_root)[0], size, device)
    return encoder


def split_files(data_root: str) -> tuple[ImageFiles, ImageFiles]:
    root = Path(data_root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FastByolError(f"{data_root} has no {split}/ folder: evaluation needs {data_root}/train and "
                                f"{data_root}/val (e.g. from `fastbyol data make digits OUT`)")
    train, val = ImageFiles.scan(str(root / "train")), ImageFiles.scan(str(root / "val"))
    return train, val


def evaluate_encoder(encoder: torch.nn.Module, data_root: str, size: int, device: torch.device, *,
                     knn_k: tuple[int, ...] = (20,),
                     linear_epochs: int | None = 80, batch_size: int = 256, augment: bool = False) -> dict[str, Any]:
    """kNN (cosine, each k) and/or the linear probe: on features precomputed once from centre views, or
    (``augment``) on fresh crop + flip views every epoch, the spec's protocol."""
    train, val = split_files(data_root)
    num_classes = max(max(train.labels), max(val.labels)) + 1
    encoder = encoder.to(device)
    train_f, train_y = extract_features(encoder, train, size, device)
    val_f, val_y = extract_features(encoder, val, size, device)
    out: dict[str, Any] = {"train_images": len(train), "val_images": len(val), "feature_dim": train_f.shape[1]}
    for k in knn_k:
        out[f"knn{k}"] = knn_accuracy(train_f, train_y, val_f, val_y, k, num_classes)
    if linear_epochs:
        def epoch_features(epoch: int) -> torch.Tensor:
            return extract_features(encoder, train, size, device, epoch=epoch)[0]

        out["linear"] = linear_probe(train_f, train_y, val_f, val_y, num_classes, epochs=linear_epochs,
                                     batch_size=batch_size, epoch_features=epoch_features if augment else None)
        out["linear"]["augmented"] = float(augment)
    return out


def export_checkpoint(target: str, out: str) -> list[Path]:
    encoder, cfg = encoder_from_checkpoint(target)
    base = Path(out)
    if base.suffix in (".pth", ".safetensors"):
        base = base.with_suffix("")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"cannot create {base.parent}: {e.strerror or e}") from None
    written = []
    meta = {"arch": cfg.model.arch, "small_stem": str(cfg.model.small_stem), "image_size": str(cfg.model.image_size),
            "timm_kwargs": repr(cfg.model.timm_kwargs), "source": "fastbyol online encoder"}
    for suffix, blob in export_bytes(encoder, meta).items():
        path = base.with_suffix(suffix)
        atomic_write_bytes(path, blob)
        written.append(path)
    return written
