"""The chunk store's metadata: what a checkpoint holds and what journal records change.

Journal record bodies are msgpack lists led by a one-letter kind:

    V name size chunk_size epoch sync_writes   volume created or changed
    D name chunk slot|None                      chunk dirty (and, with a slot, allocated)
    G name chunk epoch seq                      generation of the chunk's last write
    F name chunk                                chunk's slot freed
    C name [chunks]                             chunks marked clean
    X name                                      volume deleted

`Meta.apply` is the only interpreter of these, used by replay; the live store changes its
`Meta` directly and logs the same record, so replaying the log rebuilds the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Record = list[Any]


@dataclass
class ChunkState:
    slot: int
    epoch: int = 0
    seq: int = 0


@dataclass
class VolState:
    size: int
    chunk_size: int
    epoch: int
    sync_writes: bool
    dirty: set[int] = field(default_factory=set)
    # Dirty chunks seen across a host crash: their unflushed writes may be gone.
    suspect: set[int] = field(default_factory=set)
    chunks: dict[int, ChunkState] = field(default_factory=dict)
    # Not persisted. Chunks whose dirty record is durable: writes to them may go straight to
    # the disk. A subset of `dirty`; after a restart every dirty chunk is ready.
    ready: set[int] = field(default_factory=set)
    # Not persisted. Chunk -> the sync number that will cover its last write; a chunk must
    # not be marked clean before that sync completed.
    unsynced: dict[int, int] = field(default_factory=dict)

    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_len(self, chunk: int) -> int:
        return min(self.chunk_size, self.size - chunk * self.chunk_size)


def rec_volume(name: str, v: VolState) -> Record:
    return ["V", name, v.size, v.chunk_size, v.epoch, v.sync_writes]


def rec_dirty(name: str, chunk: int, slot: int | None) -> Record:
    return ["D", name, chunk, slot]


def rec_generation(name: str, chunk: int, c: ChunkState) -> Record:
    return ["G", name, chunk, c.epoch, c.seq]


def rec_free(name: str, chunk: int) -> Record:
    return ["F", name, chunk]


def rec_clean(name: str, chunks: list[int]) -> Record:
    return ["C", name, chunks]


def rec_delete(name: str) -> Record:
    return ["X", name]


@dataclass
class Meta:
    vols: dict[str, VolState] = field(default_factory=dict)
    clean: bool = True  # the checkpoint was written by close()
    boot_id: str = ""

    def apply(self, rec: Record) -> None:
        kind, name = rec[0], rec[1]
        if kind == "V":
            _, _, size, chunk_size, epoch, sync = rec
            v = self.vols.get(name)
            if v is None:
                self.vols[name] = VolState(size, chunk_size, epoch, sync)
            else:
                v.size, v.chunk_size, v.epoch, v.sync_writes = size, chunk_size, epoch, sync
            return
        if kind == "X":
            self.vols.pop(name, None)
            return
        v = self.vols.get(name)
        if v is None:
            return
        if kind == "D":
            v.dirty.add(rec[2])
            if rec[3] is not None:
                v.chunks[rec[2]] = ChunkState(rec[3])
        elif kind == "G":
            c = v.chunks.get(rec[2])
            if c is not None:
                c.epoch, c.seq = rec[3], rec[4]
        elif kind == "F":
            v.chunks.pop(rec[2], None)
        elif kind == "C":
            v.dirty.difference_update(rec[2])
            v.suspect.difference_update(rec[2])
        else:
            raise ValueError(f"unknown journal record kind {kind!r}")

    def used_slots(self) -> set[int]:
        return {c.slot for v in self.vols.values() for c in v.chunks.values()}

    def to_body(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "boot_id": self.boot_id,
            "vols": {
                name: {
                    "size": v.size,
                    "chunk_size": v.chunk_size,
                    "epoch": v.epoch,
                    "sync_writes": v.sync_writes,
                    "dirty": sorted(v.dirty),
                    "suspect": sorted(v.suspect),
                    "chunks": {i: [c.slot, c.epoch, c.seq] for i, c in v.chunks.items()},
                }
                for name, v in self.vols.items()
            },
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Meta:
        vols = {
            name: VolState(
                size=d["size"],
                chunk_size=d["chunk_size"],
                epoch=d["epoch"],
                sync_writes=d["sync_writes"],
                dirty=set(d["dirty"]),
                suspect=set(d["suspect"]),
                chunks={int(i): ChunkState(*c) for i, c in d["chunks"].items()},
            )
            for name, d in body["vols"].items()
        }
        return cls(vols=vols, clean=body["clean"], boot_id=body["boot_id"])
