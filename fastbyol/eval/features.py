"""Frozen-encoder features of an image folder, with the evaluation views of the spec.

Test views (BYOL.md, "Evaluation protocol"): resize the shorter side to size * 256/224 (bicubic), then
centre-crop size x size, ImageNet normalisation. Training views for the augmented linear protocol:
random-resized crop + flip.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastbyol.data.augment import ViewSpec, apply_view, crop_resize, normalize, sample_view_params
from fastbyol.data.folder import ImageFiles
from fastbyol.data.stream import mix_seed

# Linear-evaluation training views: random-resized crop (as pretraining) + flip, nothing else.
LINEAR_TRAIN_VIEW = ViewSpec(flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)

RESIZE_RATIO = 256 / 224


def center_view(img: Image.Image, size: int) -> torch.Tensor:
    w, h = img.size
    short = round(size * RESIZE_RATIO)
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return normalize(x.permute(2, 0, 1).float().div_(255.0))


class CenterViews(Dataset[tuple[torch.Tensor, int]]):
    """Centre views (``epoch`` None) or seeded random crop + flip training views of epoch ``epoch``."""

    def __init__(self, files: ImageFiles, size: int, epoch: int | None = None, seed: int = 0) -> None:
        self.files, self.size, self.epoch, self.seed = files, size, epoch, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.files[i]
        if self.epoch is None:
            return center_view(img, self.size), label
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i))
        params = sample_view_params(gen, img.height, img.width, LINEAR_TRAIN_VIEW)
        return normalize(apply_view(crop_resize(img, params, self.size), params, LINEAR_TRAIN_VIEW)), label


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, files: ImageFiles, size: int, device: torch.device,
                     batch_size: int = 256, workers: int = 0, epoch: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on the CPU, labels [N]) with the encoder in eval mode (running BN stats),
    of centre views, or of epoch ``epoch``'s augmented training views."""
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(CenterViews(files, size, epoch), batch_size=batch_size, num_workers=workers, shuffle=False)
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = encoder(x.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(y)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
