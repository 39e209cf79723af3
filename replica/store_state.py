"""What the parts of a chunk store share: the disk, the volume map and the journal's buffer.

`f`, `sb`, `meta` and `csums` stay the same objects for the store's life. `records` and
`gen_dirty` are taken (replaced) by every sync: reach them through the state, never keep them.
"""

from __future__ import annotations

from replica.chunkmeta import ChunkState, Meta, Record, VolState
from replica.csumpages import ChecksumPages
from replica.errors import NoSpace, ReplicaError, StaleEpoch, UnknownVolume
from replica.fileio import BlockFile
from replica.ondisk import META_BYTES_PER_NAME, META_BYTES_PER_SLOT, Superblock

__all__ = ["StoreState"]


class StoreState:
    def __init__(self, f: BlockFile, sb: Superblock, meta: Meta) -> None:
        self.f = f
        self.sb = sb
        self.meta = meta  # the volume map, changed in memory and journaled
        self.csums = ChecksumPages(f, sb)
        self.records: list[Record] = []  # journal records buffered for the next sync
        # Head chunks whose generation (and block presence) the next sync journals.
        self.gen_dirty: set[tuple[str, int]] = set()
        self.closed = False

    def lookup(self, volume: str) -> VolState:
        self.check_open()
        v = self.meta.vols.get(volume)
        if v is None:
            raise UnknownVolume(f"unknown volume {volume!r}")
        return v

    def volume(self, volume: str, epoch: int) -> VolState:
        v = self.lookup(volume)
        if epoch < v.epoch:
            raise StaleEpoch(f"volume {volume!r}: epoch {epoch} < {v.epoch}")
        return v

    def check_open(self) -> None:
        if self.closed:
            raise ReplicaError("chunk store is closed")

    def check_meta_room(self, what: str) -> None:
        """Refuse a new volume or snapshot the metadata checkpoint could not hold.

        The metadata area has a fixed budget per chunk slot (every chunk entry has a slot)
        plus a base; volumes and snapshots live in the base. Refused here, before anything
        is recorded, because a checkpoint that no longer fits would leave the store unable to
        write one, and so to open, ever again."""
        names = len(self.meta.vols) + sum(len(v.snaps) for v in self.meta.vols.values())
        room = self.sb.meta_size - self.sb.slots * META_BYTES_PER_SLOT
        if (names + 1) * META_BYTES_PER_NAME > room:
            raise NoSpace(
                f"{what!r}: this disk's metadata holds at most {room // META_BYTES_PER_NAME} "
                "volumes and snapshots"
            )

    def quarantine(self, volume: str, chunk: int, c: ChunkState) -> None:
        """An entry's data failed its check: a head entry's generation drops to (0, 0), so a
        rebuild copies the chunk again."""
        v = self.meta.vols.get(volume)
        if v is not None and v.chunks.get(chunk) is c and (c.epoch, c.seq) != (0, 0):
            c.epoch, c.seq = 0, 0
            self.gen_dirty.add((volume, chunk))
