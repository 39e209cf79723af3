"""The one interface through which a volume engine talks to a replica.

`replica.service.ReplicaService` (in-process, the replica on the engine's own node) and
`replica.client.ReplicaClient` (a remote node, over replica/protocol.py) implement it with the
same methods and the same typed errors, so the engine's write path has no `if local:` branch.

Addressing is per chunk: the engine splits volume I/O at chunk boundaries. `chunk` is the chunk
index inside the volume, `offset` a byte offset inside that chunk. Every call that touches a
volume carries the caller's `epoch`; a replica refuses an epoch below the highest it was opened
with (StaleEpoch) and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Generation = tuple[int, int]  # (epoch, seq) of a chunk's last write; (0, 0) = never written


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
        self, volume: str, epoch: int, chunk: int, offset: int, length: int
    ) -> bytes: ...

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        """Zero a range; a whole chunk trimmed is freed."""
        ...

    async def flush(self, volume: str, epoch: int) -> None:
        """Return once every write applied before the call is durable (group commit)."""
        ...

    async def generations(self, volume: str, epoch: int) -> dict[int, Generation]: ...

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        """Durably drop chunks from the dirty log (only after they are flushed everywhere)."""
        ...

    async def read_chunk(
        self, volume: str, epoch: int, chunk: int
    ) -> tuple[bytes | None, Generation]:
        """Whole chunk for rebuild/reconcile; None when it is not allocated (reads as zeros)."""
        ...

    async def write_chunk(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | memoryview | None,
        generation: Generation,
    ) -> None:
        """Install a whole chunk (None frees it) with the given generation, durably."""
        ...

    async def delete(self, volume: str) -> None:
        """Free every chunk of the volume and forget it. Unknown volume: no error."""
        ...

    async def stats(self) -> ReplicaStats: ...

    async def close(self) -> None:
        """Close the connection/handle (not the volume)."""
        ...
