"""In-memory volumes for the backup library tests: a SnapshotSource and a RestoreSink.

The real ones read a snapshot through the replicas and write a new volume through its engine
(pxcluster.service.core); these keep the bytes in memory so the tests can count exactly what a
backup reads and compare what a restore wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

MiB = 1 << 20


class MemVolume:
    """A volume in memory: writes bump the generation of the chunks they touch."""

    def __init__(self, name: str, size: int, chunk_size: int, volume_id: str = "") -> None:
        self.name = name
        self.volume_id = volume_id or uuid.uuid4().hex[:12]
        self.size = size
        self.chunk_size = chunk_size
        self.data = bytearray(size)
        self.generations: dict[int, tuple[int, int]] = {}
        self.seq = 0
        self.snapshots = 0

    def write(self, offset: int, payload: bytes) -> None:
        assert 0 <= offset and offset + len(payload) <= self.size
        self.data[offset : offset + len(payload)] = payload
        self.seq += 1
        first = offset // self.chunk_size
        last = (offset + len(payload) - 1) // self.chunk_size
        for c in range(first, last + 1):
            self.generations[c] = (1, self.seq)

    def fill_random(self, offset: int, length: int) -> None:
        self.write(offset, os.urandom(length))

    def snapshot(self, name: str | None = None) -> MemSnapshot:
        self.snapshots += 1
        return MemSnapshot(self, name or f"snap{self.snapshots}")


class MemSnapshot:
    """SnapshotSource over a frozen copy; records which chunks were read. A test can hold
    reads at `gate` (cleared) and learn that one started through `reading`."""

    def __init__(self, vol: MemVolume, name: str) -> None:
        self.volume = vol.name
        self.volume_id = vol.volume_id
        self.snapshot = name
        self.size = vol.size
        self.chunk_size = vol.chunk_size
        self.encrypted = False
        self.data = bytes(vol.data)
        self.gens = dict(vol.generations)
        self.reads: list[int] = []
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    async def generations(self) -> dict[int, tuple[int, int]]:
        return dict(self.gens)

    async def read_chunk(self, chunk: int) -> bytes:
        self.reading.set()
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 30)
        self.reads.append(chunk)
        start = chunk * self.chunk_size
        return self.data[start : min(start + self.chunk_size, self.size)]


class MemSink:
    """RestoreSink into a zeroed buffer of the backup's size."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.data = bytearray(size)
        self.written: list[int] = []

    async def write_chunk(self, chunk: int, data: bytes) -> None:
        start = chunk * self.chunk_size
        assert len(data) == min(self.chunk_size, self.size - start)
        self.data[start : start + len(data)] = data
        self.written.append(chunk)

    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()
