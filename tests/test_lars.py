"""LARS against the spec, written out by hand step by step: decay, trust ratio, exclusions, zero norms."""

from __future__ import annotations

import torch
from torch import nn

from fastbyol.step.lars import LARS, lars_param_groups, lars_ref

WD, MOM, ETA = 1e-2, 0.9, 1e-3


def _by_hand(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: float, excluded: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """BYOL.md, Optimiser, in float64 with Python control flow."""
    p, g, m = p.double(), g.double(), m.double()
    if excluded:
        u = g
    else:
        u = g + WD * p
        pn, un = float(p.norm()), float(u.norm())
        r = ETA * pn / un if pn > 0 and un > 0 else 1.0
        u = r * u
    m = MOM * m + u
    return p - lr * m, m


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.zero = nn.Linear(5, 2, bias=False)  # weights exactly 0: trust ratio falls back to 1
        nn.init.zeros_(self.zero.weight)


def test_param_groups_exclude_biases_and_batchnorm() -> None:
    net = Tiny()
    adapted, excluded = lars_param_groups(net.named_modules())
    assert {id(p) for p in adapted["params"]} == {id(net.conv.weight), id(net.fc.weight), id(net.zero.weight)}
    assert {id(p) for p in excluded["params"]} == {id(net.bn.weight), id(net.bn.bias), id(net.fc.bias)}
    assert excluded["excluded"] and not adapted["excluded"]


def test_optimizer_matches_hand_written_steps_including_zero_norms() -> None:
    torch.manual_seed(0)
    net = Tiny()
    groups = lars_param_groups(net.named_modules())
    opt = LARS(groups, weight_decay=WD, momentum=MOM, eta=ETA)
    ref = {id(p): (p.detach().clone(), torch.zeros_like(p), bool(grp["excluded"]))
           for grp in groups for p in grp["params"]}  # type: ignore[attr-defined]
    lrs = [0.5, 1.0, 0.25]
    for step, lr in enumerate(lrs):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        net.zero.weight.grad = torch.zeros_like(net.zero.weight) if step == 0 else net.zero.weight.grad
        for grp in opt.param_groups:
            grp["lr"] = lr
        expected = {}
        for p in net.parameters():
            p_ref, m_ref, excluded = ref[id(p)]
            expected[id(p)] = _by_hand(p_ref, p.grad, m_ref, lr, excluded)
        opt.step()
        for p in net.parameters():
            new_p, new_m = expected[id(p)]
            torch.testing.assert_close(p.detach().double(), new_p, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), new_m, atol=1e-6, rtol=1e-5)
            ref[id(p)] = (p.detach().clone(), opt.state[p]["momentum_buffer"].clone(), ref[id(p)][2])


def test_pure_reference_agrees_with_optimizer() -> None:
    g = torch.Generator().manual_seed(3)
    p, grad, m = (torch.randn(6, 5, generator=g) for _ in range(3))
    for excluded in (False, True):
        new_p, new_m = lars_ref(p, grad, m, lr=0.3, weight_decay=WD, momentum=MOM, eta=ETA, excluded=excluded)
        want_p, want_m = _by_hand(p, grad, m, 0.3, excluded)
        torch.testing.assert_close(new_p.double(), want_p, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(new_m.double(), want_m, atol=1e-6, rtol=1e-5)
    zero = torch.zeros(4)
    new_p, _ = lars_ref(zero, torch.ones(4), torch.zeros(4), lr=1.0, weight_decay=WD, momentum=MOM, eta=ETA,
                        excluded=False)
    torch.testing.assert_close(new_p, -torch.ones(4))  # ||p|| = 0: r = 1, plain step


def test_trust_ratio_bounds_the_step_to_eta_times_the_weight() -> None:
    p = torch.randn(100, generator=torch.Generator().manual_seed(4)) * 10
    grad = torch.randn(100) * 1e4
    new_p, _ = lars_ref(p, grad, torch.zeros(100), lr=1.0, weight_decay=0.0, momentum=MOM, eta=ETA, excluded=False)
    torch.testing.assert_close((new_p - p).norm(), ETA * p.norm(), rtol=1e-5, atol=0)
