"""ReplicaService over real ChunkStores on in-memory disks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from replica.api import ReplicaStats
from replica.chunkstore import ChunkStore
from replica.client import ReplicaClient
from replica.errors import NotOpen, OutOfRange, StaleEpoch, UnknownVolume
from replica.fileio import VolatileFile
from replica.server import ReplicaServer
from replica.service import ReplicaService
from tests.harness.replica_proc import TEST_KEY

CHUNK = 1 << 20


def _store(size: int, disk_id: str) -> tuple[VolatileFile, ChunkStore]:
    f = VolatileFile(size)
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id=disk_id, chunk_size=CHUNK)
    return f, ChunkStore.open(f, cluster_id="c")


async def test_placement_io_fencing_and_stats() -> None:
    f1, s1 = _store(32 << 20, "d1")
    f2, s2 = _store(64 << 20, "d2")
    svc = ReplicaService([s1, s2])
    info = await svc.open("a", 5, 8 << 20, CHUNK)
    assert (info.volume, info.size, info.chunk_size, info.epoch) == ("a", 8 << 20, CHUNK, 5)
    assert info.dirty == [] and info.unclean is False
    assert "a" in s2.volumes()  # the store with the most free space

    await svc.write("a", 5, 3, 4096, b"\x07" * 4096, seq=1)
    await svc.write("a", 5, 2, 0, memoryview(b"\x09" * 8192), seq=2, durable=True)
    assert await svc.read("a", 5, 3, 4096, 4096) == b"\x07" * 4096
    assert await svc.read("a", 5, 3, 0, 16) == bytes(16)  # never written: zeros
    await svc.flush("a", 5)
    gens = await svc.generations("a", 5)
    assert gens[3] == (5, 1) and gens[2] == (5, 2)
    reopened = await svc.open("a", 6, 8 << 20, CHUNK)
    assert reopened.epoch == 6 and reopened.dirty == [2, 3]

    for call in (
        svc.write("a", 5, 3, 4096, b"\x01" * 4096, seq=3),
        svc.read("a", 5, 3, 4096, 4096),
        svc.trim("a", 5, 3, 4096, 4096, seq=3),
        svc.flush("a", 5),
        svc.generations("a", 5),
        svc.open("a", 5, 8 << 20, CHUNK),
    ):
        with pytest.raises(StaleEpoch):
            await call
    assert await svc.read("a", 6, 3, 4096, 4096) == b"\x07" * 4096

    with pytest.raises(OutOfRange):
        await svc.write("a", 6, 3, CHUNK - 1, b"ab", seq=4)
    with pytest.raises(OutOfRange, match="chunk size"):
        await svc.open("b", 1, 8 << 20, CHUNK * 2)
    with pytest.raises(UnknownVolume):
        await svc.read("nope", 1, 0, 0, 1)

    await svc.mark_clean("a", 6, [2, 3])
    assert (await svc.open("a", 6, 8 << 20, CHUNK)).dirty == []

    data, gen, _ = await svc.read_chunk("a", 6, 3)
    assert data is not None and data[4096:8192] == b"\x07" * 4096 and gen == (5, 1)
    assert await svc.read_chunk("a", 6, 7) == (None, (0, 0), None)
    await svc.write_chunk("a", 6, 7, b"\x05" * CHUNK, (6, 9))
    assert await svc.read_chunk("a", 6, 7) == (b"\x05" * CHUNK, (6, 9), None)

    b = await svc.open("b", 1, 4 << 20, CHUNK)
    assert b.epoch == 1
    st = await svc.stats()
    s1s, s2s = s1.stats(), s2.stats()
    assert st == ReplicaStats(
        capacity=s1s.capacity + s2s.capacity,
        used=s1s.used + s2s.used,
        free=s1s.free + s2s.free,
        volumes=2,
    )
    assert svc.volume_ids() == ["a", "b"]

    with pytest.raises(StaleEpoch):  # only an engine at the volume's epoch may erase it
        await svc.delete("a", 5)
    assert svc.volume_ids() == ["a", "b"]
    await svc.delete("a", 6)
    await svc.delete("a", 6)  # unknown: no-op
    await svc.delete("never", 1)
    assert svc.volume_ids() == ["b"]
    await svc.close()
    await svc.close_stores()

    # The same disks come back with their volumes where they were.
    svc2 = ReplicaService(
        [ChunkStore.open(f1, cluster_id="c"), ChunkStore.open(f2, cluster_id="c")]
    )
    assert svc2.volume_ids() == ["b"]
    assert (await svc2.open("b", 1, 4 << 20, CHUNK)).epoch == 1
    await svc2.close_stores()


async def test_no_disks() -> None:
    svc = ReplicaService([])
    with pytest.raises(UnknownVolume):
        await svc.open("v", 1, 1 << 20, CHUNK)
    assert await svc.stats() == ReplicaStats(0, 0, 0, 0)


async def test_a_restarted_replica_refuses_io_until_opened_again() -> None:
    f, store = _store(32 << 20, "d1")
    svc = ReplicaService([store])
    await svc.open("a", 3, 4 << 20, CHUNK)
    await svc.write("a", 3, 0, 0, b"x" * 512, seq=1)
    await store.flush()
    # The process restarts: same disk, fresh service. The engine's next write must not land
    # as if nothing happened; it must open (and so learn of the restart) first.
    after = ReplicaService(
        [ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")]
    )
    with pytest.raises(NotOpen):
        await after.write("a", 3, 0, 0, b"y" * 512, seq=2)
    with pytest.raises(NotOpen):
        await after.read("a", 3, 0, 0, 512)
    info = await after.open("a", 3, 4 << 20, CHUNK)
    assert info.dirty == [0]
    assert await after.read("a", 3, 0, 0, 512) == b"x" * 512


class _CountingFile(VolatileFile):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.syncs = 0
        self.began = threading.Event()  # an fdatasync was called

    def fdatasync(self) -> None:
        self.syncs += 1
        self.began.set()
        super().fdatasync()


@pytest.mark.parametrize("sync_volume", [True, False])
async def test_durable_writes_batched_over_the_wire_are_durable_when_acknowledged(
    sync_volume: bool,
) -> None:
    # The small writes of one loop iteration leave as one "writes" frame; durable ones (a
    # --sync-writes volume's, or FUA) are applied then synced once, before the one reply.
    f = _CountingFile(32 << 20)
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    svc = ReplicaService([ChunkStore.open(f, cluster_id="c")])
    server = ReplicaServer(svc, TEST_KEY)
    await server.start("127.0.0.1", 0)
    client = ReplicaClient("127.0.0.1", server.port, key=TEST_KEY)
    try:
        await client.open("v", 1, 8 << 20, CHUNK, sync_writes=sync_volume)
        for chunk in range(4):  # each chunk's first write waits for its dirty record
            await client.write("v", 1, chunk, 0, b"\x01", seq=1 + chunk, durable=True)
        before = f.syncs
        writes = [
            client.write("v", 1, i % 4, 4096 * (1 + i), bytes([i]) * 4096, seq=10 + i, durable=True)
            for i in range(32)
        ]
        await asyncio.wait_for(asyncio.gather(*writes), 10)
        assert f.syncs - before <= 2  # one sync for the batch (not 32)
        after = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
        for i in range(32):
            assert after.read("v", 1, i % 4, 4096 * (1 + i), 4096) == bytes([i]) * 4096
    finally:
        await client.close()
        await server.close()


async def test_writes_joining_a_group_commit_without_a_coroutine_are_durable_when_it_ends() -> None:
    # The engine's write_begin for a durable write: write_now(flushed_after=True), then the
    # shared future of the next sync. Writes made while a sync runs wait for the next one.
    f = _CountingFile(32 << 20)
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    svc = ReplicaService([ChunkStore.open(f, cluster_id="c")])
    await svc.open("v", 1, 8 << 20, CHUNK, sync_writes=True)
    await svc.write("v", 1, 0, 0, b"\x01", seq=1)  # the chunk's first write: dirty record
    assert not svc.write_now("v", 1, 0, 0, b"x", seq=2)  # a sync volume's: not without a sync
    f.began.clear()
    futs = []
    for i in range(8):
        assert svc.write_now(
            "v", 1, 0, 4096 * (1 + i), bytes([i]) * 4096, seq=10 + i, flushed_after=True
        )
        futs.append(svc.flush_soon("v", 1))
    assert len({id(fut) for fut in futs}) == 1  # one group commit for all eight
    # Once the sync has begun (its fdatasync called), a write needs the next one.
    assert await asyncio.to_thread(f.began.wait, 5)
    assert svc.write_now("v", 1, 0, 0, b"\x09" * 4096, seq=20, flushed_after=True)
    late = svc.flush_soon("v", 1)
    assert late is not futs[0]
    await asyncio.wait_for(asyncio.gather(futs[0], late), 10)
    after = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
    for i in range(8):
        assert after.read("v", 1, 0, 4096 * (1 + i), 4096) == bytes([i]) * 4096
    assert after.read("v", 1, 0, 0, 4096) == b"\x09" * 4096
    with pytest.raises(StaleEpoch):
        svc.flush_soon("v", 0)
