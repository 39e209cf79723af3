"""The seam between backups and the cluster: what a backup reads and what a restore writes.

The service implements these over a real volume (a snapshot read through the replicas; a new
volume written through its engine); the library tests implement them in memory.
"""

from __future__ import annotations

import contextlib
from typing import Protocol


class SnapshotSource(Protocol):
    """A stable, read-only view of one snapshot of a volume."""

    volume: str  # volume name
    volume_id: str
    snapshot: str  # snapshot name
    size: int
    chunk_size: int
    encrypted: bool

    async def generations(self) -> dict[int, tuple[int, int]]:
        """Chunks allocated in the snapshot view -> generation (epoch, seq).
        Chunks absent here read as zeros."""
        ...

    async def read_chunk(self, chunk: int) -> bytes:
        """The whole chunk: len = min(chunk_size, size - chunk * chunk_size)."""
        ...


class RestoreSink(Protocol):
    async def write_chunk(self, chunk: int, data: bytes) -> None:
        """Write a whole chunk (length as for read_chunk). All-zero chunks may be skipped:
        a new volume reads zeros where nothing was written."""
        ...


class BackupHooks(Protocol):
    """The two Service methods the `backup` commands use (pxcluster.service.core.Service)."""

    def backup_source(
        self, volume: str, snapshot: str | None
    ) -> contextlib.AbstractAsyncContextManager[SnapshotSource]:
        """A source over `snapshot` of `volume`; None: a temporary snapshot, removed on exit."""
        ...

    def restore_sink(
        self, name: str, size: int, chunk_size: int, repl: int | None, encrypted: bool
    ) -> contextlib.AbstractAsyncContextManager[RestoreSink]:
        """Creates volume `name`; if the body raises, deletes it again before re-raising."""
        ...
