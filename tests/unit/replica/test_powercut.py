"""Power cuts at random points: the chunk store must keep what was flushed, return nothing that
was never written, reopen cleanly, and list as dirty every chunk that may have lost a write.

Each 512-byte sector is modelled as the list of versions written to it (version 0: zeros) and
the index of the oldest version it may still hold: the one current at the last completed flush
covering it. After the cut every sector must hold one of its acceptable versions; a sector not
at its latest version is only acceptable inside a chunk the store reports dirty.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from replica.chunkstore import ChunkStore
from replica.errors import NoSpace
from replica.fileio import SECTOR, VolatileFile

CHUNK = 64 << 10
SECTORS_PER_CHUNK = CHUNK // SECTOR
DISK = 640 << 10  # 7 slots for 8 chunks of volume space: NoSpace happens too
SIZES = {"a": 3 * CHUNK + CHUNK // 2, "b": 4 * CHUNK}
RUNS = 200


class PowerCut(Exception):
    pass


class CuttingFile(VolatileFile):
    """Loses power inside its `cut_at`-th fdatasync once armed (before that sync lands)."""

    def __init__(self, image: bytes, rng: random.Random, cut_at: int) -> None:
        super().__init__(len(image))
        super().pwrite(image, 0)
        super().fdatasync()
        self.rng = rng
        self.cut_at = cut_at
        self.armed = False
        self.seen = 0
        self.image: bytes | None = None

    def cut(self) -> bytes:
        if self.image is None:
            self.image = self.power_cut(self.rng, tear=True)
        return self.image

    def fdatasync(self) -> None:
        if self.armed and self.image is None:
            self.seen += 1
            if self.seen == self.cut_at:
                self.cut()
        if self.image is not None:
            raise PowerCut
        super().fdatasync()

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        if self.image is not None:
            raise PowerCut
        super().pwrite(data, offset)


@dataclass
class Model:
    versions: dict[tuple[str, int], list[bytes]] = field(default_factory=dict)
    oldest: dict[tuple[str, int], int] = field(default_factory=dict)
    acked: dict[tuple[str, int], int] = field(default_factory=dict)  # last returned version
    unflushed: set[tuple[str, int]] = field(default_factory=set)  # (volume, chunk)
    epoch: int = 1
    acked_epoch: dict[str, int] = field(default_factory=dict)

    def sectors(self, vol: str, chunk: int, offset: int, length: int) -> range:
        first = (chunk * CHUNK + offset) // SECTOR
        return range(first, first + length // SECTOR)

    def write(self, vol: str, chunk: int, offset: int, data: bytes) -> list[tuple[str, int]]:
        keys = []
        for n, s in enumerate(self.sectors(vol, chunk, offset, len(data))):
            self.versions.setdefault((vol, s), [bytes(SECTOR)]).append(
                data[n * SECTOR : (n + 1) * SECTOR]
            )
            keys.append((vol, s))
        return keys

    def applied(self, vol: str, chunk: int, keys: list[tuple[str, int]]) -> None:
        """A write or trim returned: from now on the chunk may hold unflushed data."""
        self.unflushed.add((vol, chunk))
        for key in keys:
            self.acked[key] = len(self.versions[key]) - 1

    def undo(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self.versions[key].pop()

    def made_durable(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self.oldest[key] = len(self.versions[key]) - 1

    def flushed(self) -> None:
        self.made_durable(list(self.versions))
        self.unflushed.clear()


def random_range(rng: random.Random, vol: str) -> tuple[int, int, int]:
    chunk = rng.randrange(-(-SIZES[vol] // CHUNK))
    span = min(CHUNK, SIZES[vol] - chunk * CHUNK) // SECTOR
    if rng.random() < 0.2:
        return chunk, 0, span * SECTOR
    first = rng.randrange(span)
    count = rng.randint(1, min(16, span - first))
    return chunk, first * SECTOR, count * SECTOR


async def run_ops(store: ChunkStore, f: CuttingFile, m: Model, rng: random.Random) -> None:
    for seq in range(1, rng.randint(5, 60)):
        vol = rng.choice(list(SIZES))
        op = rng.random()
        if op < 0.55:
            chunk, offset, length = random_range(rng, vol)
            data = rng.randbytes(length)
            durable = rng.random() < 0.1
            keys = m.write(vol, chunk, offset, data)
            try:
                await store.write(vol, m.epoch, chunk, offset, data, seq=seq, durable=durable)
            except NoSpace:
                m.undo(keys)
                continue
            m.applied(vol, chunk, keys)
            if durable:
                m.made_durable(keys)
        elif op < 0.70:
            chunk, offset, length = random_range(rng, vol)
            keys = m.write(vol, chunk, offset, bytes(length))
            allocated = chunk in store.generations(vol)
            await store.trim(vol, m.epoch, chunk, offset, length, seq=seq)
            m.applied(vol, chunk, keys)
            if not allocated:  # it already read as zeros: nothing to lose, nothing dirtied
                m.unflushed.discard((vol, chunk))
        elif op < 0.82:
            await store.flush()
            m.flushed()
        elif op < 0.87:
            await store.flush()
            m.flushed()
            await store.mark_clean(vol, m.epoch, list(range(-(-SIZES[vol] // CHUNK))))
        elif op < 0.92:
            chunk = rng.randrange(-(-SIZES[vol] // CHUNK))
            length = min(CHUNK, SIZES[vol] - chunk * CHUNK)
            data = None if rng.random() < 0.3 else rng.randbytes(length)
            keys = m.write(vol, chunk, 0, data if data is not None else bytes(length))
            allocated = chunk in store.generations(vol)
            try:
                await store.write_chunk(vol, m.epoch, chunk, data, (m.epoch, seq))
            except NoSpace:
                m.undo(keys)
                continue
            m.applied(vol, chunk, keys)
            m.made_durable(keys)
            if data is None and not allocated:
                m.unflushed.discard((vol, chunk))
        elif op < 0.96:
            await store.open_volume(vol, m.epoch + 1, SIZES[vol])
            m.epoch += 1  # every volume shares the counter; the other one lags, harmlessly
            m.acked_epoch[vol] = m.epoch
        else:
            await store.close()
            m.flushed()
            store = ChunkStore.open(f, boot_id="same boot")


def check(store: ChunkStore, m: Model, seed: int) -> None:
    vols = store.volumes()
    for vol, size in SIZES.items():
        meta = vols[vol]
        assert meta.size == size
        assert meta.epoch >= m.acked_epoch.get(vol, 1), f"seed {seed}: {vol} epoch went back"
        missing = {c for v, c in m.unflushed if v == vol} - meta.dirty
        assert not missing, f"seed {seed}: unflushed chunks {missing} of {vol} not dirty"
        for chunk in range(-(-size // CHUNK)):
            length = min(CHUNK, size - chunk * CHUNK)
            data = store.read(vol, meta.epoch, chunk, 0, length)
            for n in range(length // SECTOR):
                key = (vol, chunk * SECTORS_PER_CHUNK + n)
                versions = m.versions.get(key, [bytes(SECTOR)])
                got = data[n * SECTOR : (n + 1) * SECTOR]
                where = f"seed {seed}: {vol} chunk {chunk} sector {n}"
                oldest = m.oldest.get(key, 0)
                assert got in versions[oldest:], f"{where}: never written there"
                acked = versions[m.acked.get(key, 0)]
                if got != acked or got != versions[oldest]:
                    assert chunk in meta.dirty, f"{where}: changed since a flush, not dirty"


def observed(store: ChunkStore) -> Model:
    """A model of the disk as it reads now: the next life starts from it."""
    m = Model()
    vols = store.volumes()
    for vol, size in SIZES.items():
        meta = vols[vol]
        data = b"".join(
            store.read(vol, meta.epoch, i, 0, min(CHUNK, size - i * CHUNK))
            for i in range(-(-size // CHUNK))
        )
        for n in range(size // SECTOR):
            m.versions[(vol, n)] = [data[n * SECTOR : (n + 1) * SECTOR]]
        m.acked_epoch[vol] = meta.epoch
        m.epoch = max(m.epoch, meta.epoch)
    return m


async def one_run(seed: int, lives: int = 3) -> None:
    """Several power cuts in a row: a slot freed in one life may be reused in the next."""
    rng = random.Random(seed)
    image = bytes(DISK)
    m = Model()
    for life in range(lives):
        f = CuttingFile(image, rng, cut_at=rng.randint(1, 40))
        if life == 0:
            ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
        store = ChunkStore.open(f, cluster_id="c", boot_id=f"boot-{life}")
        for vol, size in SIZES.items():
            await store.open_volume(vol, m.epoch, size)
        f.armed = True
        try:
            await run_ops(store, f, m, rng)
        except PowerCut:
            pass
        image = f.cut()
        # Another boot: unflushed writes may be gone, and the store must say where.
        after = ChunkStore.open(
            VolatileFile.from_image(image), cluster_id="c", boot_id=f"boot-{life + 1}"
        )
        assert after.superblock.disk_id == "d"
        check(after, m, seed)
        m = observed(after)


@pytest.mark.parametrize("block", range(4))
async def test_power_cut_keeps_flushed_data_and_dirty_log(block: int) -> None:
    for seed in range(block * RUNS // 4, (block + 1) * RUNS // 4):
        await one_run(seed)
