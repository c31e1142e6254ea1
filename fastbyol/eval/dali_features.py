"""Centre-view features of an image folder with the images decoded and resized by NVIDIA DALI (``--loader dali``).

The test view of ``fastbyol.eval.features`` (BYOL.md, "Evaluation protocol"): the shorter side resized to
round(size * 256/224) (bicubic, antialiased), the size x size crop at the centre, ImageNet normalisation. The
geometry (resized height and width, crop corner) is ``center_geometry``'s, computed on the host from each
image's header and fed to DALI with its bytes, so DALI cuts the pixels PIL's ``center_view`` cuts. DALI's own
``resize_shorter`` scales both axes by one factor where PIL scales each to its rounded length: a sub-pixel shift
that moved noise images by 0.5-1.5 in normalised units on average (0.004 this way).

Decoding: ``device="mixed"`` on a GPU (nvJPEG, and the hardware JPEG decoder where the GPU has one), "cpu" when
``device_id`` is None, which is how CI tests it; the graph is otherwise the same, as in ``fastbyol.data.dali``.
Where the pixels differ from PIL's: the JPEG decoder (libjpeg-turbo or nvJPEG against PIL's libjpeg) and the
bicubic filter (DALI's against PIL's, both on uint8 and rounded back to uint8). ``tests/test_eval_dali.py``
measures the views against ``center_view``; the features of the two loaders are cached apart (``view_name``).

Order: the external source hands DALI one batch of encoded images per call in ``files``' order, the last one
short (an external source may return fewer samples than the batch size), and each image's index travels
through the pipeline beside it: every image comes out exactly once, in order, and that is checked per batch.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastbyol.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fastbyol.data.check import check_bytes
from fastbyol.data.dali import EncodedImages, _dali_modules, _to_torch, find_undecodable, require_dali
from fastbyol.data.folder import ImageFiles
from fastbyol.errors import FastByolError
from fastbyol.eval.encode import center_geometry, encode_batches

PREFETCH = 2
"""Batches DALI prepares ahead of the one the encoder runs on."""

REMOVE_HINT = "remove it from the folder (`fastbyol data check --full DIR` lists every such image)"


class CenterFeed:
    """The external source: per call, the next batch of encoded images in order with each one's resized
    [height, width], crop corner [top, left] and index; ``StopIteration`` after the last (short) batch."""

    def __init__(self, files: ImageFiles, size: int, batch_size: int) -> None:
        self.images: EncodedImages = files
        self.size, self.batch_size = size, batch_size
        self.next = 0
        # The images handed to DALI lately: a decode error inside the pipeline does not say which one failed,
        # so ``find_undecodable`` re-checks these (every batch DALI may hold: the queue, the one running, the next).
        self.recent: collections.deque[int] = collections.deque(maxlen=(PREFETCH + 2) * batch_size)

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        start = self.next
        if start >= len(self.images):
            raise StopIteration  # DALI's end of data: the batches already queued still come out
        self.next = stop = min(start + self.batch_size, len(self.images))
        data, shapes, corners, indices = [], [], [], []
        for index in range(start, stop):
            raw = self.images.read(index)
            try:
                with Image.open(io.BytesIO(raw)) as img:  # the header only: the geometry needs the size
                    width, height = img.size
            except Exception as e:  # OSError, SyntaxError, ValueError, DecompressionBombError, ...
                name = self.images.name(index)
                why = check_bytes(raw, name) or " ".join(str(e).split()) or type(e).__name__
                raise FastByolError(f"cannot decode image {name}: {why}: {REMOVE_HINT}") from None
            resized_w, resized_h, left, top = center_geometry(width, height, self.size)
            data.append(np.frombuffer(raw, dtype=np.uint8))
            shapes.append(np.array([resized_h, resized_w], dtype=np.float32))
            corners.append(np.array([top, left], dtype=np.int32))
            indices.append(np.array(index, dtype=np.int64))
            self.recent.append(index)
        return data, shapes, corners, indices


def build_center_pipeline(feed: CenterFeed, batch_size: int, size: int, device_id: int | None,
                          num_threads: int) -> Any:
    """External source -> decode -> resize -> centre crop -> normalise, as NHWC float32 batches (and the
    images' indices). ``device_id`` None: CPU operators only; a GPU id: the decoder is "mixed" and every
    operator after it runs on that GPU, the same graph."""
    dali = require_dali()
    fn, types, _ = _dali_modules()
    where = "cpu" if device_id is None else "mixed"

    @dali.pipeline_def  # type: ignore[misc]
    def center_views() -> tuple[Any, Any]:
        data, shape, corner, index = fn.external_source(source=feed, num_outputs=4, batch=True)
        # EXIF orientation ignored, as PIL's decode in ``load_rgb``: the geometry is the stored image's.
        img = fn.decoders.image(data, device=where, output_type=types.RGB, adjust_orientation=False)
        # uint8 in, uint8 out (rounded), as PIL resizes an RGB image.
        img = fn.resize(img, size=shape, interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.slice(img, start=corner, shape=[size, size], axis_names="HW")
        view = fn.crop_mirror_normalize(img, mean=[255.0 * m for m in IMAGENET_MEAN],
                                        std=[255.0 * s for s in IMAGENET_STD], dtype=types.FLOAT,
                                        output_layout="HWC")
        return view, index

    pipe = center_views(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                        prefetch_queue_depth=PREFETCH, exec_dynamic=True)
    pipe.build()
    return pipe


def _decode_error(error: RuntimeError, feed: CenterFeed) -> FastByolError:
    """DALI stopped on an image it could not decode: name it (the recently fed images decoded with PIL)."""
    culprits = find_undecodable(feed)
    if culprits:
        name, why = culprits[0]
        more = f" (and {len(culprits) - 1} more)" if len(culprits) > 1 else ""
        return FastByolError(f"cannot decode image {name}{more}: {why}: {REMOVE_HINT}")
    lines = str(error).splitlines()
    reason = next((line.strip() for line in lines if "decode" in line.lower()), lines[0] if lines else "")
    return FastByolError(f"DALI could not decode an image PIL decodes ({reason or type(error).__name__}): "
                         "evaluate with --loader torch")


def center_batches(files: ImageFiles, size: int, device: torch.device, batch_size: int = 256,
                   num_threads: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(centre views [B, 3, size, size] float32 on ``device``, channels-last memory; labels [B] int64) in
    ``files``' order, the last batch short."""
    if batch_size < 1:
        raise FastByolError(f"batch size {batch_size}: use 1 or more")
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None
    labels = torch.as_tensor(files.labels, dtype=torch.int64)
    feed = CenterFeed(files, size, batch_size)
    pipe = build_center_pipeline(feed, batch_size, size, device_id, max(1, num_threads))
    done = 0
    try:
        while done < len(files):
            try:
                views, index = pipe.run()
            except RuntimeError as e:
                if "decoders.image" not in str(e):  # not a decode failure: DALI's own error stands
                    raise
                raise _decode_error(e, feed) from None
            indices = torch.from_numpy(np.array(index.as_tensor()).reshape(-1))
            if not torch.equal(indices, torch.arange(done, done + len(indices))):
                raise RuntimeError(f"DALI returned images {indices.tolist()} where {done}.. were due")
            done += len(indices)
            yield _to_torch(views, device), labels[indices]
    finally:
        del pipe


def extract_features_dali(encoder: torch.nn.Module, files: ImageFiles, size: int, device: torch.device,
                          batch_size: int = 256, num_threads: int = 1,
                          progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features``' contract (features [N, D] float32 on the CPU, labels [N] int64, rows in ``files``'
    order; ``progress(images_done)`` after each batch) for centre views decoded by DALI on ``num_threads`` CPU
    threads (and on the GPU of a CUDA ``device``)."""
    require_dali()
    if not len(files):
        raise FastByolError("no images to extract features from: the folder is empty")
    return encode_batches(encoder, center_batches(files, size, device, batch_size, num_threads), len(files),
                          device, progress)
