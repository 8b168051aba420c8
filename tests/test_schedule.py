"""Pure schedules: warm-up + cosine learning rate and the standardisation EMA momentum."""

from __future__ import annotations

import pytest

from unic_cli.schedule import cosine, default_warmup_steps, ema_momentum, learning_rate


def test_learning_rate__linear_warmup_then_cosine_to_min():
    kw = dict(peak_lr=1e-3, min_lr=1e-6, warmup_steps=10, total_steps=110)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5, **kw) == pytest.approx(5e-4)
    assert learning_rate(10, **kw) == pytest.approx(1e-3)
    assert learning_rate(60, **kw) == pytest.approx((1e-3 + 1e-6) / 2)
    assert learning_rate(110, **kw) == pytest.approx(1e-6)
    values = [learning_rate(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ema_momentum__official_cosine_from_one_to_a_thousandth():
    assert ema_momentum(0, total_steps=100) == 1.0
    assert ema_momentum(50, total_steps=100) == pytest.approx((1.0 + 0.001) / 2)
    assert ema_momentum(100, total_steps=100) == pytest.approx(0.001)


def test_cosine__clamps_and_handles_empty_schedules():
    assert cosine(500, 100, 1.0, 0.0) == 0.0 and cosine(0, 0, 1.0, 0.5) == 0.5
    assert default_warmup_steps(200) == 10 and default_warmup_steps(1) == 0
