from __future__ import annotations

import pytest

from pxcluster.engine.limits import BURST_SECONDS, IoLimiter, _Timeline


def test_timeline_allows_a_burst_then_paces_at_the_rate() -> None:
    t = _Timeline(rate=100)
    waits = [t.reserve(1, now=0.0) for _ in range(300)]
    # One second of burst (100 ops) free, then each op waits 1/100 s more than the last.
    assert waits[:100] == [0.0] * 100
    assert waits[150] == pytest.approx(0.5)
    assert waits[299] == pytest.approx(2.0 - 0.01)


def test_timeline_idle_time_is_not_banked_beyond_now() -> None:
    t = _Timeline(rate=10)
    t.reserve(1, now=0.0)
    assert t.reserve(1, now=100.0) == 0.0
    assert t.next == pytest.approx(100.1)


async def test_unlimited_is_free_and_limits_can_change() -> None:
    lim = IoLimiter()
    assert lim.unlimited
    await lim.admit(1 << 20)
    lim.set(50, 0)
    assert not lim.unlimited and lim.iops == 50
    lim.set(0, 1 << 20)
    assert lim.iops == 0 and lim.bandwidth == 1 << 20 and not lim.unlimited
    assert BURST_SECONDS > 0
