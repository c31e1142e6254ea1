"""The BYOL loss against the hand-written formula 2 - 2 cos, summed over the two directions."""

from __future__ import annotations

import pytest
import torch

from fastbyol.step.loss import byol_loss, l2_normalize, projection_std, regression_loss


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a64, b64 = a.double(), b.double()
    return (a64 * b64).sum(-1) / (a64.norm(dim=-1) * b64.norm(dim=-1))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 256), (5, 4096)])
def test_regression_loss_is_two_minus_two_cos(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    p, z = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) + 0.5
    expected = 2 - 2 * _cos(p, z)
    torch.testing.assert_close(regression_loss(p, z).double(), expected, atol=1e-5, rtol=1e-5)


def test_symmetric_loss_sums_directions_and_averages_batch() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(16, 32, generator=g) for _ in range(4))
    expected = ((2 - 2 * _cos(p1, z2)) + (2 - 2 * _cos(p2, z1))).mean()
    torch.testing.assert_close(byol_loss(p1, p2, z1, z2).double(), expected, atol=1e-6, rtol=1e-6)
    # Summed, not averaged: identical predictions and targets give 0, opposite ones give 2 * 4 = 8.
    assert float(byol_loss(p1, p2, p2, p1)) == pytest.approx(0.0, abs=1e-6)
    assert float(byol_loss(p1, p2, -p2, -p1)) == pytest.approx(8.0, abs=1e-5)


def test_loss_gradient_reaches_predictions_only() -> None:
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(8, 16, generator=g, requires_grad=True) for _ in range(4))
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None
    # Analytic gradient of 2 - 2 p.z/(|p||z|) wrt p, averaged over the batch (B = 8).
    pd, zd = p1.detach().double(), z2.detach().double()
    pn, zn = pd.norm(dim=-1, keepdim=True), zd.norm(dim=-1, keepdim=True)
    cos = (pd * zd).sum(-1, keepdim=True) / (pn * zn)
    grad = -2 * (zd / (pn * zn) - cos * pd / pn**2) / 8
    torch.testing.assert_close(p1.grad.double(), grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    p, z = torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)
    out = regression_loss(p.to(dtype), z.to(dtype))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, regression_loss(p.to(dtype).float(), z.to(dtype).float()))


def test_l2_normalize_of_zero_is_zero_not_nan() -> None:
    x = torch.zeros(2, 5)
    assert torch.equal(l2_normalize(x), x)


def test_projection_std_detects_collapse() -> None:
    collapsed = torch.randn(1, 64).expand(128, 64)
    assert float(projection_std(collapsed)) == pytest.approx(0.0, abs=1e-6)
    spread = torch.randn(4096, 64, generator=torch.Generator().manual_seed(3))
    assert float(projection_std(spread)) == pytest.approx(1 / 64**0.5, rel=0.05)
