"""Heartbeat markers in the target: how a running backup and a running collection see each other.

A running backup holds `inprogress/<id>.json`, a running garbage collection `gc/<id>.json`,
each refreshed every HEARTBEAT_EVERY seconds and removed at the end. A marker whose heartbeat
is older than STALE_AFTER belongs to a writer that died (or lost the target): it is ignored,
and the collector removes it. Heartbeats are wall-clock times of the writer, so hosts that
share a target need clocks in step to well within STALE_AFTER (NTP does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from types import TracebackType

from pxcluster.backup import format as fmt
from pxcluster.backup.errors import BackupError
from pxcluster.backup.target import Target

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 5.0
STALE_AFTER = 30.0


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LiveMarker:
    """Writes the marker on enter, refreshes it in the background, removes it on exit."""

    def __init__(self, target: Target, prefix: str, marker: fmt.Marker) -> None:
        self.target = target
        self.prefix = prefix
        self.marker = marker
        self.key = fmt.marker_key(prefix, marker.id)
        self._task: asyncio.Task[None] | None = None
        self._last_beat = 0.0  # monotonic time of the last successful write

    async def _write(self) -> None:
        now = time.time()
        m = fmt.Marker(
            id=self.marker.id,
            kind=self.marker.kind,
            volume=self.marker.volume,
            volume_id=self.marker.volume_id,
            started=self.marker.started,
            heartbeat=now,
            owner=self.marker.owner,
        )
        sent = time.monotonic()
        await self.target.put(self.key, m.to_json())
        self._last_beat = sent

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            try:
                await asyncio.wait_for(self._write(), timeout=STALE_AFTER / 2)
            except (BackupError, TimeoutError) as e:
                log.warning("cannot refresh %s in %s: %s", self.key, self.target, e)

    def since_beat(self) -> float:
        """Seconds since the marker was last known written (from before the write began)."""
        return time.monotonic() - self._last_beat

    def check_fresh(self) -> None:
        """Raise unless others still see this marker as fresh (with room for clock skew)."""
        age = self.since_beat()
        if age > STALE_AFTER / 2:
            raise BackupError(
                f"{self.key} in {self.target} was last refreshed {age:.0f}s ago: another "
                "client may have taken it for a dead one; giving up"
            )

    async def __aenter__(self) -> LiveMarker:
        await self._write()
        self._task = asyncio.create_task(self._beat(), name=f"heartbeat {self.key}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self.target.delete(self.key), timeout=STALE_AFTER)
        except (BackupError, TimeoutError) as e:
            # It goes stale by itself; only a collection waits on it, and not for long.
            log.warning("cannot remove %s from %s: %s", self.key, self.target, e)


async def read_markers(target: Target, prefix: str) -> list[tuple[str, fmt.Marker | None]]:
    """Every marker under `prefix`: (key, marker), marker None if unreadable."""
    out: list[tuple[str, fmt.Marker | None]] = []
    for key in await target.list(prefix):
        try:
            out.append((key, fmt.Marker.from_json(await target.get(key))))
        except BackupError:
            continue  # removed between list and get: it ended
        except (ValueError, KeyError, TypeError):
            out.append((key, None))
    return out


async def fresh_markers(
    target: Target, prefix: str, exclude: str | None = None
) -> list[tuple[str, fmt.Marker | None]]:
    """The markers under `prefix` that are not stale (an unreadable one counts as fresh)."""
    now = time.time()
    return [
        (k, m)
        for k, m in await read_markers(target, prefix)
        if (m is None or m.age(now) < STALE_AFTER) and (exclude is None or k != exclude)
    ]


def describe(key: str, marker: fmt.Marker | None) -> str:
    if marker is None:
        return f"{key} (unreadable)"
    what = "backup" if marker.kind == "backup" else "garbage collection"
    vol = f" of volume {marker.volume}" if marker.volume else ""
    return f"{what} {marker.id}{vol} (by {marker.owner or 'unknown'})"
