"""Creating a backup: incremental twice over, parallel, and safe against a concurrent delete.

1. Write `inprogress/<id>.json` (kept fresh by a heartbeat): no garbage collection starts
   while it is fresh, and a running one stops at its next check.
2. The previous complete backup of the same volume_id (same chunk and block size) is the
   parent. A chunk whose generation and length equal the parent's is not read: its block
   hashes are reused.
3. Every other chunk of the snapshot is read (a bounded number at once), split into blocks,
   hashed off the event loop; all-zero blocks are recorded as null. A block is uploaded only
   if the target does not hold it (a HEAD, skipped for hashes the parent already names).
4. Before the manifest: wait until no garbage collection is running, then check that every
   block the backup references exists (a collection that began before our marker was
   visible may have deleted some). Missing ones are re-read from the snapshot and uploaded.
5. Write `backups/<id>.json`, then remove the marker. Without a manifest, no backup exists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from pxcluster.backup import format as fmt
from pxcluster.backup import markers
from pxcluster.backup.errors import BackupError, BackupNotFound, BadManifest, NotFound
from pxcluster.backup.ports import SnapshotSource
from pxcluster.backup.target import Target

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
T = TypeVar("T")

UPLOAD_WINDOW = 16  # target requests in flight
CHUNK_WINDOW = 4  # chunks read and processed at once (memory: CHUNK_WINDOW x chunk size)
THREAD_MIN = 256 << 10  # hash/compress at least this much in a worker thread
GC_WAIT_TIMEOUT = 120.0
RECHECK_ROUNDS = 3


@dataclass(frozen=True)
class BackupResult:
    id: str
    volume: str
    snapshot: str
    size: int
    bytes_read: int
    bytes_uploaded: int
    blocks: int
    blocks_uploaded: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Run CPU work (hash, compress) in a thread when it is big enough to stall the loop."""
    if size >= THREAD_MIN:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def pool(n: int, items: Iterable[T], fn: Callable[[T], Awaitable[None]]) -> None:
    """Run fn over items with at most n at once; the first failure cancels the rest."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await fn(item)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(worker())
    except BaseExceptionGroup as group:
        # Callers catch typed errors (BlockMissing, ...), not groups: raise the first.
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def split_and_hash(data: bytes, block_size: int) -> list[tuple[str | None, bytes]]:
    """The chunk's blocks: (sha256 hex, or None if all zero; the block's bytes)."""
    out: list[tuple[str | None, bytes]] = []
    for off in range(0, len(data), block_size):
        block = data[off : off + block_size]
        out.append((None if fmt.is_zero(block) else fmt.sha256_hex(block), block))
    return out


async def load_manifest(target: Target, backup_id: str) -> fmt.Manifest:
    if not fmt.is_valid_id(backup_id):
        raise BackupNotFound(target.url, backup_id)
    try:
        data = await target.get(fmt.manifest_key(backup_id))
    except NotFound:
        raise BackupNotFound(target.url, backup_id) from None
    return fmt.Manifest.from_json(data, backup_id)


async def backup_ids(target: Target) -> list[str]:
    ids = [fmt.id_of_key(fmt.BACKUPS, k) for k in await target.list(fmt.BACKUPS)]
    return sorted(i for i in ids if i is not None)


async def iter_manifests(target: Target, newest_first: bool = False) -> AsyncIterator[fmt.Manifest]:
    ids = await backup_ids(target)
    for backup_id in reversed(ids) if newest_first else ids:
        try:
            yield await load_manifest(target, backup_id)
        except BadManifest as e:
            log.warning("%s: skipping %s", target, e)
        except BackupNotFound:
            continue  # deleted since the listing


async def find_parent(
    target: Target, source: SnapshotSource, block_size: int
) -> fmt.Manifest | None:
    """The latest complete backup of this volume that chunks can be reused from."""
    async for m in iter_manifests(target, newest_first=True):
        if m.volume_id == source.volume_id:
            if m.chunk_size == source.chunk_size and m.block_size == block_size:
                return m
            return None  # the volume's geometry changed: start afresh
    return None


class _Run:
    """The state of one backup being created."""

    def __init__(
        self,
        target: Target,
        source: SnapshotSource,
        backup_id: str,
        block_size: int,
        known: set[str],
        progress: Progress | None,
        total: int,
    ) -> None:
        self.target = target
        self.source = source
        self.id = backup_id
        self.block_size = block_size
        self.known = known  # digests taken to be in the target (checked again at the end)
        self.uploads: dict[str, asyncio.Future[None]] = {}
        self.sem = asyncio.Semaphore(UPLOAD_WINDOW)
        self.entries: dict[int, fmt.ChunkEntry] = {}
        self.bytes_read = 0
        self.bytes_uploaded = 0
        self.blocks_uploaded = 0
        self.progress = progress
        self.done = 0
        self.total = total

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    async def _upload(self, digest: str, block: bytes) -> None:
        key = fmt.block_key(digest)
        async with self.sem:
            if await self.target.exists(key):
                return
            blob = await off_loop(len(block), fmt.encode_block, block)
            await self.target.put(key, blob)
            self.bytes_uploaded += len(blob)
            self.blocks_uploaded += 1

    async def ensure(self, digest: str, block: bytes) -> None:
        """The block is in the target once this returns; each digest is sent at most once."""
        if digest in self.known:
            return
        fut = self.uploads.get(digest)
        if fut is None:
            fut = self.uploads[digest] = asyncio.ensure_future(self._upload(digest, block))
        await fut
        self.known.add(digest)
        self.uploads.pop(digest, None)

    async def read_chunk(self, chunk: int, generation: tuple[int, int]) -> None:
        expected = fmt.chunk_length(chunk, self.source.size, self.source.chunk_size)
        data = await self.source.read_chunk(chunk)
        if len(data) != expected:
            raise BackupError(
                f"volume {self.source.volume}: chunk {chunk} read {len(data)} bytes, "
                f"expected {expected}"
            )
        self.bytes_read += len(data)
        blocks = await off_loop(len(data), split_and_hash, data, self.block_size)
        del data
        firsts = {d: b for d, b in reversed(blocks) if d is not None}
        await asyncio.gather(*(self.ensure(d, b) for d, b in firsts.items()))
        self.entries[chunk] = fmt.ChunkEntry(generation, tuple(d for d, _ in blocks))
        self.advance(expected)

    async def missing_blocks(self) -> set[str]:
        wanted = sorted({d for e in self.entries.values() for d in e.blocks if d is not None})
        missing: set[str] = set()

        async def check(digest: str) -> None:
            if not await self.target.exists(fmt.block_key(digest)):
                missing.add(digest)

        await pool(UPLOAD_WINDOW, wanted, check)
        return missing


async def wait_for_gc(target: Target, timeout: float = GC_WAIT_TIMEOUT) -> None:
    """Until no garbage collection runs: one that is running stops once it sees our marker."""
    deadline = time.monotonic() + timeout
    while True:
        running = await markers.fresh_markers(target, fmt.GC)
        if not running:
            return
        if time.monotonic() > deadline:
            raise BackupError(
                f"{target}: {markers.describe(*running[0])} still running after {timeout:.0f}s"
            )
        await asyncio.sleep(min(1.0, markers.HEARTBEAT_EVERY / 2))


async def create_backup(
    target: Target, source: SnapshotSource, *, progress: Progress | None = None
) -> BackupResult:
    """Back up `source` (one snapshot of a volume) into `target`; see the module docstring."""
    started = time.monotonic()
    try:
        block_size = fmt.block_size_for(source.chunk_size)
    except ValueError as e:
        raise BackupError(f"volume {source.volume}: {e}") from None
    if source.size <= 0:
        raise BackupError(f"volume {source.volume}: size {source.size}")
    backup_id = fmt.new_id()
    now = time.time()
    marker = fmt.Marker(
        id=backup_id,
        kind="backup",
        volume=source.volume,
        volume_id=source.volume_id,
        started=now,
        heartbeat=now,
        owner=markers.owner(),
    )
    async with markers.LiveMarker(target, fmt.INPROGRESS, marker) as live:
        parent = await find_parent(target, source, block_size)
        generations = await source.generations()
        nchunks = fmt.chunk_count(source.size, source.chunk_size)
        bad = [c for c in generations if not 0 <= c < nchunks]
        if bad:
            raise BackupError(
                f"volume {source.volume}: chunk {bad[0]} is beyond its {nchunks} chunks"
            )

        def length(c: int) -> int:
            return fmt.chunk_length(c, source.size, source.chunk_size)

        reused: dict[int, fmt.ChunkEntry] = {}
        to_read: list[int] = []
        for c in sorted(generations):
            prev = parent.chunks.get(c) if parent is not None else None
            same_len = parent is not None and fmt.chunk_length(
                c, parent.size, parent.chunk_size
            ) == length(c)
            if prev is not None and prev.generation == tuple(generations[c]) and same_len:
                reused[c] = prev
            else:
                to_read.append(c)
        total = sum(length(c) for c in generations)
        known = parent.digests() if parent is not None else set()
        run = _Run(target, source, backup_id, block_size, known, progress, total)
        run.entries.update(reused)
        run.advance(sum(length(c) for c in reused))

        async def read(c: int) -> None:
            await run.read_chunk(c, tuple(generations[c]))  # type: ignore[arg-type]

        await pool(CHUNK_WINDOW, to_read, read)

        for attempt in range(RECHECK_ROUNDS + 1):
            await wait_for_gc(target)
            missing = await run.missing_blocks()
            if not missing:
                break
            if attempt == RECHECK_ROUNDS:
                raise BackupError(
                    f"backup {backup_id}: blocks keep vanishing from {target} "
                    f"(e.g. {fmt.block_key(min(missing))}); is a delete running elsewhere?"
                )
            log.warning(
                "backup %s: %d referenced blocks vanished (a concurrent delete); re-reading",
                backup_id,
                len(missing),
            )
            run.known -= missing
            chunks = sorted(
                c
                for c, e in run.entries.items()
                if any(d in missing for d in e.blocks if d is not None)
            )
            run.total += sum(length(c) for c in chunks)

            async def reread(c: int) -> None:
                await run.read_chunk(c, run.entries[c].generation)

            await pool(CHUNK_WINDOW, chunks, reread)
        live.check_fresh()

        entries = run.entries
        blocks = sum(1 for e in entries.values() for d in e.blocks if d is not None)
        unique = {d for e in entries.values() for d in e.blocks if d is not None}
        logical = sum(
            min(block_size, length(c) - i * block_size)
            for c, e in entries.items()
            for i, d in enumerate(e.blocks)
            if d is not None
        )
        seconds = round(time.monotonic() - started, 3)
        manifest = fmt.Manifest(
            id=backup_id,
            volume=source.volume,
            volume_id=source.volume_id,
            snapshot=source.snapshot,
            created=fmt.created_now(),
            size=source.size,
            chunk_size=source.chunk_size,
            block_size=block_size,
            encrypted=source.encrypted,
            chunks=dict(sorted(entries.items())),
            totals=fmt.Totals(
                chunks=len(entries),
                blocks=blocks,
                unique_blocks=len(unique),
                logical_bytes=logical,
                bytes_read=run.bytes_read,
                bytes_uploaded=run.bytes_uploaded,
                blocks_uploaded=run.blocks_uploaded,
                seconds=seconds,
            ),
            parent=parent.id if parent is not None else None,
        )
        await target.put(fmt.manifest_key(backup_id), manifest.to_json())
    return BackupResult(
        id=backup_id,
        volume=source.volume,
        snapshot=source.snapshot,
        size=source.size,
        bytes_read=run.bytes_read,
        bytes_uploaded=run.bytes_uploaded,
        blocks=blocks,
        blocks_uploaded=run.blocks_uploaded,
        seconds=seconds,
    )
