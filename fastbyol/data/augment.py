"""BYOL view augmentations on the CPU, per sample, following the official code exactly.

Reference: deepmind-research/byol, ``utils/augmentations.py`` (``augment_config``, ``postprocess``,
``_color_transform_single_image``, ``_gaussian_blur_single_image``, ``_solarize_single_image``,
``rgb_to_hsv``/``hsv_to_rgb``) and ``utils/dataset.py`` (``_decode_and_random_crop``). BYOL.md,
"Augmentations", has the table.

One view of one image::

    crop   one attempt: area U[0.08, 1] * H*W, aspect exp(U[log 3/4, log 4/3]), clamped to the image,
           bicubic resize to size x size (data.resize: TF's or PIL's), /255, clip
    flip   horizontal, p 0.5
    colour p 0.8: brightness, contrast, saturation, hue in a random order, each followed by a clip;
           then, independently, p 0.2: grayscale; clip
    blur   sigma U[0.1, 2.0], 2 * int(size / 10 / 2) + 1 taps, separable, zero padding; p 1.0 / 0.1
    solarize  x < 0.5 ? x : 1 - x; p 0.0 / 0.2
    clip   to [0, 1]; then ImageNet mean/std normalisation

Every random decision of a view is drawn up front by ``sample_view_params`` from a ``torch.Generator``
(a fixed number of draws, used or not), so a sample's views depend only on its seed, never on the
worker or the order in which samples are made.

The colour ops give the same values as the official formulas bit for bit (tests/test_augment.py holds
a line-by-line transcription), written with fewer and cheaper operators: at 32 px a view is ~150
operators on 3 KB tensors, so per-operator overhead, not arithmetic, is the cost.

Known deviations from the official TF/JAX pipeline, none of which changes the sampled distributions:
with data.resize=pil (the default) the resize is PIL's bicubic on uint8 (antialiased when shrinking,
rounded to 8 bits); data.resize=official is TF's, value for value up to float32 rounding
(``resize_official``); the blur kernel is computed in float64, then rounded to float32; a crop side that
would round to 0 pixels (only for images under ~4 px) is 1 pixel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ViewSpec:
    """Probabilities and strengths of one view's augmentations (official ``augment_config``)."""

    flip_p: float
    """Probability of a horizontal flip."""
    jitter_p: float
    """Probability of colour jitter (brightness, contrast, saturation, hue in a random order)."""
    gray_p: float
    """Probability of grayscale, drawn independently of the jitter and applied after it."""
    blur_p: float
    """Probability of the gaussian blur."""
    solarize_p: float
    """Probability of solarisation."""
    brightness: float = 0.4
    """Additive brightness delta U[-b, b] (official ``_random_brightness``)."""
    contrast: float = 0.4
    """Contrast factor U[1 - c, 1 + c], per-channel mean (official ``_random_contrast``)."""
    saturation: float = 0.2
    """Saturation factor U[1 - s, 1 + s] on HSV saturation (official ``_random_saturation``)."""
    hue: float = 0.1
    """Hue delta U[-h, h] in turns (official ``_random_hue``)."""
    sigma_min: float = 0.1
    """Blur sigma lower bound, in output pixels."""
    sigma_max: float = 2.0
    """Blur sigma upper bound, in output pixels."""
    area_min: float = 0.08
    """Crop area fraction lower bound (official ``_decode_and_random_crop``)."""
    area_max: float = 1.0
    """Crop area fraction upper bound."""
    ratio_min: float = 3 / 4
    """Crop aspect ratio (width / height) lower bound, sampled log-uniformly."""
    ratio_max: float = 4 / 3
    """Crop aspect ratio upper bound."""
    solarize_threshold: float = 0.5
    """Values at or above it are inverted (official ``_solarize_single_image``)."""
    invert_p: float = 0.0
    """Probability of inverting the whole view (x -> 1 - x) after solarisation; not in the official code (0
    there). For sets whose foreground and background brightness is a per-image constant (the demo's shapes),
    inversion is the one augmentation that stops 'which is brighter' being shared by the two views."""


# Official augment_config: the two views differ only in blur and solarize probabilities.
VIEW1 = ViewSpec(flip_p=0.5, jitter_p=0.8, gray_p=0.2, blur_p=1.0, solarize_p=0.0)
VIEW2 = ViewSpec(flip_p=0.5, jitter_p=0.8, gray_p=0.2, blur_p=0.1, solarize_p=0.2)
# data.views: BYOL's asymmetric pair, or its view 1 twice (SimCLR's symmetric views; SimCLR itself blurs
# with p 0.5, the issue asks for BYOL's view 1 so both methods see the same augmentation family).
VIEW_PAIRS: dict[str, tuple[ViewSpec, ViewSpec]] = {"byol": (VIEW1, VIEW2), "view1": (VIEW1, VIEW1)}
# data.colour_jitter: the spec's strengths, or stronger ones for small synthetic sets (the demo's shapes), where
# a per-image colour is the easiest cue two views share: brightness, contrast and saturation 0.8, any hue
# (0.5 turns), grayscale with p 0.5.
COLOUR_JITTER: dict[str, dict[str, float]] = {
    "byol": {},
    "strong": {"brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.5, "gray_p": 0.5},
}


def view_pair(views: str, colour_jitter: str = "byol", crop_area_min: float = 0.08,
              invert_p: float = 0.0) -> tuple[ViewSpec, ViewSpec]:
    """The two views' specs for ``data.views``, ``data.colour_jitter``, ``data.crop_area_min`` and
    ``data.invert_p``."""
    first, second = (dataclasses.replace(spec, area_min=crop_area_min, invert_p=invert_p,
                                         **COLOUR_JITTER[colour_jitter])
                     for spec in VIEW_PAIRS[views])
    return first, second

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
"""Indices of the jitter ops in ``ViewParams.jitter_order`` (the official ``_make_cond`` idx)."""


@dataclass(frozen=True)
class ViewParams:
    """Every random decision of one view of one sample."""

    crop: tuple[int, int, int, int]
    """(top, left, height, width) of the crop, in source pixels."""
    flip: bool
    jitter: bool
    jitter_order: tuple[int, ...]
    """Permutation of 0..3 = brightness, contrast, saturation, hue."""
    brightness_delta: float
    contrast_factor: float
    saturation_factor: float
    hue_delta: float
    gray: bool
    blur: bool
    sigma: float
    solarize: bool
    invert: bool = False


# Layout of the one vector of uniforms a view consumes (a fixed count: the stream never depends on
# which augmentations fire).
_U_AREA, _U_ASPECT, _U_TOP, _U_LEFT, _U_FLIP, _U_JITTER = range(6)
_U_ORDER = 6  # 4 keys whose argsort is the jitter order (a uniform permutation)
_U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLAR = range(10, 18)
_NUM_UNIFORMS = 18
_U_INVERT = 18  # drawn only when the spec's invert_p > 0, so the official stream is unchanged by the option


def _randint(u: float, high: int) -> int:
    """Integer uniform in [0, high] from a uniform u in [0, 1)."""
    return min(int(u * (high + 1)), high)


def sample_view_params(gen: torch.Generator, height: int, width: int, spec: ViewSpec) -> ViewParams:
    """Draws one view's decisions for a ``height`` x ``width`` source image from ``gen`` only.

    One ``torch.rand`` call of a fixed length (float64), so the generator advances by the same amount
    whatever the outcome (one uniform more when ``spec.invert_p`` > 0). The crop is the official
    ``_decode_and_random_crop``: a single attempt, sides rounded (half to even, like ``tf.round``) then
    clamped to the image, no retry.
    """
    u = torch.rand(_NUM_UNIFORMS + (spec.invert_p > 0), generator=gen, dtype=torch.float64).tolist()

    area = (spec.area_min + (spec.area_max - spec.area_min) * u[_U_AREA]) * height * width
    log_lo, log_hi = math.log(spec.ratio_min), math.log(spec.ratio_max)
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[_U_ASPECT])
    crop_w = min(max(round(math.sqrt(area * aspect)), 1), width)
    crop_h = min(max(round(math.sqrt(area / aspect)), 1), height)
    top = _randint(u[_U_TOP], height - crop_h)
    left = _randint(u[_U_LEFT], width - crop_w)

    keys = u[_U_ORDER:_U_ORDER + 4]
    order = tuple(sorted(range(4), key=keys.__getitem__))
    return ViewParams(
        crop=(top, left, crop_h, crop_w),
        flip=u[_U_FLIP] < spec.flip_p,
        jitter=u[_U_JITTER] < spec.jitter_p,
        jitter_order=order,
        brightness_delta=(2 * u[_U_BRIGHT] - 1) * spec.brightness,
        contrast_factor=1 + (2 * u[_U_CONTRAST] - 1) * spec.contrast,
        saturation_factor=1 + (2 * u[_U_SAT] - 1) * spec.saturation,
        hue_delta=(2 * u[_U_HUE] - 1) * spec.hue,
        gray=u[_U_GRAY] < spec.gray_p,
        blur=u[_U_BLUR] < spec.blur_p,
        sigma=spec.sigma_min + (spec.sigma_max - spec.sigma_min) * u[_U_SIGMA],
        solarize=u[_U_SOLAR] < spec.solarize_p,
        invert=spec.invert_p > 0 and u[_U_INVERT] < spec.invert_p,
    )


def blur_taps(size: int) -> int:
    """Blur kernel length for ``size`` px crops: 2 * int(size / 10 / 2) + 1.

    The official code blurs 224 px crops with kernel_size 23 (radius int(23 / 2) = 11): one tenth of
    the image side. Scaled the same way: 23 taps at 224, 9 at 96, 7 at 64, 3 at 32.
    """
    return 2 * int(size / 10 / 2) + 1


RESIZES = ("official", "pil")
"""``data.resize``: 'official' (TF's ``tf.image.resize`` bicubic, ``resize_official``) or 'pil' (PIL's bicubic)."""

KEYS_A = -0.5
"""Keys' cubic convolution parameter, as TF's ``resize_bicubic`` with half-pixel centres uses it
(``use_keys_cubic``; R. G. Keys, IEEE TASSP 29(6), 1981)."""
COEFFS_TABLE_SIZE = 1024
"""TF's ``kTableSize``: the weights are looked up with the sub-pixel offset rounded to 1/1024."""


def _keys_coeffs_table() -> np.ndarray:
    """TF's ``InitCoeffsTable(-0.5)`` (tensorflow/core/kernels/image/resize_bicubic_op.cc): for x = i / 1024,
    i = 0..1024, entry 2i is the near weight ((A+2) x - (A+3)) x^2 + 1 and entry 2i + 1 the far weight
    ((A (x+1) - 5A) (x+1) + 8A) (x+1) - 4A; computed in double (A is a double there), stored as float32."""
    x = np.arange(COEFFS_TABLE_SIZE + 1, dtype=np.float64) / COEFFS_TABLE_SIZE  # exact, as TF's float x
    a = KEYS_A
    table = np.empty(2 * (COEFFS_TABLE_SIZE + 1), dtype=np.float32)
    table[0::2] = ((a + 2) * x - (a + 3)) * x * x + 1
    far = x + 1.0
    table[1::2] = ((a * far - 5 * a) * far + 8 * a) * far - 4 * a
    return table


_KEYS_COEFFS = _keys_coeffs_table()


@functools.lru_cache(maxsize=1024)
def official_resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index [4, out_size] int64, weight [4, out_size] float32) of TF's bicubic resize along one axis.

    TF 2's ``tf.image.resize(method=BICUBIC, antialias=False)`` is ``resize_bicubic(half_pixel_centers=True)``,
    whose ``GetWeightsAndIndices<HalfPixelScaler, use_keys_cubic=true>`` is, all in float32::

        scale = in_size / out_size;  in_f = (out + 0.5) * scale - 0.5
        in_loc = floor(in_f);  offset = lrint((in_f - in_loc) * 1024)
        taps in_loc - 1, in_loc, in_loc + 1, in_loc + 2 with weights
            table[2 offset + 1], table[2 offset], table[2 (1024 - offset)], table[2 (1024 - offset) + 1]

    A tap outside [0, in_size) gets weight 0 (its index is clamped into the image) and the four weights are
    multiplied by 1 / their sum (done for every output, as TF does). Element-wise numpy float32 operations
    round after each one, as the C++ does compiled without FMA contraction. Read-only arrays (cached)."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    in_f = (np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5)
    in_loc = np.floor(in_f)
    offset = np.rint((in_f - in_loc) * f32(COEFFS_TABLE_SIZE)).astype(np.int64)  # lrintf: half to even
    back = COEFFS_TABLE_SIZE - offset
    table = _KEYS_COEFFS
    weight = np.stack([table[2 * offset + 1], table[2 * offset], table[2 * back], table[2 * back + 1]])
    index = in_loc.astype(np.int64) + np.arange(-1, 3).reshape(4, 1)
    weight = np.where((index >= 0) & (index < in_size), weight, f32(0.0))
    total = ((weight[0] + weight[1]) + weight[2]) + weight[3]
    renormalise = np.abs(total) >= f32(1000.0) * np.finfo(f32).tiny  # TF's guard against dividing by ~0
    weight = np.where(renormalise, weight * (f32(1.0) / np.where(renormalise, total, f32(1.0))), weight)
    index, weight = np.clip(index, 0, in_size - 1), weight.astype(f32)
    index.flags.writeable = weight.flags.writeable = False
    return index, weight


@functools.lru_cache(maxsize=1024)
def _official_resize_taps_torch(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    index, weight = official_resize_taps(in_size, out_size)
    return torch.from_numpy(index.copy()), torch.from_numpy(weight.copy())


def resize_official(x: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] float32 (0..255) -> [C, size, size] float32, TF's bicubic resize without antialiasing
    (``official_resize_taps``), not clipped: overshoots past 0 and 255 are kept, as TF keeps them.

    Separable, in TF's order of operations: each output is ((v0 w0 + v1 w1) + v2 w2) + v3 w3 over its four
    taps, first down each column (the rows' taps), then along each row. Four gathers and multiply-adds per
    axis: the band has 4 entries per output, so a banded matmul (as the blur uses) would multiply mostly
    zeros, ~3 * size * H * (W + size) MACs against ~12 * size * (W + size) here (at 224 px from a 300 x 280
    crop: 1.2 ms against 3.8 ms on one core)."""
    height, width = x.shape[-2:]
    rows, row_weight = _official_resize_taps_torch(height, size)
    cols, col_weight = _official_resize_taps_torch(width, size)
    down = x.index_select(-2, rows[0]).mul_(row_weight[0].view(size, 1))
    for k in range(1, 4):
        down.add_(x.index_select(-2, rows[k]).mul_(row_weight[k].view(size, 1)))
    # The columns' taps gathered as rows of the transpose: ~1.5x faster than gathering along the last axis.
    across = down.transpose(-1, -2).contiguous()
    out = across.index_select(-2, cols[0]).mul_(col_weight[0].view(size, 1))
    for k in range(1, 4):
        out.add_(across.index_select(-2, cols[k]).mul_(col_weight[k].view(size, 1)))
    return out.transpose(-1, -2).contiguous()


def crop_resize(img: Image.Image, params: ViewParams, size: int, resize: str = "pil") -> torch.Tensor:
    """The view's crop of ``img``, bicubic-resized to [3, size, size] float32 in [0, 1].

    ``resize`` (``data.resize``): 'pil', PIL's bicubic on the uint8 crop (antialiased when shrinking, rounded
    to uint8), or 'official', the official ``_preprocess_image``: the uint8 crop as float, TF's bicubic resize
    (``resize_official``), then ``clip(x / 255, 0, 1)``."""
    if resize not in RESIZES:
        raise ValueError(f"resize {resize!r}: use one of {', '.join(RESIZES)}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    top, left, height, width = params.crop
    # Crop first, then resize, as the official decode_and_crop + resize: resize(box=...) would also
    # read pixels outside the box for the filter's support at the crop's edges.
    crop = img.crop((left, top, left + width, top + height))
    if resize == "official":
        pixels = torch.from_numpy(np.array(crop))  # [height, width, 3] uint8 (a writable copy)
        x = resize_official(pixels.permute(2, 0, 1).to(dtype=torch.float32, memory_format=torch.contiguous_format),
                            size)
        return x.div_(255.0).clamp_(0.0, 1.0)
    out = crop.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(out))  # [size, size, 3] uint8 (a writable copy)
    x = pixels.permute(2, 0, 1).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    return x.div_(255.0).clamp_(0.0, 1.0)


# Constants as 0-d tensors: a Python float operand costs a scalar-to-tensor wrap per call, which at
# 32 px is more than the arithmetic (the HSV ops below are ~40 small operators per call).
# float32, the pipeline's dtype (2/6 and 4/6 are rounded to float32 as in the official float32 graph).
_ZERO, _HALF, _ONE, _TWO, _SIX, _TWO_SIXTHS, _FOUR_SIXTHS = (
    torch.tensor(v, dtype=torch.float32) for v in (0.0, 0.5, 1.0, 2.0, 6.0, 2.0 / 6.0, 4.0 / 6.0))


def adjust_brightness(x: torch.Tensor, delta: float) -> torch.Tensor:
    """x + delta (official ``_adjust_brightness``: additive, not multiplicative like torchvision)."""
    return x + delta


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * (x - m) + m, m the mean of each channel over its pixels (tf.image.adjust_contrast)."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean).mul_(factor).add_(mean)


def _mod1(x: torch.Tensor) -> torch.Tensor:
    """x % 1, bitwise equal to ``torch.remainder(x, 1.0)`` (both round the exact x - floor(x) once)
    and several times faster on the CPU, where remainder goes through fmod."""
    return x - x.floor()


def _hsv_planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, s, v) planes of [3, H, W] RGB; see ``rgb_to_hsv``."""
    r, g, b = x.unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    s = torch.where(v > _ZERO, chroma / v, _ZERO)
    has_chroma = chroma > _ZERO
    norm = torch.where(has_chroma, (chroma * _SIX).reciprocal_(), _ZERO)
    h_r = (g - b).mul_(norm)
    h_g = (b - r).mul_(norm).add_(_TWO_SIXTHS)
    h_b = (r - g).mul_(norm).add_(_FOUR_SIXTHS)
    h = torch.where(r == v, h_r, torch.where(g == v, h_g, h_b))
    return _mod1(h), s, v


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[3, H, W] RGB -> [3, H, W] HSV, all in [0, 1]; the official ``rgb_to_hsv`` (TF's formulas)::

        v = max(r, g, b); range = v - min(r, g, b); s = range / v if v > 0 else 0
        norm = 1 / (6 range) if range != 0 else 1e9
        h = norm (g - b)        if r == v
            norm (b - r) + 2/6  elif g == v
            norm (r - g) + 4/6  otherwise
        h = h * (range > 0); h = h + (h < 0)

    Same values with two operators fewer: where range == 0, r == v, so the r case applies, and
    ``norm`` is 0 there instead of 1e9, which zeroes h as ``h * (range > 0)`` does; h is in
    [-1/6, 5/6], where ``h - floor(h)`` is ``h + (h < 0)``.
    """
    return torch.stack(_hsv_planes(x))


# hsv_to_rgb's where-chains for all three channels at once, as arithmetic (torch.where and comparisons
# are several times slower than clamp/mul on the CPU). Channel i is 0 in the two hue sextants around
# _ZEROS_AT[i] (r: 2, 3; g: 4, 5; b: 0, 1), x in the next one on each side, c in the two opposite: the
# circular distance d of sextant k from _ZEROS_AT[i] is 0.5, 1.5 or 2.5, so the weights
# clamp(d - 1.5, 0, 1) of c and clamp(d - 0.5, 0, 1) - clamp(d - 1.5, 0, 1) of x are exactly 0 or 1,
# and c * 1 + x * 0 is bitwise c (c, x finite and >= 0): the result equals the chains bit for bit.
_ZEROS_AT = torch.tensor([2.5, 4.5, 0.5], dtype=torch.float32).view(3, 1, 1)
_ONE_AND_HALF = torch.tensor(1.5, dtype=torch.float32)


def _rgb_from_planes(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[3, H, W] RGB from (h, s, v) planes; see ``hsv_to_rgb``."""
    c = s * v
    m = v - c
    dh = _mod1(h).mul_(_SIX)  # in [0, 6]
    dh_mod2 = dh - (dh * _HALF).floor_().mul_(_TWO)  # dh % 2, exact for dh >= 0
    x = _ONE - dh_mod2.sub_(_ONE).abs_()
    x.mul_(c)  # c (1 - |dh % 2 - 1|)
    sextant = dh.floor_()
    # Sextant 6 (h % 1 rounded up to 1.0) takes 0 in every channel in the official chains; x is
    # already 0 there (dh % 2 = 0), and c is zeroed here.
    c = c * (_SIX - sextant).clamp_(0.0, 1.0)
    d = (sextant - _ZEROS_AT).abs_()  # [3, H, W]
    d = torch.minimum(d, _SIX - d)
    takes_c = (d - _ONE_AND_HALF).clamp_(0.0, 1.0)
    takes_x = (d - _HALF).clamp_(0.0, 1.0).sub_(takes_c)
    return (c * takes_c).add_(x * takes_x).add_(m)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """[3, H, W] HSV -> [3, H, W] RGB; the official ``hsv_to_rgb`` (TF's formulas)::

        c = s v; m = v - c; dh = (h % 1) 6; x = c (1 - |dh % 2 - 1|); k = floor(dh)
        r = (c if k in {0, 5} else x if k in {1, 4} else 0) + m
        g = (c if k in {1, 2} else x if k in {0, 3} else 0) + m
        b = (c if k in {3, 4} else x if k in {2, 5} else 0) + m
    """
    h, s, v = hsv.unbind(0)
    return _rgb_from_planes(h, s, v)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """HSV saturation s -> clip(s * factor, 0, 1) (official ``_adjust_saturation``)."""
    h, s, v = _hsv_planes(x)
    return _rgb_from_planes(h, s.mul_(factor).clamp_(0.0, 1.0), v)


def adjust_hue(x: torch.Tensor, delta: float) -> torch.Tensor:
    """HSV hue h -> (h + delta) % 1 (official ``_adjust_hue``)."""
    h, s, v = _hsv_planes(x)
    return _rgb_from_planes(_mod1(h.add_(delta)), s, v)


GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
"""Official ``_to_grayscale`` weights for (R, G, B)."""


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """0.2989 R + 0.5870 G + 0.1140 B, tiled to 3 channels."""
    r, g, b = x.unbind(0)
    gray = r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]
    return gray.expand(3, -1, -1).clone()


def gaussian_kernel(sigma: float, taps: int) -> list[float]:
    """exp(-k^2 / (2 sigma^2)) for k in [-radius, radius], normalised to sum 1 (official
    ``_gaussian_blur_single_image``)."""
    radius = taps // 2
    weights = [math.exp(-(k * k) / (2.0 * sigma * sigma)) for k in range(-radius, radius + 1)]
    total = sum(weights)
    return [w / total for w in weights]


@functools.lru_cache(maxsize=64)
def _band_index(n: int, taps: int) -> torch.Tensor:
    """[n, n] index into the kernel padded with one trailing 0: entry (i, j) is j - i + radius inside
    the band |j - i| <= radius, else ``taps`` (the 0)."""
    radius = taps // 2
    offset = torch.arange(n).view(1, n) - torch.arange(n).view(n, 1) + radius
    return torch.where((offset >= 0) & (offset < taps), offset, taps)


def gaussian_blur(x: torch.Tensor, sigma: float, taps: int) -> torch.Tensor:
    """Separable gaussian blur of [C, H, W], horizontal then vertical, depthwise, zero padding.

    Official ``_gaussian_blur_single_image``: two depthwise convolutions with padding 'SAME', which for
    an odd kernel is ``radius`` zeros on each side (so borders darken, as in the official code). Each
    pass is a matmul with the banded [n, n] matrix of the kernel: the same zero-padded convolution
    (the kernel is symmetric), and far faster on the CPU than a depthwise conv2d of one image.
    """
    padded = torch.tensor([*gaussian_kernel(sigma, taps), 0.0], dtype=x.dtype)
    height, width = x.shape[-2:]
    across = padded[_band_index(width, taps)]  # [W, W]: out[.., i] = sum_j x[.., j] k[j - i + r]
    down = across if height == width else padded[_band_index(height, taps)]
    return torch.matmul(down, torch.matmul(x, across))


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """x where x < threshold, else 1 - x (official ``_solarize_single_image``)."""
    return torch.where(x < threshold, x, 1.0 - x)


def apply_view(x: torch.Tensor, params: ViewParams, spec: ViewSpec) -> torch.Tensor:
    """Everything after the crop, in the official order: flip, colour, blur, solarize, clip (then the
    inversion, where ``spec.invert_p`` > 0; not in the official code).

    ``x`` is [3, H, W] float in [0, 1]; returns [3, H, W] in [0, 1], not normalised. A jitter op whose
    strength in ``spec`` is 0 is skipped, as the official ``if brightness > 0`` guards do.
    """
    # Every op returns a new tensor, so the clips can be in place once one has run; until then x is
    # the caller's tensor, which is never modified.
    fresh = params.flip
    if params.flip:
        x = x.flip(-1)
    if params.jitter:
        for op in params.jitter_order:
            if op == BRIGHTNESS and spec.brightness > 0:
                x = adjust_brightness(x, params.brightness_delta)
            elif op == CONTRAST and spec.contrast > 0:
                x = adjust_contrast(x, params.contrast_factor)
            elif op == SATURATION and spec.saturation > 0:
                x = adjust_saturation(x, params.saturation_factor)
            elif op == HUE and spec.hue > 0:
                x = adjust_hue(x, params.hue_delta)
            else:
                continue
            x, fresh = x.clamp_(0.0, 1.0), True  # the official clip after each jitter op
    if params.gray:
        x, fresh = to_grayscale(x), True
    x = x.clamp_(0.0, 1.0) if fresh else x.clamp(0.0, 1.0)  # end of the official colour transform
    if params.blur:
        x = gaussian_blur(x, params.sigma, blur_taps(x.shape[-1]))
    if params.solarize:
        x = solarize(x, spec.solarize_threshold)
    x = x.clamp_(0.0, 1.0)
    return x.neg_().add_(1.0) if params.invert else x


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - ImageNet mean) / ImageNet std per channel; applied after augmentation (BYOL.md)."""
    return (x - _MEAN.to(x.dtype)).div_(_STD.to(x.dtype))


class TwoViewTransform:
    """PIL image + seed -> the two normalised BYOL views, [3, size, size] float32 each; ``resize`` is
    ``data.resize`` (``crop_resize``).

    The seed alone decides both views: a fresh ``torch.Generator`` seeded with it draws view 1's
    parameters, then view 2's, so the same seed gives bitwise identical views in any process (checked
    with 1, 2 and 4 intra-op threads at 32 and 224 px).
    """

    def __init__(self, size: int, view1: ViewSpec = VIEW1, view2: ViewSpec = VIEW2, resize: str = "pil") -> None:
        if size < 1:
            raise ValueError(f"crop size must be a positive number of pixels, got {size}")
        if resize not in RESIZES:
            raise ValueError(f"resize {resize!r}: use one of {', '.join(RESIZES)}")
        self.size, self.view1, self.view2, self.resize = size, view1, view2, resize

    def params(self, height: int, width: int, seed: int) -> tuple[ViewParams, ViewParams]:
        """The decisions ``__call__`` makes for a ``height`` x ``width`` image and this seed."""
        gen = torch.Generator().manual_seed(seed)
        return (sample_view_params(gen, height, width, self.view1),
                sample_view_params(gen, height, width, self.view2))

    def __call__(self, img: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        width, height = img.size
        p1, p2 = self.params(height, width, seed)
        # Inference mode skips the autograd bookkeeping of ~200 small operators (~10% at 32 px). The
        # normalisation runs outside it, so the views returned are ordinary tensors (an inference
        # tensor could not be saved for backward by a model that takes it directly).
        with torch.inference_mode():
            x1 = apply_view(crop_resize(img, p1, self.size, self.resize), p1, self.view1)
            x2 = apply_view(crop_resize(img, p2, self.size, self.resize), p2, self.view2)
        return normalize(x1).contiguous(), normalize(x2).contiguous()
