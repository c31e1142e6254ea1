"""Frozen-encoder features of an image folder, with the evaluation views of the spec, and their cache on disk.

Test views (BYOL.md, "Evaluation protocol"): resize the shorter side to size * 256/224 (bicubic), then
centre-crop size x size, ImageNet normalisation. Training views for the augmented linear protocol:
random-resized crop + flip, seeded per (seed, epoch, image index), so any number of DataLoader workers gives
the same views in the same order as one process. Centre views can be decoded and resized by DALI instead
(``resolve_loader``, ``fastbyol.eval.dali_features``; the default on a GPU with DALI installed), with the same
geometry.

Cache (``FeatureCache``): one file per (split, view), named by the digest of a ``FeatureKey`` (encoder, data,
image size, view, precision, ``EVAL_VERSION``), so kNN and the linear probe of one checkpoint on one folder
share the centre-view features, and a second evaluation runs no forward pass. A file holds N x D x 4 bytes of
float32 features plus N x 8 bytes of labels: ImageNet's 1,281,167 training images take 10.5 GB with a
ResNet-50 (D = 2048), 2.6 GB with a ResNet-18 (D = 512); its 50,000 validation images 0.41 / 0.10 GB. The
augmented protocol (``--augment``) adds one training-set file per epoch: 80 epochs of a ResNet-50 are 840 GB,
so a file is not written when it would leave less than ``FeatureCache.min_free_bytes`` free on the disk.
Writing serialises the file in memory first (``atomic_write_bytes``): peak memory is about twice the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastbyol.data.augment import ViewSpec, apply_view, crop_resize, normalize, sample_view_params
from fastbyol.data.folder import ImageFiles
from fastbyol.data.loader import use_dali
from fastbyol.data.stream import mix_seed
from fastbyol.errors import FastByolError
from fastbyol.eval.encode import center_geometry, encode_batches
from fastbyol.files import atomic_write_bytes

# Linear-evaluation training views: random-resized crop (as pretraining) + flip, nothing else.
LINEAR_TRAIN_VIEW = ViewSpec(flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)

EVAL_VERSION = 1
"""Part of every cache key: bump it when the views, the extraction or the cache file change, so older cache
files stop matching instead of being read as current."""


def center_view(img: Image.Image, size: int) -> torch.Tensor:
    resized_w, resized_h, left, top = center_geometry(img.width, img.height, size)
    img = img.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
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
        # Seeded by (seed, epoch, index) alone: the same view whichever process decodes image i.
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i))
        params = sample_view_params(gen, img.height, img.width, LINEAR_TRAIN_VIEW)
        return normalize(apply_view(crop_resize(img, params, self.size), params, LINEAR_TRAIN_VIEW)), label


LOADERS = ("auto", "torch", "dali")
"""Who decodes the evaluation images: ``resolve_loader`` turns 'auto' into one of the other two."""


def resolve_loader(loader: str, device: torch.device, epoch: int | None = None) -> str:
    """'torch' (PIL in DataLoader processes) or 'dali' (``fastbyol.eval.dali_features``) for the views of
    ``epoch`` (None: centre views) on ``device``.

    'auto' is DALI for centre views on a CUDA device when DALI is installed (training's rule,
    ``fastbyol.data.loader.use_dali``). Augmented training views (``--augment``) always take the torch path,
    whatever ``loader`` says: their crops and flips are seeded per image in ``CenterViews``, and a second
    implementation would have to match them decision for decision (as ``fastbyol.data.dali`` does for BYOL's views)
    to keep the protocol one.
    'dali' without DALI installed is an error that says how to get it."""
    if loader not in LOADERS:
        raise FastByolError(f"loader {loader!r}: use one of {', '.join(LOADERS)}")
    if epoch is not None or loader == "torch":
        return "torch"
    dali = use_dali(loader, device, "--loader dali needs nvidia-dali: pip install -e .[gpu], or --loader torch")
    return "dali" if dali else "torch"


def extract_features(encoder: torch.nn.Module, files: ImageFiles, size: int, device: torch.device,
                     batch_size: int = 256, workers: int = 0, epoch: int | None = None, seed: int = 0,
                     progress: Callable[[int], None] | None = None, loader: str = "torch"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on the CPU, labels [N] int64) with the encoder in eval mode (running BN
    stats), of centre views, or of epoch ``epoch``'s augmented training views (seed ``seed``).

    ``workers`` DataLoader processes decode and transform the images while this process runs the encoder
    (bf16 autocast on CUDA, from pinned memory with non-blocking copies); the rows are in ``files``' order
    whatever ``workers`` is, and equal bit for bit. ``progress(images_done)`` is called after each batch.
    ``loader`` (``resolve_loader``): 'dali' decodes the centre views with DALI instead, on ``max(1, workers)``
    CPU threads; its pixels differ from PIL's by a few levels, so a cache keys its features apart
    (``view_name``)."""
    if resolve_loader(loader, device, epoch) == "dali":
        from fastbyol.eval.dali_features import extract_features_dali

        return extract_features_dali(encoder, files, size, device, batch_size=batch_size,
                                     num_threads=max(1, workers), progress=progress)
    cuda = device.type == "cuda"
    views = DataLoader(CenterViews(files, size, epoch, seed), batch_size=batch_size, num_workers=workers,
                       shuffle=False, pin_memory=cuda)
    return encode_batches(encoder, views, len(files), device, progress)


def default_workers(device: torch.device) -> int:
    """DataLoader processes for feature extraction. On a GPU one per CPU, at most 8: the encoder runs at
    thousands of images/s there while one process decodes a few hundred ImageNet JPEGs/s. On the CPU none:
    the encoder is the bottleneck and shares the cores with the workers (a ResNet-18 at 64 px on 2 cores:
    decoding is ~10% of a pass, and 1 or 2 workers changed its time by -3% to +3%; benchmarks/NOTES.md,
    issue 20)."""
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def view_name(epoch: int | None, seed: int, loader: str = "torch") -> str:
    """'center' (decoded by PIL), 'center-dali' (by DALI: ``resolve_loader``'s answer), or
    'augment-e<epoch>-s<seed>' for an augmented training epoch (PIL always). Part of the cache key and of the
    file name; the PIL names are those of the cache files written before DALI could decode, which stay valid."""
    if epoch is not None:
        return f"augment-e{epoch}-s{seed}"
    return "center-dali" if loader == "dali" else "center"


def precision_name(device: torch.device) -> str:
    """What the forward pass computes in: bf16 autocast on CUDA (as ``extract_features``), float32 otherwise."""
    return "cuda bf16 autocast" if device.type == "cuda" else f"{device.type} float32"


def data_fingerprint(files: ImageFiles, folder: str) -> str:
    """SHA-256 over the folder's absolute path and, per image in order, its path under the folder, label,
    size and modification time (ns): an image added, removed, relabelled or rewritten changes it. One
    ``stat`` per file: a few seconds for ImageNet's 1.28 M images on a local disk, more on a cluster file
    system (a metadata round trip each)."""
    root = os.path.abspath(folder)
    digest = hashlib.sha256(root.encode() + b"\n")
    for path, label in zip(files.paths, files.labels):
        try:
            st = os.stat(path)
        except OSError as e:
            raise FastByolError(f"cannot read image {path}: {e.strerror or e}: restore it or rescan the folder") \
                from None
        rel = os.path.relpath(os.path.abspath(path), root)
        digest.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def state_fingerprint(module: torch.nn.Module) -> str:
    """'<class> state_dict sha256:<hex>' over every entry's name, dtype, shape and bytes: the identity of an
    encoder held in memory (the demo's baselines). The class is part of it: ``RawPixels`` has no state."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__} state_dict sha256:{digest.hexdigest()}"


@dataclasses.dataclass(frozen=True)
class FeatureKey:
    """Everything one cached features file depends on; its digest names the file."""

    encoder: str
    """The checkpoint's SHA-256 (``checkpoint sha256:<hex>``) or ``state_fingerprint`` of an in-memory encoder."""
    data: str
    """``data_fingerprint`` of the split's images."""
    split: str
    """'train' or 'val' (part of the file name)."""
    size: int
    """Evaluation crop side in pixels."""
    view: str
    """``view_name``: centre (and which decoder: PIL or DALI), or an augmented epoch with its seed."""
    precision: str
    """``precision_name`` of the device the forward pass ran on."""
    version: int = EVAL_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


def _tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class FeatureCache:
    """Features and labels per ``FeatureKey`` in ``root``: ``<split>-<view>-<digest[:16]>.pt``, a
    ``torch.save`` dict (``torch.load(path, weights_only=True)`` reads it) of features, labels, the key and a
    SHA-256 of the tensors' bytes. Written atomically; a file that does not load, match its key or its
    checksum is reported in one line and recomputed. ``read``/``computed`` count what ``features`` did."""

    min_free_bytes = 1 << 30
    """A file is not written when the disk would keep less than this free after it."""

    def __init__(self, root: Path | str, stream: IO[str] | None = None) -> None:
        self.root = Path(root)
        self.stream = stream or sys.stderr
        self.read = self.computed = 0
        self._writes_off = False

    def path(self, key: FeatureKey) -> Path:
        return self.root / f"{key.split}-{key.view}-{key.digest()[:16]}.pt"

    def _say(self, text: str) -> None:
        print(f"fastbyol: warning: {text}", file=self.stream, flush=True)

    def load(self, key: FeatureKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            features, labels = blob["features"], blob["labels"]
            if blob["key"] != key.digest():
                raise ValueError("it was written for other features")
            if (features.dtype != torch.float32 or labels.dtype != torch.int64 or features.dim() != 2
                    or labels.shape != (features.shape[0],)):
                raise ValueError(f"unexpected tensors {tuple(features.shape)} {features.dtype}, "
                                 f"{tuple(labels.shape)} {labels.dtype}")
            if _tensor_sha256(features, labels) != blob["sha256"]:
                raise ValueError("checksum mismatch")
        except Exception as e:  # a truncated zip, an unpickling error, a missing entry, a bad checksum: recompute
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            self._say(f"feature cache file {path} is damaged ({reason}): recomputing it")
            return None
        return features, labels

    def save(self, key: FeatureKey, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write one file; a full disk or an unwritable folder is said once, and nothing else is written."""
        if self._writes_off:
            return
        path = self.path(key)
        buf = io.BytesIO()
        torch.save({"features": features, "labels": labels, "key": key.digest(), "sha256": _tensor_sha256(features,
                    labels), "meta": dataclasses.asdict(key)}, buf)
        data = buf.getvalue()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            if free - len(data) < self.min_free_bytes:
                self._writes_off = True
                self._say(f"feature cache {self.root}: not writing {path.name} ({len(data) / 1e9:.2f} GB) with "
                          f"{free / 1e9:.2f} GB free; caching off for this evaluation (free space or pass --cache DIR)")
                return
            atomic_write_bytes(path, data)
        except OSError as e:
            self._writes_off = True
            self._say(f"cannot write feature cache {path}: {e.strerror or e}; caching off for this evaluation "
                      "(pass --cache DIR on a writable disk, or --no-cache)")

    def features(self, key: FeatureKey, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (features, labels) of ``key``, or ``compute()``'s, then cached."""
        found = self.load(key)
        if found is not None:
            self.read += 1
            return found
        features, labels = compute()
        self.computed += 1
        self.save(key, features, labels)
        return features, labels

    def summary(self) -> dict[str, Any]:
        return {"cache": str(self.root), "read": self.read, "computed": self.computed}
