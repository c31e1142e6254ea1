"""What the PIL and the DALI feature loaders share (``fastbyol.eval.features``, ``fastbyol.eval.dali_features``):
the centre view's geometry and the encoder's pass over batches of views."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fastbyol.errors import FastByolError

RESIZE_RATIO = 256 / 224
"""The test view's shorter side over its crop side (BYOL.md, "Evaluation protocol")."""


def center_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the centre view of a width x height image: the shorter
    side resized to round(size * 256/224), then the size x size crop at the centre. One formula for PIL's
    ``center_view`` and the DALI pipeline (``fastbyol.eval.dali_features``), so both cut the same pixels."""
    short = round(size * RESIZE_RATIO)
    scale = short / min(width, height)
    resized_w, resized_h = max(size, round(width * scale)), max(size, round(height * scale))
    return resized_w, resized_h, (resized_w - size) // 2, (resized_h - size) // 2


def encode_batches(encoder: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int,
                   device: torch.device, progress: Callable[[int], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder (eval mode, bf16 autocast on CUDA) over ``batches`` of (views, labels) in order, ``total``
    images in all: (features [total, D] float32 on the CPU, labels [total] int64). What every loader shares."""
    was_training = encoder.training
    encoder.eval()
    cuda = device.type == "cuda"
    features: torch.Tensor | None = None
    labels = torch.empty(total, dtype=torch.int64)
    done = 0
    try:
        for x, y in batches:
            with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                f = encoder(x.to(device, non_blocking=True))
            if features is None:  # one [N, D] buffer filled in place: no second copy from concatenating batches
                features = torch.empty(total, f.shape[1], dtype=torch.float32)
            # Device -> host copy: on CUDA a sync point per batch; the workers keep decoding meanwhile.
            features[done:done + len(y)].copy_(f.flatten(1))
            labels[done:done + len(y)].copy_(y)
            done += len(y)
            if progress is not None:
                progress(done)
    finally:
        encoder.train(was_training)
    if features is None:
        raise FastByolError("no images to extract features from: the folder is empty")
    if done != total:  # a loader that lost or added images: the rows would not be the files'
        raise RuntimeError(f"feature extraction got {done} images for {total} files")
    return features, labels
