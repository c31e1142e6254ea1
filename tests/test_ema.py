"""The target EMA against its rule xi = tau * xi + (1 - tau) * theta, once per optimizer step."""

from __future__ import annotations

import pytest
import torch

from fastbyol.step.ema import ema_ref, ema_update_

SHAPES = [(1,), (3, 5), (64, 3, 3, 3), (257,), (7, 1, 1)]


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.996, 1.0])
def test_multi_tensor_update_matches_rule(tau: float) -> None:
    g = torch.Generator().manual_seed(7)
    target = [torch.randn(s, generator=g) for s in SHAPES]
    online = [torch.randn(s, generator=g) for s in SHAPES]
    before = [t.clone() for t in target]
    ema_update_(target, online, tau)
    for got, xi, theta in zip(target, before, online):
        torch.testing.assert_close(got.double(), tau * xi.double() + (1 - tau) * theta.double(),
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got, ema_ref(xi, theta, tau), atol=1e-6, rtol=1e-6)
        if tau == 1.0:
            assert torch.equal(got, xi)
        if tau == 0.0:
            assert torch.equal(got, theta)
