"""The one interface through which a volume engine talks to a replica.

`replica.service.ReplicaService` (in-process, the replica on the engine's own node) and
`replica.client.ReplicaClient` (a remote node, over replica/protocol.py) implement it with the
same methods and the same typed errors, so the engine's write path has no `if local:` branch.
Each also has a fast path, in a Protocol of its own so that a reader (and mypy) can follow a
write from the NBD socket to the disk: the in-process service is a `LocalFastPath`
(`read_now`, `write_now`, `flush_soon`: the same calls done at once, no coroutine) and the
client a `RemoteFastPath` (`ready_to_send`, `write_nowait`, `write_outcome`: a write sent now,
answered through a future). The engine classifies its replicas once, when it is made, and asks
the fast path first for the plain request; it falls back to this interface.

Addressing is per chunk: the engine splits volume I/O at chunk boundaries. `chunk` is the chunk
index inside the volume, `offset` a byte offset inside that chunk. Every call that touches a
volume carries the caller's `epoch`; a replica refuses an epoch below the highest it was opened
with (StaleEpoch) and changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

Generation = tuple[int, int]  # (epoch, seq) of a chunk's last write; (0, 0) = never written


class ChunkCopy(NamedTuple):
    """One layer's entry for a chunk, exactly as a rebuild copies it."""

    data: bytes | None  # None: no entry in this layer
    gen: Generation
    present: bytes | None = None  # bitmask of the 4 KiB blocks the entry holds; None: all


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    name: str
    created: float


@dataclass(frozen=True)
class VolumeInfo:
    volume: str
    size: int
    chunk_size: int
    epoch: int  # highest epoch the volume has been opened with, durable
    dirty: list[int]  # chunks written and not yet marked clean
    unclean: bool  # the host restarted without a clean shutdown since these chunks were dirtied


@dataclass(frozen=True)
class ReplicaStats:
    capacity: int
    used: int
    free: int
    volumes: int


class ReplicaAPI(Protocol):
    async def open(
        self, volume: str, epoch: int, size: int, chunk_size: int, *, sync_writes: bool = False
    ) -> VolumeInfo:
        """Create the volume here if unknown, raise its durable epoch to `epoch` (StaleEpoch if
        lower), grow it if `size` is larger. Returns its state after the open."""
        ...

    async def write(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: bytes | memoryview,
        *,
        seq: int,
        durable: bool = False,
    ) -> None:
        """Apply a write. With `durable` (FUA, or a sync-writes volume) return only once it is on
        stable storage. The chunk is in the durable dirty log before its data is touched."""
        ...

    async def read(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, snapshot: str = ""
    ) -> bytes:
        """The volume's current data, or with `snapshot` (an id) that snapshot's: snapshots are
        immutable, so that read needs neither the current epoch nor an open."""
        ...

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        """Zero a range; a whole chunk trimmed is freed."""
        ...

    async def flush(self, volume: str, epoch: int) -> None:
        """Return once every write applied before the call is durable (group commit)."""
        ...

    async def generations(
        self, volume: str, epoch: int, *, layer: str = ""
    ) -> dict[int, Generation]:
        """The chunks of one layer (the head by default, else a snapshot id)."""
        ...

    async def snapshot_generations(self, volume: str, snap_id: str) -> dict[int, Generation]:
        """Every chunk allocated in the snapshot's view, with its generation (for backups)."""
        ...

    async def snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's snapshots here, oldest first."""
        ...

    async def snapshot_create(
        self, volume: str, epoch: int, snap_id: str, name: str, created: float
    ) -> None:
        """Freeze the current data into a snapshot, durably (idempotent)."""
        ...

    async def snapshot_delete(self, volume: str, epoch: int, snap_id: str) -> None:
        """Drop a snapshot; what only it held is freed; every other view is unchanged."""
        ...

    async def revert(self, volume: str, epoch: int, snap_id: str) -> None:
        """Discard the data written since the snapshot and every newer snapshot."""
        ...

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        """Durably drop chunks from the dirty log (only after they are flushed everywhere)."""
        ...

    async def read_chunk(
        self, volume: str, epoch: int, chunk: int, *, layer: str = ""
    ) -> ChunkCopy:
        """One layer's entry for a chunk (rebuild/reconcile); data None when it has none."""
        ...

    async def write_chunk(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | memoryview | None,
        generation: Generation,
        *,
        present: bytes | None = None,
        layer: str = "",
    ) -> None:
        """Install a whole head chunk (None frees it) with the given generation and block
        presence, durably; with `layer`, rewrite that snapshot's entry in place (repair)."""
        ...

    async def chunk_digest(self, volume: str, epoch: int, chunk: int, *, layer: str = "") -> bytes:
        """A digest of one layer's entry for a chunk (b"" for none); ChecksumMismatch when the
        replica's copy is corrupt. Scrub compares these across replicas."""
        ...

    async def delete(self, volume: str, epoch: int) -> None:
        """Free every chunk of the volume and forget it. Unknown volume: no error. An epoch
        below the volume's is refused (StaleEpoch): only the current engine may erase it."""
        ...

    async def stats(self) -> ReplicaStats: ...

    async def close(self) -> None:
        """Close the connection/handle (not the volume)."""
        ...


@runtime_checkable
class LocalFastPath(Protocol):
    """The in-process replica's calls done at once. `write_now` returns False, with nothing
    changed, when the write would have to wait (then the engine calls `write`)."""

    def read_now(self, volume: str, epoch: int, chunk: int, offset: int, length: int) -> bytes: ...

    def write_now(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: bytes | memoryview,
        *,
        seq: int,
        flushed_after: bool = False,
    ) -> bool: ...

    def flush_soon(self, volume: str, epoch: int) -> asyncio.Future[None]:
        """The future of the first sync covering everything applied so far (group commit)."""
        ...


@runtime_checkable
class RemoteFastPath(Protocol):
    """A remote replica's write sent at once: `write_nowait` on a client `ready_to_send`
    returns the future of its reply, and `write_outcome` raises what `write` would have."""

    def ready_to_send(self) -> bool: ...

    def write_nowait(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: memoryview,
        *,
        seq: int,
        durable: bool = False,
    ) -> asyncio.Future[Any]: ...

    @staticmethod
    def write_outcome(fut: asyncio.Future[Any]) -> None: ...
