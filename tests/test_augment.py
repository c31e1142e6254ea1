"""BYOL view augmentations against the official code (deepmind-research/byol, utils/augmentations.py):
the sampled probabilities and ranges of each view, each op against a hand-written formula, and the
two-view transform's contract (shapes, normalisation, determinism by seed)."""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
import math
import typing
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fastbyol.config import DataConfig
from fastbyol.config_checks import literal_values
from fastbyol.data import augment as A
from fastbyol.data.augment import VIEW1, VIEW2, ViewParams, ViewSpec, sample_view_params

N = 20_000  # draws per view for the statistics
SIGMAS = 5.0  # tolerance of every frequency check, in binomial standard deviations


def _within_sigmas(count: int, n: int, p: float) -> bool:
    if p in (0.0, 1.0):
        return count == round(n * p)
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


def _draws(spec: ViewSpec, height: int, width: int, n: int = N, seed: int = 0) -> list[ViewParams]:
    gen = torch.Generator().manual_seed(seed)
    return [sample_view_params(gen, height, width, spec) for _ in range(n)]


@pytest.fixture(scope="module", params=[("view1", VIEW1), ("view2", VIEW2)], ids=["view1", "view2"])
def view_draws(request: pytest.FixtureRequest) -> tuple[ViewSpec, list[ViewParams]]:
    _, spec = request.param
    return spec, _draws(spec, 1000, 1000)


# --- sampling -------------------------------------------------------------------------------------

def test_official_view_specs() -> None:
    # augment_config of the official code; BYOL.md "Augmentations".
    def probabilities(s: ViewSpec) -> tuple[float, ...]:
        return s.flip_p, s.jitter_p, s.gray_p, s.blur_p, s.solarize_p

    assert probabilities(VIEW1) == (0.5, 0.8, 0.2, 1.0, 0.0)
    assert probabilities(VIEW2) == (0.5, 0.8, 0.2, 0.1, 0.2)
    for spec in (VIEW1, VIEW2):
        assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == (0.4, 0.4, 0.2, 0.1)
        assert (spec.sigma_min, spec.sigma_max, spec.area_min, spec.area_max) == (0.1, 2.0, 0.08, 1.0)
        assert (spec.ratio_min, spec.ratio_max, spec.solarize_threshold) == (3 / 4, 4 / 3, 0.5)


@pytest.mark.parametrize("field", ["flip", "jitter", "gray", "blur", "solarize"])
def test_probabilities_match_the_spec(view_draws: tuple[ViewSpec, list[ViewParams]], field: str) -> None:
    spec, draws = view_draws
    p = getattr(spec, f"{field}_p")
    count = sum(getattr(d, field) for d in draws)
    assert _within_sigmas(count, len(draws), p), f"{field}: {count}/{len(draws)} vs p={p}"


def test_crop_area_and_aspect(view_draws: tuple[ViewSpec, list[ViewParams]]) -> None:
    _, draws = view_draws
    height = width = 1000
    frac = np.array([d.crop[2] * d.crop[3] / (height * width) for d in draws])
    log_aspect = np.array([math.log(d.crop[3] / d.crop[2]) for d in draws])
    for d in draws:
        top, left, h, w = d.crop
        assert 1 <= h <= height and 1 <= w <= width and 0 <= top <= height - h and 0 <= left <= width - w
    # Rounding the sides moves the area by < (w + h + 1) / (H W) < 0.003 here.
    assert frac.min() >= 0.08 - 0.003 and frac.max() <= 1.0
    assert frac.min() < 0.085 and frac.max() > 0.95
    # Below area 0.5 no side can be clamped (area * aspect < 2/3 < 1): there the area is U[0.08, 1].
    small = frac < 0.5
    assert _within_sigmas(int(small.sum()), len(draws), (0.5 - 0.08) / 0.92)
    # ... and the aspect log-uniform on [log 3/4, log 4/3] (sides >= 240 px: rounding < 0.005).
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert log_aspect[small].min() >= lo - 0.005 and log_aspect[small].max() <= hi + 0.005
    assert log_aspect[small].min() < lo + 0.01 and log_aspect[small].max() > hi - 0.01
    assert _within_sigmas(int((log_aspect[small] < 0).sum()), int(small.sum()), 0.5)
    quarter = lo + (hi - lo) / 4
    assert _within_sigmas(int((log_aspect[small] < quarter).sum()), int(small.sum()), 0.25)


def test_crop_clamps_to_the_image_with_one_attempt() -> None:
    # Large areas at extreme aspects overflow a side: the official crop clamps it (no retry loop),
    # so full-width or full-height crops are frequent.
    draws = _draws(VIEW1, 1000, 1000, n=4000)
    full_w = sum(d.crop[3] == 1000 for d in draws)
    full_h = sum(d.crop[2] == 1000 for d in draws)
    assert full_w > 100 and full_h > 100
    for height, width in [(7, 300), (300, 7), (1, 1), (2, 3), (375, 500), (4000, 30)]:
        for d in _draws(VIEW2, height, width, n=500, seed=height * width):
            top, left, h, w = d.crop
            assert 1 <= h <= height and 1 <= w <= width, (height, width, d.crop)
            assert 0 <= top <= height - h and 0 <= left <= width - w, (height, width, d.crop)


def test_crop_offsets_are_uniform() -> None:
    draws = _draws(VIEW1, 1000, 800, n=N)
    top_rel = [d.crop[0] / (1000 - d.crop[2]) for d in draws if d.crop[2] < 900]
    left_rel = [d.crop[1] / (800 - d.crop[3]) for d in draws if d.crop[3] < 700]
    for rel in (top_rel, left_rel):
        assert _within_sigmas(sum(r < 0.5 for r in rel), len(rel), 0.5)
        assert min(rel) < 0.01 and max(rel) > 0.99


def test_sigma_and_jitter_strength_ranges(view_draws: tuple[ViewSpec, list[ViewParams]]) -> None:
    _, draws = view_draws
    for field, lo, hi in [("sigma", 0.1, 2.0), ("brightness_delta", -0.4, 0.4), ("contrast_factor", 0.6, 1.4),
                          ("saturation_factor", 0.8, 1.2), ("hue_delta", -0.1, 0.1)]:
        values = np.array([getattr(d, field) for d in draws])
        span = hi - lo
        assert values.min() >= lo and values.max() <= hi, field
        assert values.min() < lo + 0.01 * span and values.max() > hi - 0.01 * span, field
        # Uniform: mean in the middle, within 5 standard errors (std of U[lo, hi] = span / sqrt 12).
        assert abs(values.mean() - (lo + hi) / 2) < SIGMAS * span / math.sqrt(12 * len(values)), field


def test_jitter_order_is_a_uniform_permutation(view_draws: tuple[ViewSpec, list[ViewParams]]) -> None:
    _, draws = view_draws
    orders = [d.jitter_order for d in draws]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    first = Counter(o[0] for o in orders)
    for op in range(4):
        assert _within_sigmas(first[op], len(orders), 0.25), first
    perms = Counter(orders)
    assert set(perms) == set(itertools.permutations(range(4)))
    for count in perms.values():
        assert _within_sigmas(count, len(orders), 1 / 24), perms


def test_sampling_is_deterministic_and_uses_only_the_generator() -> None:
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    a = _draws(VIEW2, 375, 500, n=50, seed=7)
    b = _draws(VIEW2, 375, 500, n=50, seed=7)
    c = _draws(VIEW2, 375, 500, n=50, seed=8)
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) == 50
    assert torch.equal(torch.get_rng_state(), global_state)


def test_number_of_draws_is_fixed() -> None:
    # Whatever the spec and the outcome, one view consumes the same amount of the generator.
    never = ViewSpec(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0, brightness=0.0)
    states = []
    for spec, (height, width) in [(VIEW1, (375, 500)), (never, (10, 10)), (VIEW2, (1, 1))]:
        gen = torch.Generator().manual_seed(3)
        for _ in range(10):
            sample_view_params(gen, height, width, spec)
        states.append(gen.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_inversion_is_drawn_only_when_asked_and_inverts_the_finished_view() -> None:
    # data.invert_p=0 (the spec) leaves the official stream alone: same draws, same decisions, no inversion.
    plain, inverting = (A.TwoViewTransform(32, *A.view_pair("byol", "strong", 0.3, p)) for p in (0.0, 0.5))
    assert not any(p.invert for s in range(200) for p in plain.params(32, 32, s))
    assert plain.params(32, 32, 3) == A.TwoViewTransform(32, *A.view_pair("byol", "strong", 0.3)).params(32, 32, 3)
    # At 0.5 each view inverts independently, half the time; the rest of its decisions are the plain ones.
    pairs = [inverting.params(32, 32, s) for s in range(4000)]
    assert _within_sigmas(sum(p1.invert for p1, _ in pairs), len(pairs), 0.5)
    assert _within_sigmas(sum(p1.invert and p2.invert for p1, p2 in pairs), len(pairs), 0.25)
    p1 = inverting.params(32, 32, 9)[0]
    assert dataclasses.replace(p1, invert=False) == plain.params(32, 32, 9)[0]
    # An inverted view is 1 - the view it would have been, after every other op and the clip.
    x = torch.rand(3, 32, 32) * 1.4 - 0.2
    spec = A.view_pair("byol", "strong", 0.3, 0.5)[1]
    for p in (p1, dataclasses.replace(p1, solarize=True, gray=True)):
        want = 1 - A.apply_view(x, dataclasses.replace(p, invert=False), spec)
        torch.testing.assert_close(A.apply_view(x, dataclasses.replace(p, invert=True), spec), want)
    from fastbyol.config_checks import ConfigError
    from fastbyol.config_parse import build_config
    with pytest.raises(ConfigError, match="data.invert_p=1.5 is out of range"):
        build_config("shapes", overrides=["data.invert_p=1.5"])


def test_transform_params_same_seed_same_and_views_independent() -> None:
    transform = A.TwoViewTransform(32)
    assert transform.params(375, 500, seed=11) == transform.params(375, 500, seed=11)
    assert transform.params(375, 500, seed=11) != transform.params(375, 500, seed=12)
    pairs = [transform.params(375, 500, seed=s) for s in range(5000)]
    n = len(pairs)
    assert sum(p1 == p2 for p1, p2 in pairs) == 0
    # Joint frequencies factorise, and continuous draws are uncorrelated across the two views.
    assert _within_sigmas(sum(p1.flip and p2.flip for p1, p2 in pairs), n, 0.25)
    assert _within_sigmas(sum(p1.jitter and p2.jitter for p1, p2 in pairs), n, 0.64)
    assert _within_sigmas(sum(p1.jitter_order == p2.jitter_order for p1, p2 in pairs), n, 1 / 24)
    def area(p: ViewParams) -> float:
        return p.crop[2] * p.crop[3]

    for name, value in [("sigma", lambda p: p.sigma), ("hue_delta", lambda p: p.hue_delta), ("area", area)]:
        r = np.corrcoef([value(p1) for p1, _ in pairs], [value(p2) for _, p2 in pairs])[0, 1]
        assert abs(r) < SIGMAS / math.sqrt(n), (name, r)
    # And each view follows its own spec: view 2 solarizes, view 1 never does.
    assert not any(p1.solarize for p1, _ in pairs)
    assert _within_sigmas(sum(p2.solarize for _, p2 in pairs), n, 0.2)


# --- ops against hand-written formulas --------------------------------------------------------------

def _rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_brightness_is_additive() -> None:
    x = _rand((3, 17, 23), 0)
    for delta in (-0.37, 0.05, 0.4):
        assert torch.equal(A.adjust_brightness(x, delta), x + delta)


def test_contrast_uses_each_channels_mean() -> None:
    x = _rand((3, 17, 23), 1)
    x[1] *= 0.3  # channels with clearly different means
    ref = x.double().numpy().copy()
    for factor in (0.6, 1.37):
        out = A.adjust_contrast(x, factor).double().numpy()
        for c in range(3):
            m = ref[c].mean()
            np.testing.assert_allclose(out[c], factor * (ref[c] - m) + m, atol=1e-6)


def test_grayscale_weights() -> None:
    x = _rand((3, 9, 11), 2)
    r, g, b = x.double().numpy()
    gray = 0.2989 * r + 0.5870 * g + 0.1140 * b
    out = A.to_grayscale(x)
    assert out.shape == (3, 9, 11)
    for c in range(3):
        np.testing.assert_allclose(out[c].double().numpy(), gray, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_threshold(threshold: float) -> None:
    x = _rand((3, 13, 13), 3)
    x[0, 0, 0] = threshold  # at the threshold: inverted (official: x < t keeps x)
    out = A.solarize(x, threshold)
    ref = np.where(x.numpy() < threshold, x.numpy(), 1 - x.numpy())
    np.testing.assert_array_equal(out.numpy(), ref)
    assert out[0, 0, 0] == pytest.approx(1 - threshold)


@pytest.mark.parametrize("size,taps", [(32, 3), (64, 7), (96, 9), (224, 23), (16, 1), (100, 11)])
def test_blur_taps(size: int, taps: int) -> None:
    assert A.blur_taps(size) == taps


def _gaussian(sigma: float, taps: int) -> np.ndarray:
    k = np.arange(taps) - taps // 2
    g = np.exp(-(k ** 2) / (2 * sigma ** 2))
    return g / g.sum()


@pytest.mark.parametrize("sigma,taps", [(0.1, 3), (1.0, 7), (2.0, 23), (1.3, 9)])
def test_blurred_impulse_is_the_normalised_gaussian(sigma: float, taps: int) -> None:
    x = torch.zeros(3, 31, 31)
    x[1, 15, 15] = 1.0
    out = A.gaussian_blur(x, sigma, taps).double().numpy()
    k, r = _gaussian(sigma, taps), taps // 2
    expected = np.zeros((31, 31))
    expected[15 - r:16 + r, 15 - r:16 + r] = np.outer(k, k)
    np.testing.assert_allclose(out[1], expected, atol=1e-7)
    assert np.abs(out[[0, 2]]).max() == 0  # depthwise: no leak between channels


def test_blur_pads_with_zeros() -> None:
    sigma, taps = 1.5, 9
    k, r = _gaussian(sigma, taps), taps // 2
    out = A.gaussian_blur(torch.ones(3, 20, 27), sigma, taps).double().numpy()
    inside = k[r:].sum()  # taps that land inside the image at a border
    assert out[0, 0, 0] == pytest.approx(inside * inside, abs=1e-6)
    assert out[2, 0, 13] == pytest.approx(inside, abs=1e-6)
    assert out[1, 10, 13] == pytest.approx(1.0, abs=1e-6)


def test_blur_matches_a_zero_padded_2d_convolution() -> None:
    x = _rand((3, 20, 27), 4)  # not square: both band matrices
    sigma, taps = 0.8, 7
    k, r = _gaussian(sigma, taps), taps // 2
    padded = np.pad(x.double().numpy(), ((0, 0), (r, r), (r, r)))
    ref = np.zeros((3, 20, 27))
    for i in range(taps):
        for j in range(taps):
            ref += k[i] * k[j] * padded[:, i:i + 20, j:j + 27]
    np.testing.assert_allclose(A.gaussian_blur(x, sigma, taps).double().numpy(), ref, atol=1e-6)


# The official rgb_to_hsv / hsv_to_rgb, transcribed line by line (where-chains and all).
def _tf_rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x
    v = torch.maximum(torch.maximum(r, g), b)
    range_ = v - torch.minimum(torch.minimum(r, g), b)
    sat = torch.where(v > 0, range_ / v, 0.0)
    norm = torch.where(range_ != 0, 1.0 / (6.0 * range_), 1e9)
    hr = norm * (g - b)
    hg = norm * (b - r) + 2.0 / 6.0
    hb = norm * (r - g) + 4.0 / 6.0
    hue = torch.where(r == v, hr, torch.where(g == v, hg, hb))
    hue = hue * (range_ > 0)
    hue = hue + (hue < 0)
    return torch.stack((hue, sat, v))


def _tf_hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv
    c = s * v
    m = v - c
    dh = (h % 1.0) * 6.0
    fmodu = dh % 2.0
    x = c * (1 - torch.abs(fmodu - 1))
    hcat = torch.floor(dh).to(torch.int32)
    rr = torch.where((hcat == 0) | (hcat == 5), c, torch.where((hcat == 1) | (hcat == 4), x, 0.0)) + m
    gg = torch.where((hcat == 1) | (hcat == 2), c, torch.where((hcat == 0) | (hcat == 3), x, 0.0)) + m
    bb = torch.where((hcat == 3) | (hcat == 4), c, torch.where((hcat == 2) | (hcat == 5), x, 0.0)) + m
    return torch.stack((rr, gg, bb))


def _colour_test_image(seed: int) -> torch.Tensor:
    x = _rand((3, 24, 40), seed)
    x[:, :4] = (x[:, :4] * 4).round() / 4  # ties between channels: the r > g > b precedence
    x[:, 4:6] = x[0:1, 4:6]  # grays (range 0)
    x[:, 6, :3] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]).T
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hsv_matches_the_official_formulas(seed: int) -> None:
    x = _colour_test_image(seed)
    assert torch.equal(A.rgb_to_hsv(x), _tf_rgb_to_hsv(x))
    hsv = _rand((3, 24, 40), seed + 10)
    hsv[0] = hsv[0] * 3 - 1  # hues outside [0, 1) wrap
    hsv[0, 0, :6] = torch.tensor([-1e-9, 1.0, 0.0, 5 / 6, 1 / 6, 2.0])  # edges, incl. h % 1 -> 1.0
    assert torch.equal(A.hsv_to_rgb(hsv), _tf_hsv_to_rgb(hsv))


def test_hsv_round_trip_and_colorsys() -> None:
    x = _colour_test_image(5)
    hsv = A.rgb_to_hsv(x)
    assert torch.allclose(A.hsv_to_rgb(hsv), x, atol=1e-5, rtol=0)
    for i, j in [(0, 0), (3, 7), (10, 20), (23, 39), (5, 5)]:
        ref = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
        assert hsv[:, i, j].tolist() == pytest.approx(ref, abs=1e-6)


def test_known_hue_shift_and_zero_saturation() -> None:
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 4, 4).clone()
    assert torch.allclose(A.adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=1e-6)
    assert torch.allclose(A.adjust_hue(red, -1 / 3), torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), atol=1e-6)
    x = _rand((3, 10, 12), 6)
    gray = A.adjust_saturation(x, 0.0)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(gray[0], x.amax(dim=0))  # s = 0 leaves v = max(r, g, b) in every channel


@pytest.mark.parametrize("factor", [0.0, 0.8, 1.2, 5.0])
def test_saturation_is_the_official_hsv_op(factor: float) -> None:
    x = _colour_test_image(7)
    hsv = _tf_rgb_to_hsv(x)
    hsv[1] = (hsv[1] * factor).clamp(0.0, 1.0)
    assert torch.equal(A.adjust_saturation(x, factor), _tf_hsv_to_rgb(hsv))


@pytest.mark.parametrize("delta", [-0.1, 0.03, 0.1, 0.5])
def test_hue_is_the_official_hsv_op(delta: float) -> None:
    x = _colour_test_image(8)
    hsv = _tf_rgb_to_hsv(x)
    hsv[0] = (hsv[0] + delta) % 1.0
    assert torch.equal(A.adjust_hue(x, delta), _tf_hsv_to_rgb(hsv))


def test_normalize() -> None:
    x = _rand((3, 5, 6), 9)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert A.IMAGENET_MEAN == (0.485, 0.456, 0.406) and A.IMAGENET_STD == (0.229, 0.224, 0.225)
    assert torch.allclose(A.normalize(x), (x - mean) / std, atol=1e-6)


# --- apply_view -------------------------------------------------------------------------------------

def _plain(**changes: object) -> ViewParams:
    """Params that do nothing, with ``changes`` applied."""
    base = ViewParams(crop=(0, 0, 1, 1), flip=False, jitter=False, jitter_order=(0, 1, 2, 3),
                      brightness_delta=0.2, contrast_factor=1.3, saturation_factor=0.85, hue_delta=0.07,
                      gray=False, blur=False, sigma=1.1, solarize=False)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_apply_view_does_only_what_is_flagged() -> None:
    x = _rand((3, 32, 32), 10)
    before = x.clone()
    assert torch.equal(A.apply_view(x, _plain(), VIEW2), x)
    assert torch.equal(A.apply_view(x, _plain(flip=True), VIEW2), x.flip(-1))
    assert not torch.equal(A.apply_view(x, _plain(flip=True), VIEW2), x)
    assert torch.equal(A.apply_view(x, _plain(solarize=True), VIEW2), A.solarize(x, 0.5))
    assert torch.equal(A.apply_view(x, _plain(gray=True), VIEW2), A.to_grayscale(x).clamp(0, 1))
    assert torch.equal(A.apply_view(x, _plain(blur=True), VIEW2), A.gaussian_blur(x, 1.1, 3).clamp(0, 1))
    assert torch.equal(x, before)  # the input is never modified in place


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_apply_view_jitter_in_order_with_clips(order: tuple[int, ...]) -> None:
    x = _rand((3, 32, 32), 11)
    p = _plain(jitter=True, jitter_order=order)
    ops = {0: lambda t: A.adjust_brightness(t, p.brightness_delta),
           1: lambda t: A.adjust_contrast(t, p.contrast_factor),
           2: lambda t: A.adjust_saturation(t, p.saturation_factor),
           3: lambda t: A.adjust_hue(t, p.hue_delta)}
    expected = x
    for op in order:
        expected = ops[op](expected).clamp(0.0, 1.0)
    assert torch.equal(A.apply_view(x, p, VIEW1), expected)
    # Then grayscale after the jitter, then blur, then solarize: the official order.
    p = dataclasses.replace(p, gray=True, blur=True, solarize=True)
    expected = A.solarize(A.gaussian_blur(A.to_grayscale(expected).clamp(0, 1), 1.1, 3)).clamp(0, 1)
    assert torch.allclose(A.apply_view(x, p, VIEW2), expected, atol=1e-6)


def test_apply_view_order_matters_and_zero_strength_skips() -> None:
    x = _rand((3, 32, 32), 12)
    a = A.apply_view(x, _plain(jitter=True, jitter_order=(0, 1, 2, 3)), VIEW1)
    b = A.apply_view(x, _plain(jitter=True, jitter_order=(1, 0, 3, 2)), VIEW1)
    assert not torch.allclose(a, b, atol=1e-4)
    # A strength of 0 in the spec skips that op (the official `if brightness > 0`).
    no_brightness = dataclasses.replace(VIEW1, brightness=0.0, contrast=0.0, saturation=0.0)
    only_hue = A.apply_view(x, _plain(jitter=True), no_brightness)
    assert torch.equal(only_hue, A.adjust_hue(x, 0.07).clamp(0, 1))


def test_apply_view_output_in_unit_range() -> None:
    gen = torch.Generator().manual_seed(13)
    for i in range(100):
        x = _rand((3, 32, 32), 100 + i)
        if i % 10 == 0:
            x = (x * 3 - 1).clamp(0, 1)  # saturated regions
        spec = VIEW1 if i % 2 else VIEW2
        out = A.apply_view(x, sample_view_params(gen, 32, 32, spec), spec)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0


# --- crop and the two-view transform ---------------------------------------------------------------

def _photo(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.random((height // 8 + 1, width // 8 + 1, 3))
    big = np.kron(smooth, np.ones((8, 8, 1)))[:height, :width]
    return Image.fromarray((big * 200 + rng.random((height, width, 3)) * 55).astype(np.uint8))


def test_crop_resize_takes_the_box() -> None:
    arr = np.zeros((60, 80, 3), np.uint8)
    arr[:, 40:] = 255  # right half white
    img = Image.fromarray(arr)
    right = A.crop_resize(img, _plain(crop=(10, 45, 40, 30)), 24)
    left = A.crop_resize(img, _plain(crop=(0, 0, 60, 35)), 24)
    assert right.shape == (3, 24, 24) and right.dtype == torch.float32 and right.is_contiguous()
    assert torch.equal(right, torch.ones_like(right)) and torch.equal(left, torch.zeros_like(left))
    photo = _photo(60, 80, 0)
    ref = np.asarray(photo.crop((45, 10, 75, 50)).resize((24, 24), Image.Resampling.BICUBIC)) / 255
    out = A.crop_resize(photo, _plain(crop=(10, 45, 40, 30)), 24)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_pil_resize_is_unchanged() -> None:
    """data.resize=pil (the default) is PIL's bicubic on the uint8 crop, then /255."""
    photo = _photo(70, 60, 3)
    for crop in ((5, 7, 57, 43), (0, 0, 13, 9), (3, 4, 32, 32)):
        top, left, height, width = crop
        ref = np.array(photo.crop((left, top, left + width, top + height)).resize((32, 32), Image.Resampling.BICUBIC))
        for out in (A.crop_resize(photo, _plain(crop=crop), 32), A.crop_resize(photo, _plain(crop=crop), 32, "pil")):
            assert torch.equal(out, torch.from_numpy(ref).permute(2, 0, 1).float().div(255.0))


# --- data.resize=official: TF's tf.image.resize(BICUBIC), antialias=False -------------------------------

def _tf_keys_weights(in_size: int, out_size: int, out: int) -> tuple[list[int], list[float]]:
    """The four taps and weights of output ``out`` in TF's resize_bicubic with half_pixel_centers=True
    (tensorflow/core/kernels/image/resize_bicubic_op.cc), in float64 from its description: the source
    coordinate in float32, Keys' cubic (A = -0.5) read at the offset rounded to 1/1024, taps outside the
    input weighted 0 and the rest renormalised to sum 1."""
    a = -0.5
    scale = np.float32(in_size) / np.float32(out_size)
    in_f = (np.float32(out) + np.float32(0.5)) * scale - np.float32(0.5)
    loc = math.floor(in_f)
    offset = round((float(in_f) - loc) * 1024)  # half to even, as lrintf

    def near(i: int) -> float:  # |t| <= 1, t = i / 1024
        t = i / 1024
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(i: int) -> float:  # 1 <= |t| <= 2, t = 1 + i / 1024
        t = 1 + i / 1024
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    taps = [loc - 1, loc, loc + 1, loc + 2]
    weights = [far(offset), near(offset), near(1024 - offset), far(1024 - offset)]
    weights = [w if 0 <= t < in_size else 0.0 for t, w in zip(taps, weights)]
    total = sum(weights)
    return taps, [w / total for w in weights]


def tf_resize_reference(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C] float64: every output pixel as the sum of its 4 x 4 taps, a plain loop."""
    height, width = pixels.shape[:2]
    out = np.zeros((size, size, pixels.shape[2]))
    for i in range(size):
        rows, row_weights = _tf_keys_weights(height, size, i)
        for j in range(size):
            cols, col_weights = _tf_keys_weights(width, size, j)
            for r, wr in zip(rows, row_weights):
                for c, wc in zip(cols, col_weights):
                    if wr and wc:
                        out[i, j] += wr * wc * pixels[r, c].astype(np.float64)
    return out


# (crop, view size): downscale, upscale, same size, non-square both ways, odd sizes
OFFICIAL_CASES = [((5, 7, 57, 43), 32), ((0, 0, 13, 9), 32), ((3, 4, 32, 32), 32), ((10, 2, 40, 58), 24),
                  ((1, 1, 31, 7), 17)]


@pytest.mark.parametrize("crop,size", OFFICIAL_CASES)
def test_official_resize_is_tfs_formula(crop: tuple[int, int, int, int], size: int) -> None:
    """Within float32 rounding of the formula (1e-4 of 0..255; measured <= 6.3e-5), overshoots past 0 and 255
    kept, then crop_resize's clip(x / 255, 0, 1). The table's 1/1024 rounding of the offset shows at this
    tolerance: without it the reference moves by 0.085 (40 x 58 -> 24) and 0.033 (31 x 7 -> 17); the other
    cases' offsets are multiples of 1/64, which the table holds exactly."""
    photo = _photo(70, 60, 4)
    top, left, height, width = crop
    pixels = np.asarray(photo)[top:top + height, left:left + width]
    want = tf_resize_reference(pixels, size)
    got = A.resize_official(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().contiguous(), size)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, atol=1e-4, rtol=0)
    view = A.crop_resize(photo, _plain(crop=crop), size, "official")
    assert view.shape == (3, size, size) and view.is_contiguous()
    np.testing.assert_allclose(view.permute(1, 2, 0).numpy(), np.clip(want / 255, 0, 1), atol=1e-6, rtol=0)


def test_official_resize_same_size_is_the_identity_and_overshoots_are_kept() -> None:
    x = torch.from_numpy(np.asarray(_photo(32, 32, 5)).copy()).permute(2, 0, 1).float().contiguous()
    assert torch.equal(A.resize_official(x, 32), x)
    step = torch.zeros(3, 20, 20)
    step[:, :, 10:] = 255.0  # a hard edge: the cubic rings past both ends (TF does not clip)
    out = A.resize_official(step, 32)
    assert float(out.min()) < -1.0 and float(out.max()) > 256.0
    index, weight = A.official_resize_taps(20, 32)
    np.testing.assert_allclose(weight.sum(axis=0), 1.0, atol=1e-6)  # renormalised at the borders too
    assert index.min() >= 0 and index.max() <= 19 and not weight.flags.writeable


def test_official_resize_is_not_antialiased() -> None:
    """Shrinking a one-pixel checkerboard 3.75x: PIL's antialiased filter averages it to grey, TF's 4-tap
    bicubic samples it and keeps much of the contrast as a beat pattern (aliasing; measured std 0.002 and
    0.24)."""
    board = np.indices((120, 120)).sum(axis=0) % 2 * 255
    photo = Image.fromarray(np.repeat(board[:, :, None], 3, axis=2).astype(np.uint8))
    crop = _plain(crop=(0, 0, 120, 120))
    pil, official = A.crop_resize(photo, crop, 32, "pil"), A.crop_resize(photo, crop, 32, "official")
    assert float(pil.std()) < 0.05 < 0.2 < float(official.std())


def test_transform_threads_the_resize() -> None:
    img = _photo(60, 50, 6)
    official, pil = A.TwoViewTransform(24, resize="official"), A.TwoViewTransform(24)
    assert pil.resize == "pil"
    p1, p2 = official.params(60, 50, seed=3)
    v1, v2 = official(img, seed=3)
    assert torch.equal(v1, A.normalize(A.apply_view(A.crop_resize(img, p1, 24, "official"), p1, VIEW1)))
    assert torch.equal(v2, A.normalize(A.apply_view(A.crop_resize(img, p2, 24, "official"), p2, VIEW2)))
    assert not torch.equal(v1, pil(img, seed=3)[0])
    with pytest.raises(ValueError, match="official, pil"):
        A.TwoViewTransform(24, resize="lanczos")
    with pytest.raises(ValueError, match="official, pil"):
        A.crop_resize(img, p1, 24, "tf")
    assert A.RESIZES == literal_values(typing.get_type_hints(DataConfig)["resize"])  # data.resize's choices


@pytest.mark.parametrize("size,src", [(32, (64, 64)), (16, (30, 50)), (64, (375, 500))])
def test_two_view_transform_contract(size: int, src: tuple[int, int]) -> None:
    img = _photo(*src, seed=size)
    transform = A.TwoViewTransform(size)
    v1, v2 = transform(img, seed=5)
    mean = torch.tensor(A.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(A.IMAGENET_STD).view(3, 1, 1)
    for v in (v1, v2):
        assert v.shape == (3, size, size) and v.dtype == torch.float32 and v.is_contiguous()
        assert not v.is_inference() and not v.requires_grad
        pixels = v * std + mean
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    a1, a2 = transform(img, seed=5)
    assert torch.equal(v1, a1) and torch.equal(v2, a2)
    b1, b2 = transform(img, seed=6)
    assert not torch.equal(v1, b1) and not torch.equal(v2, b2)
    # The views are exactly those of the decisions params() reports for the seed.
    p1, p2 = transform.params(src[0], src[1], seed=5)
    assert torch.equal(v1, A.normalize(A.apply_view(A.crop_resize(img, p1, size), p1, VIEW1)))
    assert torch.equal(v2, A.normalize(A.apply_view(A.crop_resize(img, p2, size), p2, VIEW2)))


def test_two_view_transform_accepts_non_rgb_images() -> None:
    gray = _photo(40, 40, 1).convert("L")
    v1, v2 = A.TwoViewTransform(32)(gray, seed=0)
    assert v1.shape == v2.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="positive"):
        A.TwoViewTransform(0)
