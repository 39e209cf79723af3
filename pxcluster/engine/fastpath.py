"""The volume engine's fast path: the common NBD request done without a coroutine.

The NBD server (`pxcluster/nbd/server.py`) offers a READ or a small WRITE to these calls
before the coroutine path (`VolumeEngine.read` / `write`). They are the engine's `read_now`,
`write_now` and `write_begin` (`ReadsNow`, `WritesNow` and `BeginsWrites` in
`pxcluster/nbd/export.py`), bound once when the engine is built, so a request pays for no
call beyond its own.

A write's buffer, a `memoryview` of the NBD server's pooled receive buffer, goes:
- `write_now` (repl-1, not durable): to the local replica's `LocalFastPath.write_now`
  (`replica/service.py`), which applies it to the chunk store (`ChunkStore.write_now`: a
  `pwrite` into the chunk's slot) and returns; the server replies at once.
- `write_begin` (replicated, or durable): to the local replica's `write_now` as above, and
  into each remote replica's next frame (`RemoteFastPath.write_nowait`, `replica/client.py`);
  a durable write also joins the local store's next group commit (`flush_soon`). It returns
  one future, done from the replies' callbacks once every in-sync replica holds the write.

Each call returns None (or False), with nothing changed, whenever anything beyond the plain
case applies; and on any error, because the coroutine path then does the request again and
owns what errors mean (fencing, degrading a replica, trying another). Reads and writes are
idempotent, so doing one twice is safe.

What a write shares with the coroutine path stays in the engine (`volume.py`) and is called
from here: `_begin_write` / `_end_write` (a write in flight, its chunks dirty), `_guard`
(fencing, the node's lease) and `_degrade` (a failed replica recorded stale first:
invariant 2).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pxcluster.engine.errors import Fenced
from replica.api import LocalFastPath, RemoteFastPath, ReplicaAPI

if TYPE_CHECKING:
    from pxcluster.engine.volume import VolumeEngine


def _flush_outcome(fut: asyncio.Future[Any]) -> None:
    """Raise what the local replica's flush raised (write_begin's durable writes)."""
    fut.result()


class FastPath:
    """One engine's fast path. It holds only what the fast path alone uses: each replica's
    fast path (`replica/api.py`), found once per replica object, and the `write_begin`
    failures being handled; everything else is the engine's."""

    __slots__ = ("_engine", "_fast_local", "_fast_remote", "_settling")

    def __init__(self, engine: VolumeEngine) -> None:
        self._engine = engine
        self._fast_local: tuple[ReplicaAPI | None, LocalFastPath | None] = (None, None)
        self._fast_remote: dict[str, tuple[ReplicaAPI, RemoteFastPath | None]] = {}
        self._settling: set[asyncio.Task[None]] = set()  # held: the loop keeps weak refs

    def read_now(self, offset: int, length: int) -> bytes | None:
        """A read inside one chunk, served by the local in-sync replica."""
        e = self._engine
        if e.cipher is not None or not e.limits.unlimited or e.fenced:
            return None
        local = self._local_fast()
        where = self._plain_chunk(offset, length)
        if local is None or where is None:
            return None
        chunk, inner = where
        try:
            data: bytes = local.read_now(e.spec.id, e.epoch, chunk, inner, length)
        except Exception:
            return None
        if not e._lease_ok():  # as _read_raw's guard: the coroutine path fences
            return None
        c = e.counters
        c["read_ops"] += 1
        c["read_bytes"] += length
        return data

    def write_now(self, offset: int, data: memoryview, fua: bool) -> bool:
        """A non-durable write inside one chunk of a volume whose only in-sync replica is the
        local one, with no rebuild, snapshot, copy or clone copy in the way."""
        e = self._engine
        if not self._plain_write(fua) or len(e.in_sync) != 1:
            return False
        local = self._local_fast()
        length = len(data)
        where = self._plain_chunk(offset, length)
        if local is None or where is None or where[0] in e.copying:
            return False
        chunk, inner = where
        if not e._lease_ok():  # as _fan_write's guard, before the write
            return False
        seq = next(e._seq)
        try:
            done = local.write_now(e.spec.id, e.epoch, chunk, inner, data, seq=seq)
        except Exception:
            return False
        if not done:
            return False
        # What _mutate does after a write; it waited for nothing, so nobody saw it in flight.
        e._dirty_at[chunk] = time.monotonic()
        c = e.counters
        c["write_ops"] += 1
        c["write_bytes"] += length
        return True

    def write_begin(self, offset: int, data: memoryview, fua: bool) -> asyncio.Future[None] | None:
        """A write `write_now` declines only because other replicas are in sync or because it
        is durable (FUA, or a `--sync-writes` volume), started with no coroutine: the local
        replica (if in sync) applies it at once and every remote one gets its frame now; a
        durable one joins the local replica's next group commit (`flush_soon`) and goes to
        the remote ones in a durable frame (synced there before the reply). Returns the future
        of its acknowledgement: done when every in-sync replica holds it (durably if durable),
        or failed as the coroutine path fails it (a failed replica recorded stale in etcd
        first: invariant 2). None, with nothing changed, when it needs the coroutine path (the
        same reasons as `write_now`, or a remote connection not ready)."""
        e = self._engine
        durable = fua or e.spec.sync_writes
        if not self._unhindered() or (len(e.in_sync) < 2 and not durable):
            return None
        length = len(data)
        where = self._plain_chunk(offset, length)
        if where is None or where[0] in e.copying:
            return None
        chunk, inner = where
        local: LocalFastPath | None = None
        remotes: list[tuple[str, RemoteFastPath]] = []
        for node, r in e.in_sync.items():
            if node == e.local_node:
                local = self._local_fast()
                if local is None:
                    return None
            else:
                remote = self._remote_fast(node, r)
                if remote is None or not remote.ready_to_send():
                    return None
                remotes.append((node, remote))
        if not e._lease_ok():  # as _fan_write's guard, before the write
            return None
        vid, epoch, seq = e.spec.id, e.epoch, next(e._seq)
        if local is not None:
            try:
                if not local.write_now(
                    vid, epoch, chunk, inner, data, seq=seq, flushed_after=durable
                ):
                    return None
            except Exception:
                return None
        # Under way from here: it ends through the future, as _mutate ends a write, and counts
        # as in flight until then (the rebuild's and the copy gates' waits see it).
        serial = e._begin_write((chunk,))
        c = e.counters
        c["write_ops"] += 1
        c["write_bytes"] += length
        failed: dict[str, BaseException] = {}
        sent: list[tuple[str, Callable[[asyncio.Future[Any]], None], asyncio.Future[Any]]] = []
        if local is not None and durable:
            try:
                sent.append((e.local_node, _flush_outcome, local.flush_soon(vid, epoch)))
            except Exception as exc:
                failed[e.local_node] = exc
        for node, remote in remotes:
            try:
                fut = remote.write_nowait(vid, epoch, chunk, inner, data, seq=seq, durable=durable)
                sent.append((node, remote.write_outcome, fut))
            except Exception as exc:
                failed[node] = exc
        loop = sent[0][2].get_loop() if sent else asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        left = len(sent)

        def one_done(_: asyncio.Future[Any]) -> None:
            nonlocal left
            left -= 1
            if left:
                return
            for node, outcome, fut in sent:
                try:
                    outcome(fut)
                except (Exception, asyncio.CancelledError) as exc:
                    failed[node] = exc
            self._write_settle(serial, chunk, failed, done)

        if sent:
            for _, _, fut in sent:
                fut.add_done_callback(one_done)
        else:
            self._write_settle(serial, chunk, failed, done)
        return done

    def _write_settle(
        self, serial: int, chunk: int, failed: dict[str, BaseException], done: asyncio.Future[None]
    ) -> None:
        """Every replica of a `write_begin` answered: acknowledge, or degrade first."""
        e = self._engine
        if failed:
            task = done.get_loop().create_task(self._write_failed(serial, chunk, failed, done))
            self._settling.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._settling.discard)
            return
        try:
            e._guard()  # as at the end of _fan_write: no acknowledgement on a lease at risk
        except Fenced as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        finally:
            e._end_write(serial, (chunk,))

    async def _write_failed(
        self, serial: int, chunk: int, failed: dict[str, BaseException], done: asyncio.Future[None]
    ) -> None:
        e = self._engine
        try:
            await e._degrade(failed)
            e._guard()
        except Exception as exc:
            done.set_exception(exc)
        except BaseException:
            done.cancel()
            raise
        else:
            done.set_result(None)
        finally:
            e._end_write(serial, (chunk,))

    def _plain_write(self, fua: bool) -> bool:
        """Nothing about the volume keeps a write from the fast paths: not durable, and
        `_unhindered`."""
        return not (fua or self._engine.spec.sync_writes) and self._unhindered()

    # A replica's fast path is found once per replica object: a runtime Protocol check costs
    # too much to repeat for every request.

    def _local_fast(self) -> LocalFastPath | None:
        e = self._engine
        r = e.in_sync.get(e.local_node)
        known, fast = self._fast_local
        if known is not r:
            fast = r if isinstance(r, LocalFastPath) else None
            self._fast_local = (r, fast)
        return fast

    def _remote_fast(self, node: str, r: ReplicaAPI) -> RemoteFastPath | None:
        known = self._fast_remote.get(node)
        if known is None or known[0] is not r:
            known = self._fast_remote[node] = (r, r if isinstance(r, RemoteFastPath) else None)
        return known[1]

    def _unhindered(self) -> bool:
        """Not encrypted or limited, not fenced, no snapshot barrier, no replica catching up."""
        e = self._engine
        return not (
            e.cipher is not None
            or not e.limits.unlimited
            or e.fenced
            or e._barrier is not None
            or e.rebuilding
        )

    def _plain_chunk(self, offset: int, length: int) -> tuple[int, int] | None:
        """(chunk, offset inside it) of a request the fast paths may take: not empty, inside
        one chunk and the volume, and not in a chunk a clone has still to copy."""
        e = self._engine
        chunk_size = e.spec.chunk_size
        chunk, inner = divmod(offset, chunk_size)
        if not length or inner + length > chunk_size or offset + length > e.size:
            return None
        h = e.hydration
        if h is not None and chunk in h.pending:
            return None
        return chunk, inner
