"""Read/write/flush latency of the volumes this node serves, over the last minutes, from the
node's own NBD histograms (pxc_volume_latency_seconds): sampled every few seconds, kept in a
bounded ring per volume, drawn as SVG on the server (no chart library in the browser)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pxcluster.node.metrics import LATENCY_OPS, Metrics

log = logging.getLogger(__name__)

INTERVAL = 5.0  # s between samples
POINTS = 120  # per volume and op: 10 minutes at INTERVAL
MAX_VOLUMES = 1024  # rings kept; a node serves far fewer volumes


@dataclass(frozen=True)
class Point:
    t: float
    ops: float  # requests per second in the interval
    mean: float  # seconds, 0 when no request
    p99: float  # seconds: the upper bound of the bucket holding the 99th percentile


@dataclass
class _Last:
    count: float
    total: float
    buckets: list[tuple[float, float]]


class LatencyHistory:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.rings: dict[tuple[str, str], deque[Point]] = {}
        self._last: dict[tuple[str, str], _Last] = {}
        self._task: asyncio.Task[None] | None = None
        self._primed = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="console-latency")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.sample(time.time())
            except Exception:
                log.exception("latency sample failed")  # the chart has a gap, nothing more
            await asyncio.sleep(INTERVAL)

    def _read(self) -> dict[tuple[str, str], _Last]:
        now: dict[tuple[str, str], _Last] = {}
        for metric in self.metrics.volume_latency.collect():
            for s in metric.samples:
                key = (s.labels.get("volume", ""), s.labels.get("op", ""))
                entry = now.setdefault(key, _Last(0.0, 0.0, []))
                if s.name.endswith("_count"):
                    entry.count = s.value
                elif s.name.endswith("_sum"):
                    entry.total = s.value
                elif s.name.endswith("_bucket"):
                    entry.buckets.append((float(s.labels["le"]), s.value))
        return now

    def sample(self, t: float) -> None:
        now = self._read()
        for key, cur in now.items():
            prev = self._last.get(key)
            if prev is None and self._primed:
                # A volume first served since the last sample: its histogram started at zero.
                prev = _Last(0.0, 0.0, [])
            if prev is None or cur.count < prev.count:  # history from before we looked
                continue
            n = cur.count - prev.count
            mean = (cur.total - prev.total) / n if n else 0.0
            ring = self.rings.get(key)
            if ring is None:
                if len(self.rings) >= MAX_VOLUMES * len(LATENCY_OPS):
                    continue
                ring = self.rings[key] = deque(maxlen=POINTS)
            ring.append(Point(t, n / INTERVAL, mean, _p99(prev.buckets, cur.buckets, n)))
        self._last = now
        self._primed = True

    def series(self, volume: str) -> dict[str, list[Point]]:
        return {op: list(self.rings.get((volume, op), ())) for op in LATENCY_OPS}


def _p99(prev: list[tuple[float, float]], cur: list[tuple[float, float]], n: float) -> float:
    if n <= 0:
        return 0.0
    before = dict(prev)
    for le, count in sorted(cur):
        if count - before.get(le, 0.0) >= 0.99 * n:
            return le if le != float("inf") else max((b for b, _ in cur if b != float("inf")))
    return 0.0


COLORS = {"read": "#2b7bb9", "write": "#d9822b", "flush": "#7a4fb5"}
W, H, PAD_L, PAD_B, PAD_T = 640, 200, 56, 24, 10


def chart(series: dict[str, list[Point]]) -> dict[str, Any]:
    """Polylines of mean latency (ms) per op over time, scaled to the largest value; the
    template draws them in an <svg>. Empty when nothing was served here meanwhile."""
    points = [p for ps in series.values() for p in ps if p.ops > 0]
    if not points:
        return {"empty": True}
    t0 = min(p.t for p in points)
    t1 = max(max(p.t for p in points), t0 + INTERVAL)
    top = max(p.mean for p in points) * 1000 or 1.0
    lines = []
    for op, ps in series.items():
        coords = [
            (
                PAD_L + (W - PAD_L - 8) * (p.t - t0) / (t1 - t0),
                PAD_T + (H - PAD_T - PAD_B) * (1 - p.mean * 1000 / top),
            )
            for p in ps
            if p.ops > 0
        ]
        last = next((p for p in reversed(ps) if p.ops > 0), None)
        lines.append(
            {
                "op": op,
                "color": COLORS[op],
                "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in coords),
                # Dots too: a single sample (the first seconds of I/O) draws no line.
                "dots": [(round(x, 1), round(y, 1)) for x, y in coords],
                "last_ms": last.mean * 1000 if last else None,
                "last_p99_ms": last.p99 * 1000 if last else None,
                "last_ops": last.ops if last else None,
            }
        )
    return {
        "empty": False,
        "width": W,
        "height": H,
        "pad_l": PAD_L,
        "pad_b": PAD_B,
        "pad_t": PAD_T,
        "top_ms": top,
        "span_s": t1 - t0,
        "lines": lines,
    }
