"""The chunk store's metadata: what a checkpoint holds and what journal records change.

Journal record bodies are msgpack lists led by a one-letter kind:

    V name size chunk_size epoch sync_writes   volume created or changed
    D name chunk slot|None [partial]            chunk dirty (and, with a slot, allocated in the
                                                head layer; partial: no block present yet)
    G name chunk epoch seq [present]            generation (and block presence) of a head chunk
    F name chunk                                head chunk's slot freed
    C name [chunks]                             chunks marked clean
    X name                                      volume deleted
    S name snap_id snap_name created            head frozen into a new snapshot layer
    K name snap_id chunk                        chunk moved from that snapshot to the layer above
    P name layer chunk present                  blocks added to a chunk's presence (layer "" =
                                                head), after their data was copied there
    R name snap_id                              snapshot layer dropped (its slots freed)
    T name snap_id                              revert: head and newer layers dropped

Layers (snapshots oldest first, then the head): a chunk's block is read from the topmost layer
whose chunk holds it. `present` is a bitmask of 4 KiB blocks, None meaning every block (a chunk
allocated when no lower layer held it: its unwritten blocks are the slot's zeros).

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
    present: int | None = None  # bitmask of blocks held in this layer; None: all

    def has(self, block: int) -> bool:
        return self.present is None or bool(self.present >> block & 1)


@dataclass
class SnapLayer:
    id: str
    name: str
    created: float
    chunks: dict[int, ChunkState] = field(default_factory=dict)


def mask_to_bytes(mask: int | None) -> bytes | None:
    return None if mask is None else mask.to_bytes(-(-max(mask.bit_length(), 1) // 8), "little")


def mask_from_bytes(raw: bytes | None) -> int | None:
    return None if raw is None else int.from_bytes(raw, "little")


@dataclass
class VolState:
    size: int
    chunk_size: int
    epoch: int
    sync_writes: bool
    dirty: set[int] = field(default_factory=set)
    # Dirty chunks seen across a host crash: their unflushed writes may be gone.
    suspect: set[int] = field(default_factory=set)
    chunks: dict[int, ChunkState] = field(default_factory=dict)  # the head layer
    snaps: list[SnapLayer] = field(default_factory=list)  # oldest first
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

    def snap_index(self, snap_id: str) -> int:
        for i, layer in enumerate(self.snaps):
            if layer.id == snap_id:
                return i
        return -1

    def layer_chunks(self, snap_id: str) -> dict[int, ChunkState]:
        """The chunks of a snapshot layer ("" = the head). KeyError for an unknown id."""
        if not snap_id:
            return self.chunks
        i = self.snap_index(snap_id)
        if i < 0:
            raise KeyError(snap_id)
        return self.snaps[i].chunks

    def above(self, i: int) -> dict[int, ChunkState]:
        return self.snaps[i + 1].chunks if i + 1 < len(self.snaps) else self.chunks

    def stack(self, chunk: int, top: int | None = None) -> list[ChunkState]:
        """The chunk's entries, topmost first, from snapshot `top` down (None: from the head)."""
        layers = [layer.chunks for layer in self.snaps]
        if top is None:
            layers.append(self.chunks)
        else:
            layers = layers[: top + 1]
        return [c for chunks in reversed(layers) if (c := chunks.get(chunk)) is not None]

    def in_lower_layer(self, chunk: int) -> bool:
        return any(chunk in layer.chunks for layer in self.snaps)


def rec_volume(name: str, v: VolState) -> Record:
    return ["V", name, v.size, v.chunk_size, v.epoch, v.sync_writes]


def rec_dirty(name: str, chunk: int, slot: int | None, partial: bool = False) -> Record:
    return ["D", name, chunk, slot, partial]


def rec_generation(name: str, chunk: int, c: ChunkState) -> Record:
    return ["G", name, chunk, c.epoch, c.seq, mask_to_bytes(c.present)]


def rec_snapshot(name: str, snap: SnapLayer) -> Record:
    return ["S", name, snap.id, snap.name, snap.created]


def rec_move_up(name: str, snap_id: str, chunk: int) -> Record:
    return ["K", name, snap_id, chunk]


def rec_present(name: str, layer: str, chunk: int, added: int) -> Record:
    return ["P", name, layer, chunk, mask_to_bytes(added)]


def rec_drop_layer(name: str, snap_id: str) -> Record:
    return ["R", name, snap_id]


def rec_revert(name: str, snap_id: str) -> Record:
    return ["T", name, snap_id]


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
                partial = len(rec) > 4 and rec[4]
                v.chunks[rec[2]] = ChunkState(rec[3], present=0 if partial else None)
        elif kind == "G":
            c = v.chunks.get(rec[2])
            if c is not None:
                c.epoch, c.seq = rec[3], rec[4]
                if len(rec) > 5:
                    c.present = mask_from_bytes(rec[5])
        elif kind == "S":
            v.snaps.append(SnapLayer(rec[2], rec[3], rec[4], v.chunks))
            v.chunks = {}
        elif kind == "K":
            i = v.snap_index(rec[2])
            if i >= 0 and (c := v.snaps[i].chunks.pop(rec[3], None)) is not None:
                v.above(i).setdefault(rec[3], c)
        elif kind == "P":
            try:
                c = v.layer_chunks(rec[2]).get(rec[3])
            except KeyError:
                c = None
            if c is not None and c.present is not None:
                c.present |= mask_from_bytes(rec[4]) or 0
        elif kind == "R":
            i = v.snap_index(rec[2])
            if i >= 0:
                del v.snaps[i]
        elif kind == "T":
            i = v.snap_index(rec[2])
            if i >= 0:
                del v.snaps[i + 1 :]
                v.chunks = {}
        elif kind == "F":
            v.chunks.pop(rec[2], None)
        elif kind == "C":
            v.dirty.difference_update(rec[2])
            v.suspect.difference_update(rec[2])
        else:
            raise ValueError(f"unknown journal record kind {kind!r}")

    def used_slots(self) -> set[int]:
        return {c.slot for v in self.vols.values() for c in _all_chunks(v)}

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
                    "chunks": _chunks_body(v.chunks),
                    "snaps": [[s.id, s.name, s.created, _chunks_body(s.chunks)] for s in v.snaps],
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
                chunks=_chunks_from(d["chunks"]),
                snaps=[SnapLayer(i, n, t, _chunks_from(c)) for i, n, t, c in d.get("snaps", [])],
            )
            for name, d in body["vols"].items()
        }
        return cls(vols=vols, clean=body["clean"], boot_id=body["boot_id"])


def _all_chunks(v: VolState) -> list[ChunkState]:
    return [*v.chunks.values(), *(c for s in v.snaps for c in s.chunks.values())]


def _chunks_body(chunks: dict[int, ChunkState]) -> dict[int, list[Any]]:
    return {i: [c.slot, c.epoch, c.seq, mask_to_bytes(c.present)] for i, c in chunks.items()}


def _chunks_from(body: dict[Any, list[Any]]) -> dict[int, ChunkState]:
    out = {}
    for i, c in body.items():
        slot, epoch, seq = c[:3]
        present = mask_from_bytes(c[3]) if len(c) > 3 else None
        out[int(i)] = ChunkState(slot, epoch, seq, present)
    return out
