"""Data sources behind one interface: ``source.batches(start, micro_batch)`` yields ``Batch``es.

The data stream is a sequence of sample *positions* 0, 1, 2, ... over consecutive epochs, each epoch a
fresh permutation of the images (seeded by (seed, epoch)), exactly like the official code's repeated,
shuffled dataset: batches may cross an epoch boundary and no image is dropped. A sample's augmentation
is seeded by (seed, position), so its two views are the same whatever the worker count, and resuming
at position ``step * batch_size`` continues the stream bitwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastbyol.config import IMAGENET_TRAIN_IMAGES, DataConfig
from fastbyol.data.augment import TwoViewTransform, ViewSpec, view_pair
from fastbyol.data.dali import DALI_MISSING
from fastbyol.data.folder import ImageFiles, scan_image_folder
from fastbyol.data.procedural import ProceduralImages
from fastbyol.data.shards import ShardImages, open_shards
from fastbyol.data.stream import StreamOrder, mix_seed, shard_positions
from fastbyol.data.views import Batch, Views
from fastbyol.errors import FastByolError


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[object, int]: ...


Sample = tuple[torch.Tensor, torch.Tensor, int, list[str]]


class TwoViewDataset(Dataset[Sample]):
    """Indexed by stream position: position -> (epoch permutation) -> image -> two views."""

    def __init__(self, images: ImageSource, transform: TwoViewTransform, seed: int) -> None:
        self.images, self.transform, self.seed = images, transform, seed
        self.order = StreamOrder(len(images), seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> Sample:
        (img, label), _, skipped = self.order.read(position, self.images.__getitem__)
        v1, v2 = self.transform(img, seed=mix_seed(self.seed, 0x5EED, position))  # type: ignore[arg-type]
        return v1, v2, label, skipped


class PositionBatches(Sampler[list[int]]):
    """``shard_positions`` as a DataLoader batch sampler."""

    def __init__(self, start: int, micro_batch: int, num_batches: int, rank: int = 0, world: int = 1) -> None:
        self.args = (start, micro_batch, num_batches, rank, world)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        return shard_positions(*self.args)


def collate_views(samples: list[Sample]) -> Batch:
    v1 = torch.stack([s[0] for s in samples])
    v2 = torch.stack([s[1] for s in samples])
    labels = torch.tensor([s[2] for s in samples], dtype=torch.long)
    return Batch(Views(v1, v2), labels, [msg for s in samples for msg in s[3]])


def _worker_init(_: int) -> None:
    # Each worker augments one sample at a time; intra-op threads would only fight over the cores.
    torch.set_num_threads(1)


def _views(cfg: DataConfig) -> tuple[ViewSpec, ViewSpec]:
    return view_pair(cfg.views, cfg.colour_jitter, cfg.crop_area_min, cfg.invert_p)


class TorchVisionSource:
    """Image folder, shards or procedural images -> PIL/torch two-view augmentation in DataLoader workers."""

    kind = "torch"

    def __init__(self, images: ImageSource, num_classes: int, cfg: DataConfig, seed: int, pin_memory: bool) -> None:
        transform = TwoViewTransform(cfg.image_size, *_views(cfg), resize=cfg.resize)
        self.dataset = TwoViewDataset(images, transform, seed)
        self.images_per_epoch = len(images)
        self.num_classes = num_classes
        self.cfg, self.pin_memory = cfg, pin_memory

    def batches(self, start: int, micro_batch: int, num_batches: int, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        workers = self.cfg.workers
        loader = DataLoader(
            self.dataset, batch_sampler=PositionBatches(start, micro_batch, num_batches, rank, world),
            collate_fn=collate_views, num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.cfg.prefetch if workers else None, worker_init_fn=_worker_init,
            persistent_workers=False,
        )
        return iter(loader)


class SyntheticSource:
    """Random normalised-range tensors made once on the device: the step's throughput with no input
    pipeline. Every batch is the same pair of tensors (no copy, no host work)."""

    kind = "synthetic"
    num_classes = 0  # no labels: the online probe needs a folder or procedural source

    def __init__(self, cfg: DataConfig, seed: int, device: torch.device) -> None:
        self.images_per_epoch = cfg.num_images or IMAGENET_TRAIN_IMAGES
        self.size, self.seed, self.device = cfg.image_size, seed, device

    def batches(self, start: int, micro_batch: int, num_batches: int, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, rank))  # per-rank data
        shape = (micro_batch, 3, self.size, self.size)
        views = Views(torch.randn(shape, generator=gen, device=self.device),
                      torch.randn(shape, generator=gen, device=self.device))
        for _ in range(num_batches):
            yield Batch(views, None, [])


class DataSource(Protocol):
    """What the Trainer and the benchmarks read: TorchVisionSource, SyntheticSource, DaliSource (the first and
    the last read an image folder or its tar shards, ``fastbyol.data.shards``)."""

    kind: str
    """"torch", "synthetic" or "dali"."""
    images_per_epoch: int
    num_classes: int
    """Number of label classes (0: the source has no labels)."""

    def batches(self, start: int, micro_batch: int, num_batches: int, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        """This rank's ``num_batches`` micro-batches of the stream from global position ``start``."""
        ...


def folder_files(cfg: DataConfig) -> tuple[list[str], list[int], int]:
    """(files, labels, number of classes) of the image folder: from data.file_list when set (the clean
    list of ``fastbyol data check``), else by scanning data.path."""
    if cfg.file_list:
        from fastbyol.data.check import read_file_list

        files, labels = read_file_list(cfg.path, cfg.file_list)
        if not files:
            raise FastByolError(f"data.file_list {cfg.file_list} lists no images: run `fastbyol data check "
                                f"{cfg.path}` again, or unset data.file_list")
        return files, labels, max(labels) + 1
    paths, labels, classes = scan_image_folder(cfg.path)
    return [str(p) for p in paths], labels, len(classes)


def labelled_images(cfg: DataConfig) -> tuple[ImageFiles | ShardImages, int]:
    """(images, number of classes) of data.source=folder (``ImageFiles``) or shards (``ShardImages``): the
    same samples in the same order with the same labels when the shards were packed from the folder."""
    if cfg.source == "shards":
        shards = open_shards(cfg.path)
        return shards, len(shards.index.classes)
    files, labels, num_classes = folder_files(cfg)
    return ImageFiles(files, labels), num_classes


def dali_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def use_dali(loader: str, device: torch.device, missing: str) -> bool:
    """The one loader rule of training (``data.loader``) and evaluation (``--loader``): 'torch' never, 'dali'
    always (``missing``, the line that says how to get DALI, when it is not installed), 'auto' on a CUDA device
    when DALI is installed: there nvJPEG (and the GPU's hardware JPEG decoder) and the GPU's resize keep up
    with the encoder, where PIL needs many processes."""
    if loader == "dali" and not dali_installed():
        raise FastByolError(missing)
    return loader == "dali" or (loader == "auto" and device.type == "cuda" and dali_installed())


def build_source(cfg: DataConfig, seed: int, device: torch.device, images: ImageSource | None = None) -> DataSource:
    """The source ``cfg`` describes; ``images``: the Python API's dataset (``data.source=dataset``, read by the
    torch loader: DALI decodes files, not Python objects)."""
    if images is None and cfg.source == "dataset":
        raise FastByolError("data.source=dataset reads a Dataset given to the Python API: pass it again, "
                            "fastbyol.train(dataset=..., resume=RUN_DIR)")
    if images is not None and cfg.source != "dataset":
        raise FastByolError(f"a dataset was given, but the run reads data.source={cfg.source}: drop it, or start a "
                            "new run")
    if cfg.source == "synthetic":
        return SyntheticSource(cfg, seed, device)
    encoded = cfg.source in ("folder", "shards")
    if cfg.loader == "dali" and not encoded:
        raise FastByolError(f"data.loader=dali reads image folders and shards, not data.source={cfg.source}: "
                            "use data.source=folder (or shards) or data.loader=torch")
    if encoded and use_dali(cfg.loader, device, DALI_MISSING):
        from fastbyol.data.dali import DaliSource

        files, num_classes = labelled_images(cfg)
        return DaliSource(files, files.labels, num_classes, cfg.image_size, seed, device,
                          num_threads=max(cfg.workers, 1), prefetch=cfg.prefetch,
                          hw_decoder_load=cfg.hw_decoder_load, decode=cfg.dali_decode,
                          views=_views(cfg), resize=cfg.resize)
    if images is not None:
        if len(images) != cfg.num_images:
            raise FastByolError(f"the dataset has {len(images)} images but the run was built for "
                                f"data.num_images={cfg.num_images}: pass the run's dataset")
        num_classes = cfg.num_classes
    elif cfg.source == "procedural":
        images = ProceduralImages(cfg.num_images or IMAGENET_TRAIN_IMAGES, seed=seed, size=max(cfg.image_size, 64),
                                  num_classes=cfg.num_classes)
        num_classes = cfg.num_classes
    else:
        images, num_classes = labelled_images(cfg)
    return TorchVisionSource(images, num_classes, cfg, seed, pin_memory=device.type == "cuda")
