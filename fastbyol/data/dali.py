"""The two BYOL views decoded and augmented by NVIDIA DALI (BYOL.md, "Augmentations").

Each image is decoded once (``device="mixed"`` on a GPU: nvJPEG, the hardware decoder where the GPU has
one; the same graph with CPU operators when ``device_id`` is None, which is how CI tests it) and both
views are cut from it. Every random decision comes from the same place as in the torchvision pipeline:
``TwoViewTransform.params`` seeded by (seed, stream position) and fed to DALI per sample through an
external source, as one float vector per view (``VIEW_VECTOR``). So the two pipelines make the same
crops, flips, jitter orders, strengths, grayscale, blur and solarize choices for the same position, the
data stream (epoch permutations, positions, resume) is the loader's, and the checkpoint needs nothing
more than the position.

Per view, in the official order: crop + bicubic resize (data.resize), flip, colour jitter with its four ops in the
sample's random order (each followed by a clip), grayscale, clip, blur (separable, zero padding, taps
= size / 10, sigma per sample), solarize, clip, then ImageNet normalisation, as NHWC float32.

Where DALI differs from the official TensorFlow ops (``tests/test_dali.py`` measures each against the
torchvision pipeline on the same decisions):
- saturation and hue: TF's HSV semantics written in DALI arithmetic, in closed forms equal up to
  rounding (``fn.hsv``, a linear transform in YIQ space, differs from them by ~0.1 on saturated
  colours, so it is not used);
- data.resize=pil: the bicubic resize is DALI's (antialiased, on the float image) against PIL's on uint8;
  data.resize=official: TF's bicubic resize, the torchvision pipeline's ``resize_official`` in DALI operators,
  equal to it up to float32 rounding (``_resize_official``: multi_paste gathers the taps ``resize_plan`` lists,
  arithmetic weighs them; ``fn.resize`` cannot: its cubic filter clamps at the borders where TF renormalises);
- the JPEG decoder is libjpeg-turbo (CPU) or nvJPEG (GPU) against PIL's libjpeg: pixels can differ by
  a few levels.

The encoded bytes come from an ``EncodedImages`` reader: a folder's files (``ImageFiles``) or the members of
tar shards (``ShardImages``, ``data.source=shards``), so shards give the folder's batches bit for bit. DALI's
own ``fn.readers.webdataset`` is not used: it reads each shard in its own order (sequential runs, shuffled
in a buffer) and cannot follow the stream's per-position epoch permutation, which resume, rank sharding and
the torchvision pipeline's equality all rest on.
"""

from __future__ import annotations

import collections
import io
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from fastbyol.data.augment import (
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZES,
    VIEW1,
    VIEW2,
    TwoViewTransform,
    ViewParams,
    ViewSpec,
    blur_taps,
    gaussian_kernel,
    official_resize_taps,
)
from fastbyol.data.folder import ImageFiles
from fastbyol.data.stream import StreamOrder, mix_seed, shard_positions
from fastbyol.data.views import Batch, Views
from fastbyol.errors import FastByolError

RECENT_IMAGES = 4096  # > (prefetch queue + 2) x micro-batch for any sensible setting
# One view's decisions as a float vector, in this order.
VIEW_VECTOR = ("top", "left", "height", "width", "flip", "jitter", "order0", "order1", "order2", "order3",
               "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma", "solarize",
               "invert")
_I = {name: i for i, name in enumerate(VIEW_VECTOR)}


def view_vector(p: ViewParams) -> np.ndarray:
    """``ViewParams`` -> the float32 vector the pipeline reads (layout ``VIEW_VECTOR``)."""
    return np.array([*p.crop, p.flip, p.jitter, *p.jitter_order, p.brightness_delta, p.contrast_factor,
                     p.saturation_factor, p.hue_delta, p.gray, p.blur, p.sigma, p.solarize, p.invert],
                    dtype=np.float32)


def blur_filters(p: ViewParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The view's separable gaussian as a [1, taps] and a [taps, 1] filter (the identity if no blur)."""
    taps = blur_taps(size)
    k = np.asarray(gaussian_kernel(p.sigma, taps), dtype=np.float32) if p.blur else \
        np.eye(1, taps, taps // 2, dtype=np.float32)[0]
    return k.reshape(1, taps), k.reshape(taps, 1)


# Slots of a view's resize plan (``resize_plan``), each [size, 2]: the per-region arguments of the eight
# multi_paste gathers of data.resize=official.
_ROWS_IN = 0  # 0..3: in_anchors of the row taps 0..3 (source row, crop's left column)
_COLS_IN = 4  # 4..7: in_anchors of the column taps 0..3 (0, source column)
_ROW_SHAPE, _ROW_CANVAS, _ROWS_OUT, _COLS_OUT, _COL_SHAPE, _PLAN_SLOTS = 8, 9, 10, 11, 12, 13


def resize_plan(p: ViewParams, size: int, whole_image: bool) -> tuple[np.ndarray, np.ndarray]:
    """The view's TF bicubic resize (``official_resize_taps`` of its crop) as multi_paste arguments: (plan
    int32 [13, size, 2], weights float32 [8, size]: the row taps' weights, then the columns').

    Output row i of row tap k is the source row ``rows[k, i]`` of the crop (1 x width, pasted at (i, 0));
    output column j of column tap k is the column ``cols[k, j]`` of that (size x 1, pasted at (0, j)).
    ``whole_image``: the image handed to DALI is the whole decoded image (data.dali_decode=full), so the
    row anchors carry the crop's corner; otherwise it is the crop itself (roi)."""
    top, left, height, width = p.crop
    rows, row_weight = official_resize_taps(height, size)
    cols, col_weight = official_resize_taps(width, size)
    dy, dx = (top, left) if whole_image else (0, 0)
    plan = np.zeros((_PLAN_SLOTS, size, 2), dtype=np.int32)
    plan[_ROWS_IN:_ROWS_IN + 4, :, 0] = rows + dy
    plan[_ROWS_IN:_ROWS_IN + 4, :, 1] = dx
    plan[_COLS_IN:_COLS_IN + 4, :, 1] = cols
    plan[_ROW_SHAPE] = (1, width)
    plan[_ROW_CANVAS] = (size, width)
    plan[_ROWS_OUT, :, 0] = plan[_COLS_OUT, :, 1] = np.arange(size)
    plan[_COL_SHAPE] = (size, 1)
    return plan, np.concatenate([row_weight, col_weight])


DALI_MISSING = ("data.loader=dali needs NVIDIA DALI: pip install 'fastbyol[gpu]' (nvidia-dali-cuda130), or use "
                "data.loader=torch")


def require_dali() -> Any:
    """Import DALI or say how to get it."""
    try:
        import nvidia.dali as dali
    except ImportError:
        raise FastByolError(DALI_MISSING) from None
    return dali


def _dali_modules() -> tuple[Any, Any, Any]:
    """(fn, types, math) of DALI, typed loosely: its stubs do not describe the graph-building API."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    return fn, types, dmath


class EncodedImages(Protocol):
    """What the feed reads: an image's encoded bytes by index, and its name for messages. ``ImageFiles`` (a
    folder's files) and ``ShardImages`` (members of tar shards) are two."""

    def __len__(self) -> int: ...

    def name(self, index: int) -> str:
        """How messages name the image (a path; a shard and member); unique per image."""
        ...

    def read(self, index: int) -> bytes:
        """The encoded bytes; ``FastByolError('cannot read image <name>: ...')`` if they cannot be read."""
        ...

    def exclude_hint(self) -> str:
        """How to keep an image that only DALI's decoder refuses out of a run."""
        ...


class FedImages(Protocol):
    """What ``find_undecodable`` reads of an external source: its images and the indices it handed DALI lately
    (``_Feed``, and the evaluation's centre-view feed in ``fastbyol.eval.dali_features``)."""

    images: EncodedImages
    recent: collections.deque[int]


def encoded_images(images: Sequence[str] | EncodedImages, labels: Sequence[int] | np.ndarray) -> EncodedImages:
    """A list of file paths as ``ImageFiles``; a reader as it is."""
    if isinstance(images, (list, tuple)):
        return ImageFiles(list(images), list(labels))
    return images  # type: ignore[return-value]


class _Feed:
    """The external source: stream position -> encoded bytes, label and both views' decisions (with
    data.resize=official, then the sample's index in its batch and each view's ``resize_plan``)."""

    def __init__(self, images: Sequence[str] | EncodedImages, labels: Sequence[int] | np.ndarray, size: int,
                 seed: int, positions: Iterator[int], views: tuple[ViewSpec, ViewSpec] = (VIEW1, VIEW2),
                 undecodable: dict[str, str] | None = None, resize: str = "pil", decode: str = "full",
                 batch_size: int = 1) -> None:
        self.images, self.labels, self.size, self.seed = encoded_images(images, labels), labels, size, seed
        self.positions = positions
        self.resize, self.whole_image, self.batch_size = resize, decode == "full", batch_size
        # DALI calls a per-sample source batch_size times per batch, in order: the count modulo the batch is
        # the sample's index in it, which multi_paste's in_ids need (a view's pastes read its own image).
        self.calls = 0
        self.transform = TwoViewTransform(size, *views)
        self.order = StreamOrder(len(self.images), seed)  # the torchvision pipeline's order, position for position
        # Images DALI's decoder failed on earlier in the run (name -> why): skipped like unreadable ones.
        self.undecodable = undecodable if undecodable is not None else {}
        self.skipped: list[tuple[int, str]] = []  # (stream position, message)
        # The images handed to DALI lately (indices): a decode error inside the pipeline does not say which
        # sample failed, so the source re-checks these to name it.
        self.recent: collections.deque[int] = collections.deque(maxlen=RECENT_IMAGES)

    def _read(self, index: int) -> tuple[np.ndarray, int, int]:
        name = self.images.name(index)
        if name in self.undecodable:
            raise FastByolError(f"cannot decode image {name}: {self.undecodable[name]}")
        data = self.images.read(index)
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only: the crop needs the size
                width, height = img.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # the bomb is no OSError
            raise FastByolError(f"cannot read image {name}: {e}") from None
        return np.frombuffer(data, dtype=np.uint8), height, width

    def __call__(self) -> tuple[np.ndarray, ...]:
        position = next(self.positions)
        (data, height, width), index, skipped = self.order.read(position, self._read)
        self.skipped += [(position, msg) for msg in skipped]
        self.recent.append(index)
        p1, p2 = self.transform.params(height, width, mix_seed(self.seed, 0x5EED, position))
        (h1, v1), (h2, v2) = blur_filters(p1, self.size), blur_filters(p2, self.size)
        out = (data, np.array(self.labels[index], dtype=np.int64), view_vector(p1), view_vector(p2), h1, v1, h2, v2)
        sample, self.calls = self.calls % self.batch_size, self.calls + 1
        if self.resize != "official":
            return out
        ids = np.full(self.size, sample, dtype=np.int32)
        return (*out, ids, *resize_plan(p1, self.size, self.whole_image), *resize_plan(p2, self.size, self.whole_image))


def _adjust_saturation(x: Any, factor: Any) -> Any:
    """TF's saturation adjustment (HSV s -> clip(s * factor, 0, 1), h and v kept) without the HSV round
    trip: with v = max and c = max - min over the channels, keeping h and v moves every channel along
    v - (v - x) * c' / c, and c' / c = min(factor, 1 / s) = min(factor, v / c). Equal up to rounding."""
    fn, _, dmath = _dali_modules()
    v = fn.reductions.max(x, axes=[2], keep_dims=True)
    c = v - fn.reductions.min(x, axes=[2], keep_dims=True)
    return v - (v - x) * dmath.min(factor, v / (c + (c <= 0.0)))  # c == 0: x == v, any scale


def _adjust_hue(x: Any, delta: Any) -> Any:
    """TF's hue adjustment (HSV h -> (h + delta) mod 1, s and v kept), TF's ``rgb_to_hsv`` formulas for h
    and the closed form of its ``hsv_to_rgb`` sextant chains for the way back: channel n in (5, 3, 1)
    for (R, G, B) is v - c clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, c = v s = max - min.
    Planes keep a unit channel axis ([H, W, 1]) so the last line broadcasts over the three channels
    in one expression; a comparison is 0 or 1 in arithmetic, so TF's ``where``s become products."""
    fn, types, dmath = _dali_modules()
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    v = dmath.max(dmath.max(r, g), b)
    c = v - dmath.min(dmath.min(r, g), b)
    norm = (c > 0.0) / (c * 6.0 + (c <= 0.0))  # 1 / (6 c), or 0 without chroma (then h = 0)
    is_r = r == v
    is_g = (g == v) & (r != v)
    is_b = (g != v) & (r != v)
    h = is_r * (g - b) * norm + is_g * ((b - r) * norm + 2.0 / 6.0) + is_b * ((r - g) * norm + 4.0 / 6.0)
    h = h + delta
    h = h - dmath.floor(h)
    k = types.Constant(np.array([5.0, 3.0, 1.0], dtype=np.float32).reshape(1, 1, 3)) + h * 6.0
    k = k - dmath.floor(k / 6.0) * 6.0
    return v - c * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def _resize_official(img: Any, ids: Any, plan: Any, weights: Any, size: int, on_gpu: bool = False) -> Any:
    """TF's bicubic resize of the view's crop (``resize_plan``) as float32 HWC, not clipped: per axis, four
    multi_paste gathers of the taps (exact integer anchors fed from the host, so no coordinate is
    recomputed here) weighed and summed in the torchvision pipeline's order, ((v0 w0 + v1 w1) + v2 w2) + v3 w3,
    rows first. ``ids``: the sample's index in the batch, once per region (each view reads its own image)."""
    from nvidia.dali import newaxis

    fn, types, _ = _dali_modules()
    if on_gpu:
        weights = weights.gpu()
    down = None
    for k in range(4):
        tap = fn.multi_paste(img, in_ids=ids, in_anchors=plan[_ROWS_IN + k], shapes=plan[_ROW_SHAPE],
                             out_anchors=plan[_ROWS_OUT], output_size=plan[_ROW_CANVAS, 0], dtype=types.FLOAT)
        term = tap * weights[_ROWS_IN + k, :, newaxis, newaxis]
        down = term if down is None else down + term
    out = None
    for k in range(4):
        tap = fn.multi_paste(down, in_ids=ids, in_anchors=plan[_COLS_IN + k], shapes=plan[_COL_SHAPE],
                             out_anchors=plan[_COLS_OUT], output_size=[size, size])
        term = tap * weights[_COLS_IN + k, newaxis, :, newaxis]
        out = term if out is None else out + term
    return out


def _augment(img: Any, p: Any, blur_h: Any, blur_v: Any, spec: ViewSpec, size: int, cropped: bool = False,
             on_gpu: bool = False, official: tuple[Any, Any, Any] | None = None) -> Any:
    """One view from the decoded uint8 HWC image (or, ``cropped``, its ROI-decoded crop) and its decision
    vector (DALI graph, conditionals on). ``official``: (ids, plan, weights) of data.resize=official
    (``_resize_official``; the plan holds the crop), else DALI's own antialiased bicubic.

    ``p`` lives on the CPU: conditions and operator arguments read it there. On a GPU the values that
    enter arithmetic with the image and the blur filters are copied to the GPU once (``q``), since a
    GPU operator's regular inputs are GPU data."""
    fn, types, dmath = _dali_modules()
    q = p.gpu() if on_gpu else p
    if on_gpu:
        blur_h, blur_v = blur_h.gpu(), blur_v.gpu()
    top, left, height, width = p[_I["top"]], p[_I["left"]], p[_I["height"]], p[_I["width"]]
    if official is not None:
        x = _resize_official(img, *official, size, on_gpu)
    elif cropped:
        x = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.FLOAT)
    else:
        x = fn.resize(img, size=[size, size], roi_start=fn.stack(top, left),
                      roi_end=fn.stack(top + height, left + width), roi_relative=False,
                      interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.FLOAT)
    x = dmath.clamp(x / 255.0, 0.0, 1.0)
    x = fn.flip(x, horizontal=fn.cast(p[_I["flip"]], dtype=types.INT32))
    jitter = p[_I["jitter"]] > 0.5
    for slot in range(4):  # the four jitter ops in this sample's order, each clipped after
        op = p[_I["order0"] + slot]
        if jitter & (op == 0) & (spec.brightness > 0):
            x = dmath.clamp(x + q[_I["brightness"]], 0.0, 1.0)
        if jitter & (op == 1) & (spec.contrast > 0):
            mean = fn.reductions.mean(x, axes=[0, 1], keep_dims=True)
            x = dmath.clamp((x - mean) * q[_I["contrast"]] + mean, 0.0, 1.0)
        if jitter & (op == 2) & (spec.saturation > 0):
            x = dmath.clamp(_adjust_saturation(x, q[_I["saturation"]]), 0.0, 1.0)
        if jitter & (op == 3) & (spec.hue > 0):
            x = dmath.clamp(_adjust_hue(x, q[_I["hue"]]), 0.0, 1.0)
    if p[_I["gray"]] > 0.5:
        x = fn.coord_transform(x, M=list(GRAY_WEIGHTS) * 3)
    x = dmath.clamp(x, 0.0, 1.0)
    if p[_I["blur"]] > 0.5:  # zero padding, as the official 'SAME' depthwise convolutions
        x = fn.filter(x, blur_h, border="constant")
        x = fn.filter(x, blur_v, border="constant")
    if p[_I["solarize"]] > 0.5:  # x < 0.5 ? x : 1 - x, as 0.5 - |x - 0.5|
        x = 0.5 - dmath.abs(x - 0.5)
    x = dmath.clamp(x, 0.0, 1.0)
    if p[_I["invert"]] > 0.5:  # data.invert_p (not in the official code)
        x = 1.0 - x
    return fn.crop_mirror_normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), dtype=types.FLOAT,
                                    output_layout="HWC")


def build_pipeline(feed: _Feed, batch_size: int, size: int, device_id: int | None, num_threads: int,
                   seed: int, prefetch: int = 2, hw_decoder_load: float = 0.65, decode: str = "full",
                   views: tuple[ViewSpec, ViewSpec] = (VIEW1, VIEW2), resize: str = "pil") -> Any:
    """The DALI pipeline: external source -> decode -> two views. ``device_id`` None: CPU operators only.

    ``decode``: 'full' decodes each image once and cuts both views from it; 'roi' decodes each view's
    crop only (twice per image, but only the crop's pixels; see benchmarks/pipeline.py). ``resize``
    (data.resize): 'official' needs a feed made with the same resize and decode (its resize plans)."""
    if resize not in RESIZES:
        raise ValueError(f"resize {resize!r}: use one of {', '.join(RESIZES)}")
    dali = require_dali()
    fn, types, _ = _dali_modules()
    on_gpu = device_id is not None
    where = "mixed" if on_gpu else "cpu"
    gpu = {} if device_id is None else {"hw_decoder_load": hw_decoder_load}
    spec1, spec2 = views

    def roi(data: Any, p: Any) -> Any:
        anchor = fn.stack(p[_I["top"]], p[_I["left"]])
        shape = fn.stack(p[_I["height"]], p[_I["width"]])
        return fn.decoders.image_slice(data, anchor, shape, axis_names="HW", normalized_anchor=False,
                                       normalized_shape=False, device=where, output_type=types.RGB, **gpu)

    @dali.pipeline_def(enable_conditionals=True)  # type: ignore[misc]
    def two_views() -> tuple[Any, ...]:
        fed = fn.external_source(source=feed, num_outputs=8 if resize == "pil" else 13, batch=False)
        data, label, p1, p2, h1, v1, h2, v2 = fed[:8]
        official1, official2 = ((fed[8], fed[9], fed[10]), (fed[8], fed[11], fed[12])) if resize == "official" \
            else (None, None)
        if decode == "roi":
            return (_augment(roi(data, p1), p1, h1, v1, spec1, size, cropped=True, on_gpu=on_gpu,
                             official=official1),
                    _augment(roi(data, p2), p2, h2, v2, spec2, size, cropped=True, on_gpu=on_gpu,
                             official=official2), label)
        img = fn.decoders.image(data, device=where, output_type=types.RGB, **gpu)
        return (_augment(img, p1, h1, v1, spec1, size, on_gpu=on_gpu, official=official1),
                _augment(img, p2, h2, v2, spec2, size, on_gpu=on_gpu, official=official2), label)

    pipe = two_views(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                     prefetch_queue_depth=prefetch, exec_dynamic=True)
    pipe.build()
    return pipe


class DaliSource:
    """Image folder or shards -> DALI two-view pipeline, behind the loader's ``batches(start, micro_batch, n)``.

    ``files``: the folder's file paths, or any ``EncodedImages`` (``ShardImages``)."""

    kind = "dali"

    def __init__(self, files: Sequence[str] | EncodedImages, labels: Sequence[int] | np.ndarray, num_classes: int,
                 size: int, seed: int, device: torch.device, num_threads: int, prefetch: int = 2,
                 hw_decoder_load: float = 0.65, decode: str = "full",
                 views: tuple[ViewSpec, ViewSpec] = (VIEW1, VIEW2), resize: str = "pil") -> None:
        require_dali()
        if not len(files):
            raise FastByolError("the DALI source got no images: check data.path")
        self.files, self.labels, self.num_classes = files, labels, num_classes
        self.images = encoded_images(files, labels)
        self.size, self.seed, self.device = size, seed, device
        self.num_threads, self.prefetch, self.hw_decoder_load = max(1, num_threads), prefetch, hw_decoder_load
        self.decode, self.views, self.resize = decode, views, resize
        self.undecodable: dict[str, str] = {}
        """Images DALI's decoder failed on (name -> why), found while reading: skipped from then on."""
        self.images_per_epoch = len(files)

    def batches(self, start: int, micro_batch: int, num_batches: int, rank: int = 0, world: int = 1
                ) -> Iterator[Batch]:
        """This rank's micro-batches of the stream from global position ``start`` (``shard_positions``).

        An image whose header reads but whose data DALI cannot decode (a truncated JPEG) stops the pipeline
        mid-batch. Then the image is found (the recently fed ones decoded with PIL), added to the feed's
        undecodable set, and the pipeline rebuilt from the failed batch's first position: the batch comes
        out with the image replaced, exactly as the torchvision pipeline replaces it, and the image is
        skipped, counted and listed from then on. Only a failure that names no image ends the run."""
        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        undecodable = self.undecodable
        reported: set[tuple[int, str]] = set()  # a rebuilt feed re-reads positions: report each skip once
        done = 0
        while done < num_batches:
            # DALI prefetches past the last batch asked for: the positions run on (lazily) beyond it.
            first = start + done * world * micro_batch
            positions = itertools.chain.from_iterable(shard_positions(first, micro_batch, 1 << 62, rank, world))
            feed = _Feed(self.images, self.labels, self.size, self.seed, positions, self.views, undecodable,
                         self.resize, self.decode, micro_batch)
            pipe = build_pipeline(feed, micro_batch, self.size, device_id, self.num_threads, self.seed,
                                  self.prefetch, self.hw_decoder_load, self.decode, self.views, self.resize)
            try:
                while done < num_batches:
                    v1, v2, labels = pipe.run()
                    views = Views(_to_torch(v1, self.device), _to_torch(v2, self.device))
                    # The feed runs ahead of the batch handed out (prefetch), so a skipped file may be
                    # reported with a batch or two of delay; every one is reported exactly once.
                    skipped = [msg for pos, msg in feed.skipped if (pos, msg) not in reported]
                    reported.update(feed.skipped)
                    done += 1
                    yield Batch(views, torch.from_numpy(labels.as_array().reshape(-1)), skipped)
            except RuntimeError as e:
                if "decoders.image" not in str(e):  # not a decode failure: DALI's own error stands
                    raise
                culprits = find_undecodable(feed)
                if not culprits or all(name in undecodable for name, _ in culprits):
                    raise decode_error(e, feed) from None
                undecodable.update(culprits)
            finally:
                del pipe


def find_undecodable(feed: FedImages) -> list[tuple[str, str]]:
    """The images ``feed`` handed DALI lately that do not decode with PIL, newest first, with why: (name,
    reason)."""
    from fastbyol.data.check import check_bytes

    found = []
    for index in dict.fromkeys(reversed(feed.recent)):
        name = feed.images.name(index)
        try:
            why = check_bytes(feed.images.read(index), name, full=True)
        except FastByolError as e:  # read before, unreadable now (a file removed meanwhile)
            why = str(e).removeprefix(f"cannot read image {name}: ")
        if why:
            found.append((name, why))
    return found


def decode_error(error: RuntimeError, feed: _Feed) -> FastByolError:
    """DALI stopped on a sample it could not decode: name the image (by decoding the recently fed ones
    with PIL) and say how to keep it out of the run."""
    reason = next((line.strip() for line in str(error).splitlines() if "decode" in line.lower()),
                  str(error).splitlines()[0] if str(error) else type(error).__name__)
    culprits = find_undecodable(feed)
    fix = feed.images.exclude_hint()
    if culprits:
        name, why = culprits[0]
        more = f" (and {len(culprits) - 1} more)" if len(culprits) > 1 else ""
        return FastByolError(f"cannot decode image {name}{more}: {why}: {fix}")
    return FastByolError(f"DALI could not decode an image ({reason}): {fix}")


def _to_torch(tensor_list: Any, device: torch.device) -> torch.Tensor:
    """NHWC DALI batch -> NCHW torch view (channels-last memory, no copy of the layout)."""
    dense = tensor_list.as_tensor()
    if device.type == "cuda":
        # DALI's plugin copies on torch's current stream, ordered after DALI's own work: one device
        # copy (~0.6 MB per 224 px view) that a zero-copy DLPack hand-off would save, once it is shown
        # on a GPU that DALI does not recycle the buffer while the step still reads it.
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tuple(dense.shape()), dtype=torch.float32, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        out = torch.from_numpy(np.array(dense))
    return out.permute(0, 3, 1, 2)
