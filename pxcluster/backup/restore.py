"""Reading a backup back: restore into a sink, and verify every block.

Both check each block fully (header, zstd, length, sha256) before it counts: a restore never
writes a block that is not exactly what the manifest names. A missing block is
`BlockMissing`, a damaged one `BackupCorrupt`, each naming the block's hash, the chunk and the
volume offset where it is used.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pxcluster.backup import format as fmt
from pxcluster.backup.engine import (
    CHUNK_WINDOW,
    UPLOAD_WINDOW,
    Progress,
    load_manifest,
    off_loop,
    pool,
)
from pxcluster.backup.errors import (
    BackupCorrupt,
    BadManifest,
    BlockMissing,
    BlockProblem,
    NotFound,
)
from pxcluster.backup.ports import RestoreSink
from pxcluster.backup.target import Target


async def fetch_block(
    target: Target, m: fmt.Manifest, digest: str, chunk: int, offset: int
) -> tuple[bytes, int]:
    """The block's verified data and the size of its object; the typed error otherwise."""
    try:
        blob = await target.get(fmt.block_key(digest))
    except NotFound:
        raise BlockMissing(
            m.id, digest, chunk, offset, f"no object {fmt.block_key(digest)}"
        ) from None
    try:
        data = await off_loop(len(blob), fmt.decode_block, blob, digest)
    except fmt.BadBlock as e:
        raise BackupCorrupt(m.id, digest, chunk, offset, str(e)) from None
    return data, len(blob)


def _check_geometry(m: fmt.Manifest, chunk: int, entry: fmt.ChunkEntry) -> int:
    length = fmt.chunk_length(chunk, m.size, m.chunk_size)
    if length <= 0 or len(entry.blocks) != -(-length // m.block_size):
        raise BadManifest(
            f"backup {m.id}: chunk {chunk} lists {len(entry.blocks)} blocks, "
            f"its {max(length, 0)} bytes need {-(-max(length, 0) // m.block_size)}"
        )
    return length


@dataclass(frozen=True)
class RestoreResult:
    id: str
    volume: str  # the backed-up volume
    snapshot: str
    size: int
    bytes_written: int
    bytes_downloaded: int
    blocks: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def restore_manifest(
    target: Target,
    m: fmt.Manifest,
    sink: RestoreSink,
    progress: Progress | None = None,
) -> RestoreResult:
    started = time.monotonic()
    sem = asyncio.Semaphore(UPLOAD_WINDOW)
    total = sum(fmt.chunk_length(c, m.size, m.chunk_size) for c in m.chunks)
    counters = {"done": 0, "written": 0, "downloaded": 0, "blocks": 0}

    async def one_block(chunk: int, i: int, digest: str | None, length: int) -> bytes:
        n = min(m.block_size, length - i * m.block_size)
        if digest is None:
            return bytes(n)
        async with sem:
            data, stored = await fetch_block(
                target, m, digest, chunk, chunk * m.chunk_size + i * m.block_size
            )
        if len(data) != n:
            raise BackupCorrupt(
                m.id,
                digest,
                chunk,
                chunk * m.chunk_size + i * m.block_size,
                f"{len(data)} bytes where the volume has {n}",
            )
        counters["downloaded"] += stored
        counters["blocks"] += 1
        return data

    async def one_chunk(chunk: int) -> None:
        entry = m.chunks[chunk]
        length = _check_geometry(m, chunk, entry)
        if any(d is not None for d in entry.blocks):
            parts = await asyncio.gather(
                *(one_block(chunk, i, d, length) for i, d in enumerate(entry.blocks))
            )
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            await sink.write_chunk(chunk, data)
            counters["written"] += length
        counters["done"] += length
        if progress is not None:
            progress(counters["done"], total)

    await pool(CHUNK_WINDOW, sorted(m.chunks), one_chunk)
    return RestoreResult(
        id=m.id,
        volume=m.volume,
        snapshot=m.snapshot,
        size=m.size,
        bytes_written=counters["written"],
        bytes_downloaded=counters["downloaded"],
        blocks=counters["blocks"],
        seconds=round(time.monotonic() - started, 3),
    )


async def restore_backup(
    target: Target, backup_id: str, sink: RestoreSink, progress: Progress | None = None
) -> RestoreResult:
    """Write backup `backup_id` into `sink`, chunk by chunk; chunks the backup does not list
    (and all-zero ones) are not written. On a missing or corrupt block: BlockMissing or
    BackupCorrupt naming it, with part of the volume already written (the caller removes it)."""
    return await restore_manifest(target, await load_manifest(target, backup_id), sink, progress)


@dataclass
class VerifyReport:
    id: str
    volume: str
    blocks: int  # distinct blocks checked
    bytes_checked: int = 0
    problems: list[BlockProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "volume": self.volume,
            "ok": self.ok,
            "blocks": self.blocks,
            "bytes_checked": self.bytes_checked,
            "missing": [p.to_dict() for p in self.problems if isinstance(p, BlockMissing)],
            "corrupt": [p.to_dict() for p in self.problems if isinstance(p, BackupCorrupt)],
            "seconds": self.seconds,
        }

    def error(self) -> BlockProblem | None:
        """The first problem (lowest volume offset), as the typed error to raise; its message
        says how many more there are."""
        if not self.problems:
            return None
        first = self.problems[0]
        more = len(self.problems) - 1
        detail = first.detail + (f"; {more} more bad blocks" if more else "")
        return type(first)(first.backup_id, first.digest, first.chunk, first.offset, detail)


async def verify_backup(target: Target, backup_id: str) -> VerifyReport:
    """Read every distinct block of the backup and check it; every problem is in the report
    (`report.error()` is the first as a typed error)."""
    started = time.monotonic()
    m = await load_manifest(target, backup_id)
    for chunk, entry in m.chunks.items():
        _check_geometry(m, chunk, entry)
    where = m.locations()
    report = VerifyReport(id=m.id, volume=m.volume, blocks=len(where))

    async def check(digest: str) -> None:
        chunk, offset = where[digest]
        try:
            data, _ = await fetch_block(target, m, digest, chunk, offset)
            report.bytes_checked += len(data)
        except BlockProblem as e:
            report.problems.append(e)

    await pool(UPLOAD_WINDOW, sorted(where), check)
    report.problems.sort(key=lambda p: (p.offset, p.digest))
    report.seconds = round(time.monotonic() - started, 3)
    return report
