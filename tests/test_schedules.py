"""lr and tau schedules against the spec's formulas: endpoints, warm-up, cosine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastbyol.step.schedules import lr_at, lr_schedule, tau_at, tau_schedule, warmup_steps_for


def test_lr_warmup_is_linear_from_zero_to_peak() -> None:
    sched = lr_schedule(total_steps=100, warmup_steps=10, peak_lr=2.0)
    assert sched[0] == 0.0
    np.testing.assert_allclose(sched[:11], 2.0 * np.arange(11) / 10, rtol=0, atol=1e-12)
    assert sched.argmax() == 10


def test_lr_cosine_decay_hits_zero_at_the_end() -> None:
    total, warm, peak = 1000, 100, 0.8
    for k in (100, 325, 550, 777, 1000):
        expected = 0.5 * peak * (1 + math.cos(math.pi * (k - warm) / (total - warm)))
        assert lr_at(k, total_steps=total, warmup_steps=warm, peak_lr=peak) == pytest.approx(expected, abs=1e-12)
    assert lr_at(total, total_steps=total, warmup_steps=warm, peak_lr=peak) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(550, total_steps=total, warmup_steps=warm, peak_lr=peak) == pytest.approx(peak / 2)


def test_lr_without_warmup_starts_at_peak() -> None:
    assert lr_at(0, total_steps=10, warmup_steps=0, peak_lr=1.5) == 1.5


def test_tau_goes_from_base_to_one() -> None:
    total = 500
    sched = tau_schedule(total, 0.996)
    assert sched[0] == pytest.approx(0.996, abs=1e-15)
    assert sched[-1] == pytest.approx(1.0, abs=1e-15)
    assert np.all(np.diff(sched) >= 0)
    k = 123
    assert tau_at(k, total_steps=total, tau_base=0.99) == pytest.approx(
        1 - 0.01 * (math.cos(math.pi * k / total) + 1) / 2, abs=1e-15)
    assert tau_at(total // 2, total_steps=total, tau_base=0.97) == pytest.approx(0.985)


def test_paper_step_counts() -> None:
    # BYOL.md: steps = epochs * 1,281,167 // 4096; warm-up 10 epochs.
    assert warmup_steps_for(10, 1_281_167, 4096) == 12_811_670 // 4096 == 3127
    from fastbyol.config_parse import build_config

    cfg = build_config("byol-r50-1000ep", overrides=["data.path=/x"])
    assert cfg.total_steps(1_281_167) == 1000 * 1_281_167 // 4096 == 312_784
