"""Per-volume I/O limits (`volume update --iops-limit N --bw-limit SIZE`), enforced in the
engine before a request reaches any replica.

A virtual-clock limiter (GCRA): each request reserves its slot on a timeline advancing at the
allowed rate, and waits until its slot is less than a second away. So a burst of up to one
second's budget passes at full speed, and the long-run rate never exceeds the limit."""

from __future__ import annotations

import asyncio
import time

BURST_SECONDS = 1.0


class _Timeline:
    __slots__ = ("next", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next = 0.0

    def reserve(self, units: float, now: float) -> float:
        """Seconds to wait before `units` may pass (its slot on the timeline, less the burst
        allowance)."""
        due = max(self.next, now)
        self.next = due + units / self.rate
        return max(0.0, due - now - BURST_SECONDS)


class IoLimiter:
    def __init__(self, iops: int = 0, bandwidth: int = 0) -> None:
        self.iops = 0
        self.bandwidth = 0
        self._ops: _Timeline | None = None
        self._bytes: _Timeline | None = None
        self.set(iops, bandwidth)

    @property
    def unlimited(self) -> bool:
        return self._ops is None and self._bytes is None

    def set(self, iops: int, bandwidth: int) -> None:
        if iops != self.iops:
            self._ops = _Timeline(iops) if iops > 0 else None
        if bandwidth != self.bandwidth:
            self._bytes = _Timeline(bandwidth) if bandwidth > 0 else None
        self.iops, self.bandwidth = iops, bandwidth

    async def admit(self, nbytes: int) -> None:
        now = time.monotonic()
        wait = 0.0
        if self._ops is not None:
            wait = self._ops.reserve(1, now)
        if self._bytes is not None:
            wait = max(wait, self._bytes.reserve(nbytes, now))
        if wait > 0:
            await asyncio.sleep(wait)
