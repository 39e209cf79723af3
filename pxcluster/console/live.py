"""Live updates: one etcd watch per node process, fanned out to every open page as
server-sent events. A browser is told *that* the cluster changed (at most a few times a
second) and then fetches its page once; nothing polls etcd per browser.

The watch also keeps the failovers it sees go by (etcd holds only each volume's last one),
so a volume's page can show more than one on its timeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from aiohttp import web

from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import FailoverRecord

log = logging.getLogger(__name__)

DEBOUNCE = 0.5  # s: a burst of etcd writes (a create is several keys) becomes one event
# s between "tick" events on a quiet stream: they keep proxies from closing it, and cue the
# volume page to redraw its latency chart (sampled every few seconds, not an etcd change).
TICK = 10.0
MAX_SUBSCRIBERS = 64  # open streams per node: each holds a connection slot
MAX_HISTORY = 20  # failovers kept per volume
MAX_HISTORY_VOLUMES = 1024


class Hub:
    def __init__(self, etcd: Etcd, keys: Keys) -> None:
        self.etcd = etcd
        self.keys = keys
        self.version = 0
        self._subscribers: set[asyncio.Event] = set()
        self._task: asyncio.Task[None] | None = None
        self.failovers: dict[str, deque[FailoverRecord]] = {}
        self._closing = False

    def _ensure_started(self) -> None:
        # Started by the first page that listens: a node nobody looks at keeps no extra watch.
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="console-watch")

    def close_streams(self) -> None:
        """End every open stream: the server is shutting down and waits for its handlers
        (browsers reconnect to whichever node answers next)."""
        self._closing = True
        for event in self._subscribers:
            event.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        wake = asyncio.Event()
        watch = asyncio.create_task(
            self.etcd.wake_on_changes(self.keys.root.encode(), wake, on_event=self._on_event)
        )
        try:
            while True:
                await wake.wait()
                await asyncio.sleep(DEBOUNCE)
                wake.clear()
                self.version += 1
                for event in self._subscribers:
                    event.set()
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    def _on_event(self, key: bytes, value: bytes | None) -> None:
        if value is None or not key.endswith(b"/failover"):
            return
        try:
            record = FailoverRecord.decode(value)
            vid = self.keys.split(key)[1]
        except Exception:  # a record this version cannot read: the timeline skips it
            return
        ring = self.failovers.get(vid)
        if ring is None:
            if len(self.failovers) >= MAX_HISTORY_VOLUMES:
                return
            ring = self.failovers[vid] = deque(maxlen=MAX_HISTORY)
        if ring and ring[-1].detected == record.detected:
            ring[-1] = record  # the same move, one more step done
        else:
            ring.append(record)

    def history(self, volume_id: str) -> list[FailoverRecord]:
        return list(self.failovers.get(volume_id, ()))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            return web.Response(status=503, text="this node is shutting down")
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            return web.Response(status=503, text="too many open console pages on this node")
        self._ensure_started()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        event = asyncio.Event()
        self._subscribers.add(event)
        try:
            await response.write(b"retry: 2000\nevent: hello\ndata: 0\n\n")
            while True:
                try:
                    async with asyncio.timeout(TICK):
                        await event.wait()
                except TimeoutError:
                    await response.write(b"event: tick\ndata: 0\n\n")
                    continue
                if self._closing:
                    break
                event.clear()
                await response.write(f"event: change\ndata: {self.version}\n\n".encode())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._subscribers.discard(event)
        return response
