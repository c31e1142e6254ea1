"""A map-style ``torch.utils.data.Dataset`` of the user's as an image source (``data.source=dataset``, the Python
API's ``fastbyol.train(dataset=...)``).

Each item, a PIL image or an image tensor (``[3, H, W]`` or ``[1, H, W]``, float in [0, 1] or uint8), alone or as
``(image, label)``, becomes the RGB PIL image and label a decoded file gives, so the two-view augmentation
(``data.augment``) and the stream order (``data.stream``) treat it as any image: any size (the random crop
resizes it to data.image_size), seeded views per stream position. A float tensor is rounded to 8 bits, as a
JPEG's pixels are. A label is read when it is an integer (the online probe's target); otherwise it is 0 and
unused.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from fastbyol.errors import FastByolError

_KINDS = "PIL images or image tensors [3, H, W] (float in [0, 1] or uint8), alone or as (image, label)"


def as_rgb(image: object, index: int) -> Image.Image:
    """Item ``index``'s image as an RGB PIL image; ``FastByolError`` naming the item if it is not one."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, torch.Tensor):
        raise FastByolError(f"dataset item {index} is a {type(image).__name__}: give {_KINDS}")
    x = image.detach().cpu()
    x = x[None] if x.dim() == 2 else x
    if x.dim() != 3 or x.shape[0] not in (1, 3) or not x.numel():
        raise FastByolError(f"dataset item {index} is a tensor of shape {list(image.shape)}: give images "
                            "[3, H, W] (or [1, H, W]), channels first")
    if x.is_floating_point():
        low, high = float(x.min()), float(x.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise FastByolError(f"dataset item {index} holds values in [{low:.3g}, {high:.3g}]: give float images "
                                "in [0, 1], not normalised (fastbyol augments the views, then normalises them)")
        x = x.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise FastByolError(f"dataset item {index} is a {x.dtype} tensor: give float images in [0, 1] or uint8")
    return Image.fromarray(x.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy())


def _split(item: object) -> tuple[object, int | None]:
    """(image, integer label or None) of an item: an image alone, or a pair (or longer tuple) led by one."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        return item, None
    label: Any = item[1]
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    return item[0], int(label) if isinstance(label, numbers.Integral) and not isinstance(label, bool) else None


class DatasetImages:
    """``images[i] -> (RGB PIL image, label)`` over a map-style Dataset. Item 0 is read when it is made, so a
    dataset of the wrong kind fails there, in one line; a bad item later is skipped and reported like an
    unreadable file (``FastByolError``)."""

    def __init__(self, dataset: object) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise FastByolError(f"dataset {type(dataset).__name__} is not map-style: give a Dataset with __len__ "
                                "and __getitem__ (an IterableDataset has no positions to resume from)")
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise FastByolError(f"dataset {type(dataset).__name__} has no len(): give a map-style Dataset with "
                                "__len__ and __getitem__") from None
        if n < 1:
            raise FastByolError(f"dataset {type(dataset).__name__} is empty")
        self.dataset: Any = dataset
        classes = getattr(dataset, "classes", None)
        self.classes: list[Any] | None = list(classes) if isinstance(classes, (list, tuple)) else None
        """The Dataset's ``classes`` (torchvision's convention), if it has them: the probe's class count."""
        image, label = _split(self.dataset[0])
        as_rgb(image, 0)
        self.labelled = label is not None
        """Item 0 carries an integer label (the online probe needs labels)."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = _split(self.dataset[index])
        return as_rgb(image, index), 0 if label is None else label
