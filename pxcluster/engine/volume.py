"""The volume engine: one per attached volume, on the attach node.

It is an NBD `Export`: it splits requests at chunk boundaries, sends each write to every
in-sync replica at once and acknowledges only when all hold it (invariant 1). A replica that
fails is dropped from the in-sync set only after etcd recorded it stale under this engine's
epoch (invariant 2); if that cannot be recorded, the write fails. Before any acknowledgement
the engine checks that its node's lease is safe (invariant 4, self-fencing).

The common NBD request is done without a coroutine by the engine's fast path
(`pxcluster/engine/fastpath.py`); this module holds the coroutine path, which handles every
other case, and the bookkeeping both share.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pxcluster.engine.crypt import BLOCK as CRYPT_BLOCK
from pxcluster.engine.crypt import BlockCipher
from pxcluster.engine.errors import Fenced, NoInSyncReplica, OutOfBounds, VolumeIOError
from pxcluster.engine.fanout import fan_out, fan_out_calls
from pxcluster.engine.fastpath import FastPath
from pxcluster.engine.hydrate import Hydration
from pxcluster.engine.limits import IoLimiter
from pxcluster.engine.rangelock import RangeLocks
from pxcluster.engine.reconcile import reconcile_dirty
from pxcluster.engine.state import ReplicaStateWriter
from replica.api import ReplicaAPI, SnapshotInfo, VolumeInfo
from replica.errors import ReplicaError, StaleEpoch

log = logging.getLogger(__name__)


# Seconds without a trim on a chunk trimmed in pieces before the engine looks whether it reads
# as zeros (and frees it).
TRIM_SETTLE = 0.5
# What the engine counts for /metrics: requests and bytes by kind, and chunks its trims freed.
VOLUME_COUNTERS = (
    "read_ops",
    "read_bytes",
    "write_ops",
    "write_bytes",
    "trim_ops",
    "trim_bytes",
    "chunks_freed",
)


class Piece(NamedTuple):
    # A tuple, not a frozen dataclass: one is built per request (a frozen dataclass's __init__
    # costs a setattr call per field).
    chunk: int
    offset: int  # inside the chunk
    start: int  # inside the request
    length: int


def split(offset: int, length: int, chunk_size: int) -> list[Piece]:
    chunk, inner = divmod(offset, chunk_size)
    if inner + length <= chunk_size:  # the common request: inside one chunk
        return [Piece(chunk, inner, 0, length)] if length else []
    pieces = []
    pos = offset
    end = offset + length
    while pos < end:
        chunk, inner = divmod(pos, chunk_size)
        n = min(chunk_size - inner, end - pos)
        pieces.append(Piece(chunk, inner, pos - offset, n))
        pos += n
    return pieces


@dataclass
class CatchUp:
    """A replica being rebuilt: it gets every write except to chunks still to be copied."""

    api: ReplicaAPI
    pending: set[int] | None = None  # None: nothing copied or compared yet, so no writes


@dataclass(frozen=True)
class VolumeSpec:
    id: str
    name: str
    size: int
    chunk_size: int
    sync_writes: bool


@dataclass(frozen=True)
class OpenReport:
    opened: list[str]
    marked_stale: list[str]
    reconciled_chunks: int


class VolumeEngine:
    def __init__(
        self,
        spec: VolumeSpec,
        epoch: int,
        replicas: dict[str, ReplicaAPI],
        *,
        local_node: str,
        state: ReplicaStateWriter,
        lease_ok: Callable[[], bool],
        on_fenced: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.size = spec.size
        self.epoch = epoch
        self.local_node = local_node
        self._all = replicas
        self.in_sync: dict[str, ReplicaAPI] = {}
        # Chunks trimmed piece by piece lately, and when to look whether they read as zeros
        # now (see _trim_raw).
        self._trim_checks: dict[int, asyncio.TimerHandle] = {}
        self._trim_tasks: set[asyncio.Task[None]] = set()
        self._state = state
        self._lease_ok = lease_ok
        self._on_fenced = on_fenced
        self._fence_task: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        self._seq = itertools.count(1)
        # Chunks this engine wrote and has not yet recorded clean, with the monotonic time their
        # last write completed. The dirty log on the replicas must cover every one of them.
        self._dirty_at: dict[int, float] = {}
        self._cleaner: asyncio.Task[None] | None = None
        self.fenced = False
        self._degrade_lock = asyncio.Lock()
        # Rebuild support (pxcluster/engine/rebuild.py): replicas catching up get every new
        # write too; a chunk being copied holds back writes to it, and a copy waits for the
        # writes already in flight on its chunk.
        self.rebuilding: dict[str, CatchUp] = {}
        self.copying: dict[int, asyncio.Event] = {}
        self.chunk_writes: dict[int, int] = {}
        self._serial = itertools.count(1)
        self.inflight: set[int] = set()
        self._write_done = asyncio.Event()
        self.limits = IoLimiter()
        self.cipher: BlockCipher | None = None  # set for encrypted volumes before serving
        self._block_locks = RangeLocks()
        # Snapshots (oldest first), the same on every in-sync replica. While `_barrier` is set,
        # new writes wait: a snapshot holds every write acknowledged before it, none after.
        self.snapshots: list[SnapshotInfo] = []
        self._barrier: asyncio.Event | None = None
        self._snap_lock = asyncio.Lock()
        # A clone still copying its source snapshot (pxcluster/engine/hydrate.py).
        self.hydration: Hydration | None = None
        self._hydrator: asyncio.Task[None] | None = None
        # Plain counters, read by the metrics collector at scrape time (no cost per request
        # beyond an add).
        self.counters = dict.fromkeys(VOLUME_COUNTERS, 0)
        # The fast path (pxcluster/engine/fastpath.py): the NBD server's requests done without
        # a coroutine. Its bound methods are the engine's own, so a request costs no extra call.
        fast = FastPath(self)
        self.read_now = fast.read_now
        self.write_now = fast.write_now
        self.write_begin = fast.write_begin

    # --- lifecycle

    async def grow(self, size: int) -> None:
        """Online resize (grow only): every replica learns the new size before any request
        may reach past the old end."""
        if size <= self.size:
            return
        s = self.spec

        def do_open(r: ReplicaAPI) -> Awaitable[VolumeInfo]:
            return r.open(s.id, self.epoch, size, s.chunk_size, sync_writes=s.sync_writes)

        await self._fan_write(lambda r: _ignore(do_open(r)))
        self.spec = dataclasses.replace(s, size=size)
        self.size = size

    async def open(self, snapshots: list[str] | None = None) -> OpenReport:
        """Open every replica with this epoch; at least one must open (invariant 3).

        `snapshots`: the ids etcd records as complete, oldest first. A replica holding one that
        is not there (a creation cut short) drops it; one lacking any is stale."""
        s = self.spec

        async def do_open(r: ReplicaAPI) -> VolumeInfo:
            return await r.open(s.id, self.epoch, s.size, s.chunk_size, sync_writes=s.sync_writes)

        infos, failed = await fan_out(self._all, do_open)
        for node, err in failed.items():
            log.warning(
                "volume %s epoch %d: replica %s did not open: %r", s.name, self.epoch, node, err
            )
        if not infos:
            raise NoInSyncReplica(f"volume {s.name}: no in-sync replica could be opened")
        if snapshots is not None:
            await self._settle_snapshots(infos, failed, snapshots)
        if failed and not await self._state.mark_stale(sorted(failed)):
            raise Fenced(f"volume {s.name}: epoch {self.epoch} is no longer current")
        self.in_sync = {n: self._all[n] for n in sorted(infos)}
        count = await reconcile_dirty(s.id, self.epoch, self.in_sync, infos)
        return OpenReport(sorted(infos), sorted(failed), count)

    async def _settle_snapshots(
        self,
        infos: dict[str, VolumeInfo],
        failed: dict[str, BaseException],
        expected: list[str],
    ) -> None:
        s = self.spec
        lists, errors = await fan_out({n: self._all[n] for n in infos}, lambda r: r.snapshots(s.id))
        for node, err in errors.items():
            failed[node] = err
            del infos[node]
        for node, snaps in sorted(lists.items()):
            r = self._all[node]
            for extra in [x for x in snaps if x.id not in expected]:
                await r.snapshot_delete(s.id, self.epoch, extra.id)
                log.info(
                    "volume %s: replica %s dropped unfinished snapshot %s", s.name, node, extra.id
                )
            held = {x.id for x in snaps}
            if not all(e in held for e in expected):
                failed[node] = RuntimeError("replica lacks a snapshot")
                del infos[node]
                continue
            if not self.snapshots:
                self.snapshots = [x for x in snaps if x.id in expected]
        if not infos:
            raise NoInSyncReplica(f"volume {s.name}: no replica holds every snapshot")

    async def snapshot(self, snap_id: str, name: str, created: float) -> None:
        """Crash-consistent snapshot on every in-sync replica: new writes wait while the
        writes in flight finish and everything is flushed, then each replica freezes its data.
        Replicas being rebuilt stop (they restart, copying the snapshot too)."""
        async with self._snap_lock:
            if any(x.id == snap_id for x in self.snapshots):
                return
            gate = asyncio.Event()
            self._barrier = gate
            try:
                await self.wait_writes(lambda: not self.inflight)
                await self.sync_replicas()
                self._stop_rebuilds("a snapshot was taken")
                vid, epoch = self.spec.id, self.epoch
                await self._fan_write(
                    lambda r: r.snapshot_create(vid, epoch, snap_id, name, created)
                )
                self.snapshots.append(SnapshotInfo(snap_id, name, created))
            finally:
                self._barrier = None
                gate.set()

    async def delete_snapshot(self, snap_id: str) -> None:
        async with self._snap_lock:
            self._stop_rebuilds("a snapshot was deleted")
            vid, epoch = self.spec.id, self.epoch
            await self._fan_write(lambda r: r.snapshot_delete(vid, epoch, snap_id))
            self.snapshots = [x for x in self.snapshots if x.id != snap_id]

    async def revert(self, snap_id: str) -> None:
        """Back to the snapshot (newer snapshots go). Only for a volume no client uses."""
        async with self._snap_lock:
            gate = asyncio.Event()
            self._barrier = gate
            try:
                await self.wait_writes(lambda: not self.inflight)
                self._stop_rebuilds("the volume was reverted")
                vid, epoch = self.spec.id, self.epoch
                await self._fan_write(lambda r: r.revert(vid, epoch, snap_id))
                ids = [x.id for x in self.snapshots]
                if snap_id in ids:
                    self.snapshots = self.snapshots[: ids.index(snap_id) + 1]
            finally:
                self._barrier = None
                gate.set()

    # --- clones: copying the source snapshot

    def start_hydration(self, h: Hydration, on_done: Callable[[], Awaitable[None]]) -> None:
        self.hydration = h
        self._hydrator = asyncio.get_running_loop().create_task(self._hydrate_all(h, on_done))

    async def _hydrate_all(self, h: Hydration, on_done: Callable[[], Awaitable[None]]) -> None:
        try:
            for chunk in sorted(h.pending):
                if chunk in h.pending:
                    await self.hydrate_chunk(chunk)
                    await h.pace(self.spec.chunk_size)
                if h.copied % 8 == 0:
                    await h.record_watermark(min(h.pending, default=chunk + 1))
            await self.sync_replicas()
            await on_done()
            self.hydration = None
            log.info("volume %s: clone copy done (%d chunks)", self.name, h.copied)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("volume %s: clone copy stopped: %s (resumes at next attach)", self.name, e)

    async def hydrate_chunk(self, chunk: int, *, early: bool = False) -> None:
        """Copy one chunk of the source snapshot into every replica, exactly once."""
        h = self.hydration
        if h is None:
            return
        async with h.lock(chunk):
            if chunk not in h.pending:
                return
            n = min(self.spec.chunk_size, self.size - chunk * self.spec.chunk_size)
            data = await h.read(chunk, 0, n)
            gen = (self.epoch, next(self._seq))
            vid, epoch = self.spec.id, self.epoch
            if data.count(0) != len(data):
                await self._fan_write(lambda r: r.write_chunk(vid, epoch, chunk, data, gen))
                self._dirty_at[chunk] = time.monotonic()
            if early:
                await h.record_extra(chunk)
            h.pending.discard(chunk)
            h.copied += 1

    def stop_hydration(self) -> None:
        if self._hydrator is not None:
            self._hydrator.cancel()
            self._hydrator = None

    def _stop_rebuilds(self, why: str) -> None:
        for node in list(self.rebuilding):
            del self.rebuilding[node]
            log.info("volume %s: rebuild of replica %s restarts: %s", self.name, node, why)

    async def close(self) -> None:
        """Clean detach: flush everywhere, then record every chunk as clean."""
        for handle in self._trim_checks.values():
            handle.cancel()
        self._trim_checks.clear()
        if self._trim_tasks:
            await asyncio.gather(*self._trim_tasks, return_exceptions=True)
        if self.fenced:
            return
        await self.sync_replicas()
        self.stop_cleaner()
        dirty = sorted(self._dirty_at)
        if dirty:
            await self._fan_write(lambda r: r.mark_clean(self.spec.id, self.epoch, dirty))
        self._dirty_at.clear()

    @property
    def in_sync_count(self) -> int:
        return len(self.in_sync)

    @property
    def replica_count(self) -> int:
        return len(self._all) + len([n for n in self.rebuilding if n not in self._all])

    @property
    def limit_settings(self) -> tuple[int, int]:
        return self.limits.iops, self.limits.bandwidth

    def dirty_chunks(self) -> set[int]:
        """Chunks written by this engine and not yet recorded clean."""
        return set(self._dirty_at)

    def start_cleaner(self, idle: float = 2.0) -> None:
        self._cleaner = asyncio.get_running_loop().create_task(self._clean_loop(idle))

    def stop_cleaner(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
            self._cleaner = None

    async def _clean_loop(self, idle: float) -> None:
        while not self.fenced:
            await asyncio.sleep(idle)
            try:
                await self.clean_idle(idle)
            except VolumeIOError as e:
                log.warning("volume %s: marking idle chunks clean failed: %s", self.name, e)

    async def clean_idle(self, idle: float) -> list[int]:
        """Record chunks idle for `idle` seconds as clean on every replica, so the dirty log
        (what a crash or a rebuild must resync) stays the working set, not all data written.

        Only chunks whose last write completed before a flush that covers it are cleaned, and
        writes to them wait while the mark is recorded: a write the log does not cover would be
        lost to invariant 5."""
        started = time.monotonic()
        cutoff = started - idle
        if not any(t < cutoff for t in self._dirty_at.values()):
            return []
        await self.sync_replicas()
        chunks = sorted(
            c for c, t in self._dirty_at.items() if t < cutoff and c not in self.chunk_writes
        )
        gates = {c: asyncio.Event() for c in chunks if c not in self.copying}
        self.copying.update(gates)
        try:
            await self.wait_writes(lambda: not any(c in self.chunk_writes for c in gates))
            clean = [c for c in gates if self._dirty_at.get(c, started) < cutoff]
            if clean:
                await self._fan_write(lambda r: r.mark_clean(self.spec.id, self.epoch, clean))
                for c in clean:
                    del self._dirty_at[c]
                log.info(
                    "volume %s: %d idle chunks marked clean, %d dirty",
                    self.name,
                    len(clean),
                    len(self._dirty_at),
                )
            return clean
        finally:
            for c, gate in gates.items():
                del self.copying[c]
                gate.set()

    # --- Export (NBD frontend): the coroutine path. The NBD server tries the fast path first
    # (`read_now`, `write_now`, `write_begin`: fastpath.py, bound in __init__).

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if not self.limits.unlimited:
            await self.limits.admit(length)
        c = self.counters
        c["read_ops"] += 1
        c["read_bytes"] += length
        if self.cipher is not None:
            return await self._read_encrypted(offset, length)
        return await self._read_raw(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._check(offset, len(data))
        if not self.limits.unlimited:
            await self.limits.admit(len(data))
        c = self.counters
        c["write_ops"] += 1
        c["write_bytes"] += len(data)
        if self.cipher is not None:
            await self._write_encrypted(offset, data, fua)
        else:
            await self._write_raw(offset, data, fua)

    async def flush(self) -> None:
        """The client's FLUSH: every write answered before it is durable on every replica."""
        if self.spec.sync_writes:
            # Each write and trim of a --sync-writes volume was durable on every replica that
            # took it before it was answered, and a FLUSH promises no more than what was
            # answered before it: nothing is left to sync. Whole-chunk copies (a clone's, a
            # rebuild's) are durable when `write_chunk` returns; a chunk freed after its trims
            # read as zeros reads as zeros whether the free survives or not.
            self._check_writable()
            return
        await self.sync_replicas()

    async def sync_replicas(self) -> None:
        """Sync every replica: whatever any of them has applied is durable after this (what
        a snapshot, a clean detach, the dirty log's cleaning and a finished clone copy need,
        beyond the client's writes)."""
        await self._fan_write(lambda r: r.flush(self.spec.id, self.epoch))

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check(offset, length)
        if not self.limits.unlimited:
            await self.limits.admit(0)
        c = self.counters
        c["trim_ops"] += 1
        c["trim_bytes"] += length
        if self.cipher is not None:
            await self._trim_encrypted(offset, length, fua)
        else:
            await self._trim_raw(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        # Trim zero-fills partial ranges and frees whole chunks: the same bytes either way.
        await self.trim(offset, length, fua)

    # --- the replicated data path (bytes as they are stored)

    async def _read_raw(self, offset: int, length: int) -> bytes:
        parts = [await self._read_piece(p) for p in split(offset, length, self.spec.chunk_size)]
        self._guard()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _write_raw(self, offset: int, data: memoryview, fua: bool) -> None:
        seq = next(self._seq)
        durable = fua or self.spec.sync_writes
        pieces = split(offset, len(data), self.spec.chunk_size)
        vid, epoch = self.spec.id, self.epoch

        def one(r: ReplicaAPI, pieces: list[Piece]) -> Awaitable[None]:
            # Not a coroutine itself: the common case hands back the replica's own call, one
            # coroutine frame fewer to step through on every resume.
            if len(pieces) == 1 and pieces[0].length == len(data):
                p = pieces[0]
                return r.write(vid, epoch, p.chunk, p.offset, data, seq=seq, durable=durable)
            return _gather(
                *(
                    r.write(
                        vid,
                        epoch,
                        p.chunk,
                        p.offset,
                        data[p.start : p.start + p.length],
                        seq=seq,
                        durable=durable,
                    )
                    for p in pieces
                )
            )

        await self._mutate(pieces, one)

    async def _trim_raw(self, offset: int, length: int, fua: bool) -> None:
        seq = next(self._seq)
        pieces = split(offset, length, self.spec.chunk_size)
        vid, epoch = self.spec.id, self.epoch

        async def one(r: ReplicaAPI, pieces: list[Piece]) -> None:
            for p in pieces:
                await r.trim(vid, epoch, p.chunk, p.offset, p.length, seq=seq)
            if fua or self.spec.sync_writes:
                await r.flush(vid, epoch)

        await self._mutate(pieces, one)
        # A whole-chunk trim frees the chunk; a chunk trimmed in pieces (fstrim through
        # nbdfuse arrives as 64 KiB discards) is only zeroed. Once its trims go quiet, look
        # whether it reads as zeros now, and free it if so.
        loop = asyncio.get_running_loop()
        for p in pieces:
            if p.length == self._chunk_len(p.chunk):
                self.counters["chunks_freed"] += 1
                continue
            old = self._trim_checks.pop(p.chunk, None)
            if old is not None:
                old.cancel()
            self._trim_checks[p.chunk] = loop.call_later(
                TRIM_SETTLE, self._start_trim_check, p.chunk
            )

    def _chunk_len(self, chunk: int) -> int:
        return min(self.spec.chunk_size, self.size - chunk * self.spec.chunk_size)

    def _start_trim_check(self, chunk: int) -> None:
        self._trim_checks.pop(chunk, None)
        if self.fenced:
            return
        task = asyncio.get_running_loop().create_task(self._free_if_zeroed(chunk))
        self._trim_tasks.add(task)
        task.add_done_callback(self._trim_tasks.discard)

    async def _free_if_zeroed(self, chunk: int) -> None:
        """Free a chunk that reads as zeros, as a whole-chunk trim: the same bytes either way.
        Gated like a rebuild's copy, so no write lands between the look and the free."""
        while chunk in self.copying:
            await self.copying[chunk].wait()
        gate = asyncio.Event()
        self.copying[chunk] = gate
        try:
            await self.wait_writes(lambda: chunk not in self.chunk_writes)
            whole = Piece(chunk, 0, 0, self._chunk_len(chunk))
            data = await self._read_piece(whole)
            if data.count(0) != len(data):
                return
            seq = next(self._seq)
            vid, epoch = self.spec.id, self.epoch

            async def free(r: ReplicaAPI, pieces: list[Piece]) -> None:
                await r.trim(vid, epoch, chunk, 0, whole.length, seq=seq)

            serial = self._begin_write((chunk,))
            try:
                await self._fan_write(lambda r: free(r, [whole]), [whole], free)
            finally:
                self._end_write(serial, [chunk])
            self.counters["chunks_freed"] += 1
        except (ReplicaError, VolumeIOError) as e:
            # Only space is at stake: the chunk reads as zeros whether freed or not.
            log.info("volume %s: chunk %d not freed after its trims: %r", self.name, chunk, e)
        finally:
            del self.copying[chunk]
            gate.set()

    # --- encryption at rest (pxcluster/engine/crypt.py): whole 4 KiB blocks on the wire

    async def _read_encrypted(self, offset: int, length: int) -> bytes:
        assert self.cipher is not None
        first, last = offset // CRYPT_BLOCK, (offset + length - 1) // CRYPT_BLOCK
        start = first * CRYPT_BLOCK
        raw = await self._read_raw(start, (last + 1) * CRYPT_BLOCK - start)
        plain = self.cipher.decrypt(first, raw)
        return plain[offset - start : offset - start + length]

    async def _write_encrypted(self, offset: int, data: memoryview, fua: bool) -> None:
        assert self.cipher is not None
        if not len(data):
            return
        first, last = offset // CRYPT_BLOCK, (offset + len(data) - 1) // CRYPT_BLOCK
        start = first * CRYPT_BLOCK
        end = (last + 1) * CRYPT_BLOCK
        async with self._block_locks.hold(first, last):
            if start == offset and end == offset + len(data):
                plain: bytes | bytearray | memoryview = data
            else:
                # A partial block: read, decrypt, patch, re-encrypt (under the block lock).
                buf = bytearray(await self._read_encrypted(start, end - start))
                buf[offset - start : offset - start + len(data)] = data
                plain = buf
            await self._write_raw(start, memoryview(self.cipher.encrypt(first, plain)), fua)

    async def _trim_encrypted(self, offset: int, length: int, fua: bool) -> None:
        if not length:
            return
        inner_first = -(-offset // CRYPT_BLOCK)
        inner_end = (offset + length) // CRYPT_BLOCK
        if inner_end <= inner_first:
            await self._write_encrypted(offset, memoryview(bytes(length)), fua)
            return
        # Whole blocks become holes (zeros on the replicas read as plaintext zeros); the
        # partial edges are written as encrypted zeros.
        head = inner_first * CRYPT_BLOCK - offset
        tail = offset + length - inner_end * CRYPT_BLOCK
        if head:
            await self._write_encrypted(offset, memoryview(bytes(head)), fua)
        async with self._block_locks.hold(inner_first, inner_end - 1):
            start = inner_first * CRYPT_BLOCK
            await self._trim_raw(start, inner_end * CRYPT_BLOCK - start, fua)
        if tail:
            await self._write_encrypted(inner_end * CRYPT_BLOCK, memoryview(bytes(tail)), fua)

    # --- internals

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfBounds(f"range {offset}+{length} outside volume of {self.size} bytes")

    def _check_writable(self) -> None:
        """Not fenced, the lease safe, and a replica in sync to take a change."""
        self._guard()
        if not self.in_sync:
            raise NoInSyncReplica(f"volume {self.name}: no in-sync replica")

    def _guard(self) -> None:
        if self.fenced:
            raise Fenced(f"volume {self.name}: engine fenced")
        if not self._lease_ok():
            self._fence("node lease not safely renewed")
            raise Fenced(f"volume {self.name}: node lease at risk, I/O stopped")

    def _fence(self, why: str) -> None:
        if self.fenced:
            return
        self.fenced = True
        self.stop_cleaner()
        log.error("volume %s epoch %d: fenced: %s", self.name, self.epoch, why)
        if self._on_fenced is not None:
            self._fence_task = asyncio.get_running_loop().create_task(self._on_fenced())

    async def _mutate(
        self, pieces: list[Piece], call: Callable[[ReplicaAPI, list[Piece]], Awaitable[None]]
    ) -> None:
        chunks = [p.chunk for p in pieces]
        h = self.hydration
        if h is not None:
            for c in chunks:
                if c in h.pending:
                    await self.hydrate_chunk(c, early=True)
        while self._barrier is not None:
            await self._barrier.wait()
        while self.copying:
            # Re-check after every wait: another copy or clean may have gated the chunk since.
            gate = next((g for c in chunks if (g := self.copying.get(c)) is not None), None)
            if gate is None:
                break
            await gate.wait()
        serial = self._begin_write(chunks)
        try:
            await self._fan_write(lambda r: call(r, pieces), pieces, call)
        finally:
            self._end_write(serial, chunks)

    def _begin_write(self, chunks: Sequence[int]) -> int:
        """A write is under way on `chunks`: in flight until `_end_write`, so the rebuild's
        and the copy gates' waits see it. The one place a write starts, for the coroutine path
        (`_mutate`) and the fast path's `write_begin` (fastpath.py) alike."""
        serial = next(self._serial)
        self.inflight.add(serial)
        counts = self.chunk_writes
        for c in chunks:
            counts[c] = counts.get(c, 0) + 1
        return serial

    def _end_write(self, serial: int, chunks: Sequence[int]) -> None:
        """A write is over (acknowledged or failed): its chunks are dirty as of now."""
        done = time.monotonic()
        dirty_at = self._dirty_at
        counts = self.chunk_writes
        self.inflight.discard(serial)
        for c in chunks:
            dirty_at[c] = done
            left = counts[c] - 1
            if left:
                counts[c] = left
            else:
                del counts[c]
        self._write_done.set()

    async def wait_writes(self, done: Callable[[], bool]) -> None:
        """Wait until `done()` holds; re-checked each time a write completes."""
        while not done():
            self._write_done.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._write_done.wait()

    async def _fan_write(
        self,
        call: Callable[[ReplicaAPI], Awaitable[None]],
        pieces: list[Piece] | None = None,
        piece_call: Callable[[ReplicaAPI, list[Piece]], Awaitable[None]] | None = None,
    ) -> None:
        self._check_writable()
        calls: dict[str, Callable[[], Awaitable[None]]] = {
            n: functools.partial(call, r) for n, r in self.in_sync.items()
        }
        catching_up = self.rebuilding
        for n, cu in catching_up.items():
            if pieces is None or piece_call is None:
                calls[n] = functools.partial(call, cu.api)
                continue
            # Chunks not copied yet get no writes: their generation must keep telling the
            # rebuild (and a resumed one) that they still differ from the source.
            if cu.pending is None:
                continue
            todo = [p for p in pieces if p.chunk not in cu.pending]
            if todo:
                calls[n] = functools.partial(piece_call, cu.api, todo)
        _, failed = await fan_out_calls(calls)
        if failed:
            for node in [n for n in failed if n in catching_up and n not in self.in_sync]:
                # A replica that is still catching up is stale in etcd already: losing it
                # only ends its rebuild, it never fails the client's write.
                err = failed.pop(node)
                if catching_up.pop(node, None) is not None:
                    log.warning(
                        "volume %s: rebuild of replica %s aborted: %r", self.name, node, err
                    )
            if failed:
                await self._degrade(failed)
        self._guard()

    async def replicas_failed(self, failed: dict[str, BaseException]) -> None:
        """Replicas that failed outside the write path (scrub): stale, as if a write failed."""
        await self._degrade(failed)

    async def _degrade(self, failed: dict[str, BaseException]) -> None:
        # Yield once first: a request stepped inline by the NBD server (replica/inline.py) is not
        # in a task until it suspends, and recording the stale mark needs one (timeouts).
        await asyncio.sleep(0)
        if any(isinstance(e, StaleEpoch) for e in failed.values()):
            self._fence("a replica holds a newer epoch")
            raise Fenced(f"volume {self.name}: a newer epoch took over")
        async with self._degrade_lock:
            gone = sorted(n for n in failed if n in self.in_sync)
            if gone:
                for n in gone:
                    log.warning(
                        "volume %s epoch %d: replica %s failed: %r",
                        self.name,
                        self.epoch,
                        n,
                        failed[n],
                    )
                # Invariant 2: the stale mark is durable in etcd before anything is acknowledged.
                if not await self._state.mark_stale(gone):
                    raise VolumeIOError(
                        f"volume {self.name}: could not record replicas {gone} stale; write failed"
                    )
                for n in gone:
                    self.in_sync.pop(n, None)
        if not self.in_sync:
            raise NoInSyncReplica(f"volume {self.name}: every in-sync replica failed")

    async def _read_piece(self, p: Piece) -> bytes:
        h = self.hydration
        if h is not None and p.chunk in h.pending:
            return await h.read(p.chunk, p.offset, p.length)
        order = sorted(self.in_sync, key=lambda n: n != self.local_node)
        for node in order:
            try:
                return await self.in_sync[node].read(
                    self.spec.id, self.epoch, p.chunk, p.offset, p.length
                )
            except StaleEpoch:
                self._fence("a replica holds a newer epoch")
                raise Fenced(f"volume {self.name}: a newer epoch took over") from None
            except Exception as e:
                if node in self.in_sync:
                    await self._degrade({node: e})
        raise NoInSyncReplica(f"volume {self.name}: no replica could serve the read")


async def _ignore(aw: Awaitable[object]) -> None:
    await aw


async def _gather(*aws: Awaitable[None]) -> None:
    await asyncio.gather(*aws)
