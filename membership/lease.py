"""A node's etcd lease, kept alive, with the deadline self-fencing depends on (invariant 4).

`valid_until` is a monotonic time before which etcd cannot have expired the lease: it is
computed from the moment a keep-alive was *sent*, so it errs early, never late. An engine that
finds `valid_until - margin` in the past stops serving I/O before anyone else can take over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from membership.etcd import Etcd, EtcdUnavailable

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        etcd: Etcd,
        ttl: int,
        on_lost: Callable[[], Awaitable[None]],
    ) -> None:
        self.etcd = etcd
        self.ttl = ttl
        self.lease_id = 0
        self.valid_until = 0.0
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None

    @property
    def fence_margin(self) -> float:
        return max(0.5, self.ttl / 5)

    def healthy(self) -> bool:
        return time.monotonic() < self.valid_until - self.fence_margin

    async def grant(self) -> int:
        sent = time.monotonic()
        self.lease_id = await self.etcd.grant_lease(self.ttl)
        self.valid_until = sent + self.ttl
        return self.lease_id

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_alive(), name="lease-keepalive")

    async def stop(self, *, revoke: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if revoke and self.lease_id:
            try:
                await self.etcd.revoke_lease(self.lease_id)
            except EtcdUnavailable:
                log.warning("could not revoke lease %x: etcd unreachable", self.lease_id)
        self.valid_until = 0.0

    async def _keep_alive(self) -> None:
        interval = max(0.2, self.ttl / 4)
        while True:
            sent = time.monotonic()
            try:
                async with asyncio.timeout(interval * 2):
                    remaining = await self.etcd.refresh_lease(self.lease_id)
            except (EtcdUnavailable, TimeoutError):
                remaining = None
            if remaining is not None and remaining <= 0:
                log.error("etcd lease %x expired: this node lost its membership", self.lease_id)
                self.valid_until = 0.0
                await self._on_lost()
                return
            if remaining is not None:
                self.valid_until = sent + remaining
            await asyncio.sleep(interval)
