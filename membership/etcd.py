"""A thin typed layer over aetcd: one place that knows the client library.

Every call is bounded by a timeout, and every client failure becomes `EtcdUnavailable`, so a
CLI facing an unreachable etcd prints one line instead of hanging or dumping a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aetcd
import aetcd.exceptions
import aetcd.rtypes


class EtcdUnavailable(Exception):
    """etcd could not be reached or did not answer in time."""


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    version: int
    lease: int


def _kv(raw: Any) -> KV:
    return KV(raw.key, raw.value, raw.mod_revision, raw.version, raw.lease)


class Txn:
    """Builder for one etcd transaction, so callers never touch aetcd's compare objects."""

    def __init__(self, client: aetcd.Client) -> None:
        self._t = client.transactions
        self.compare: list[Any] = []
        self.success: list[Any] = []
        self.failure: list[Any] = []

    def absent(self, key: bytes) -> Txn:
        self.compare.append(self._t.version(key) == 0)
        return self

    def present(self, key: bytes) -> Txn:
        self.compare.append(self._t.version(key) > 0)
        return self

    def unchanged(self, key: bytes, mod_revision: int) -> Txn:
        """Key still at the revision we read (mod_revision 0 means: still absent)."""
        self.compare.append(self._t.mod(key) == mod_revision)
        return self

    def value_is(self, key: bytes, value: bytes) -> Txn:
        self.compare.append(self._t.value(key) == value)
        return self

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> Txn:
        self.success.append(self._t.put(key, value, lease=lease))
        return self

    def delete(self, key: bytes) -> Txn:
        self.success.append(self._t.delete(key))
        return self

    def delete_prefix(self, prefix: bytes) -> Txn:
        end = aetcd.utils.prefix_range_end(prefix)
        self.success.append(self._t.delete(prefix, range_end=end))
        return self


def parse_endpoint(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return parsed.hostname or "127.0.0.1", parsed.port or 2379


class Etcd:
    def __init__(self, url: str, *, timeout: float = 3.0) -> None:
        self.url = url
        host, port = parse_endpoint(url)
        self.timeout = timeout
        self._client = aetcd.Client(host=host, port=port, timeout=max(1, int(timeout)))

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._client.connect()
            # The channel connects lazily: one read proves etcd is really there.
            await self._call(self._client.get(b"/pxc-probe"))
        except EtcdUnavailable:
            raise
        except (aetcd.exceptions.ClientError, TimeoutError, OSError) as e:
            raise EtcdUnavailable(f"etcd at {self.url} is unreachable: {e}") from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await self._client.close()

    async def _call(self, coro: Any) -> Any:
        try:
            # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that
            # races with the call's completion (gh-86296).
            async with asyncio.timeout(self.timeout):
                return await coro
        except (aetcd.exceptions.ClientError, TimeoutError) as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # gRPC reports our own cancellation as a CANCELLED call error: give the
                # cancellation back, or loops that survive etcd outages would survive it too.
                raise asyncio.CancelledError() from e
            detail = str(e) or type(e).__name__
            raise EtcdUnavailable(f"etcd at {self.url} is unreachable: {detail}") from None

    async def get(self, key: bytes) -> KV | None:
        raw = await self._call(self._client.get(key))
        return None if raw is None else _kv(raw)

    async def get_prefix(self, prefix: bytes) -> list[KV]:
        res = await self._call(self._client.get_prefix(prefix))
        return [_kv(kv) for kv in res]

    async def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        await self._call(self._client.put(key, value, lease=lease))

    async def delete(self, key: bytes) -> None:
        await self._call(self._client.delete(key))

    def txn(self) -> Txn:
        return Txn(self._client)

    async def commit(self, txn: Txn) -> bool:
        ok, _ = await self._call(self._client.transaction(txn.compare, txn.success, txn.failure))
        return bool(ok)

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._call(self._client.lease(ttl))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """Returns the remaining TTL; <= 0 means the lease is gone."""
        reply = await self._call(self._client.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call(self._client.revoke_lease(lease_id))

    async def wake_on_changes(self, prefix: bytes, wake: asyncio.Event) -> None:
        """Set `wake` on every change under `prefix`, forever; survives etcd restarts.

        Reconcile loops wait on `wake` (with a timeout as a safety net), then re-read state, so
        a lost or coalesced event costs latency, never correctness.
        """
        while True:
            try:
                watch = await self._call(self._client.watch_prefix(prefix))
                wake.set()  # events may have been missed while no watch was open
                try:
                    async for _ in watch:
                        wake.set()
                finally:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.timeout):
                            await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)
