"""The volume engine against in-memory replicas (a unit test may fake its collaborators)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pxcluster.engine import volume as volume_module
from pxcluster.engine.errors import Fenced, NoInSyncReplica, OutOfBounds, VolumeIOError
from pxcluster.engine.reconcile import choose_source
from pxcluster.engine.volume import VolumeEngine, VolumeSpec, split
from replica.api import ChunkCopy, Generation, ReplicaStats, SnapshotInfo, VolumeInfo
from replica.errors import ReplicaUnavailable, StaleEpoch

CHUNK = 64 << 10


class FakeReplica:
    """Keeps chunks in memory; can be told to fail, to stall, or to hold a newer epoch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.chunks: dict[int, bytearray] = {}
        self.gens: dict[int, Generation] = {}
        self.dirty: set[int] = set()
        self.durable: dict[int, bytes] = {}
        self.epoch = 0
        self.fail = False
        self.gate: asyncio.Event | None = None
        self.at_gate = asyncio.Event()  # set once a write waits on `gate`
        self.unclean = False

    def _check(self, epoch: int) -> None:
        if self.fail:
            raise ReplicaUnavailable(f"{self.name} down")
        if epoch < self.epoch:
            raise StaleEpoch(f"{epoch} < {self.epoch}")

    async def open(
        self, volume: str, epoch: int, size: int, chunk_size: int, *, sync_writes: bool = False
    ) -> VolumeInfo:
        self._check(epoch)
        self.epoch = epoch
        return VolumeInfo(volume, size, chunk_size, epoch, sorted(self.dirty), self.unclean)

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
        self._check(epoch)
        if self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        self._check(epoch)
        buf = self.chunks.setdefault(chunk, bytearray(CHUNK))
        buf[offset : offset + len(data)] = data
        self.gens[chunk] = (epoch, seq)
        self.dirty.add(chunk)
        if durable:
            self.durable[chunk] = bytes(buf)

    async def read(self, volume: str, epoch: int, chunk: int, offset: int, length: int) -> bytes:
        self._check(epoch)
        return bytes(self.chunks.get(chunk, bytearray(CHUNK))[offset : offset + length])

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        await self.write(volume, epoch, chunk, offset, bytes(length), seq=seq)

    async def flush(self, volume: str, epoch: int) -> None:
        self._check(epoch)
        self.durable.update({c: bytes(b) for c, b in self.chunks.items()})

    async def generations(self, volume: str, epoch: int) -> dict[int, Generation]:
        self._check(epoch)
        return dict(self.gens)

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        self._check(epoch)
        self.dirty -= set(chunks)

    async def read_chunk(
        self, volume: str, epoch: int, chunk: int, *, layer: str = ""
    ) -> ChunkCopy:
        self._check(epoch)
        data = self.chunks.get(chunk)
        return ChunkCopy(None if data is None else bytes(data), self.gens.get(chunk, (0, 0)))

    async def snapshots(self, volume: str) -> list[SnapshotInfo]:
        return []

    async def write_chunk(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | None,
        generation: Generation,
        *,
        present: bytes | None = None,
        layer: str = "",
    ) -> None:
        self._check(epoch)
        if data is None:
            self.chunks.pop(chunk, None)
        else:
            self.chunks[chunk] = bytearray(data)
        self.gens[chunk] = generation

    async def delete(self, volume: str) -> None:
        self.chunks.clear()

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(0, 0, 0, 0)

    async def close(self) -> None:
        pass


class Recorder:
    def __init__(self, succeed: bool = True) -> None:
        self.succeed = succeed
        self.calls: list[list[str]] = []

    async def mark_stale(self, nodes: list[str]) -> bool:
        self.calls.append(nodes)
        return self.succeed


def make(
    n: int = 3,
    *,
    lease: list[bool] | None = None,
    state: Recorder | None = None,
    sync: bool = False,
) -> tuple[VolumeEngine, dict[str, FakeReplica], Recorder]:
    reps = {f"r{i}": FakeReplica(f"r{i}") for i in range(n)}
    rec = state or Recorder()
    ok = lease if lease is not None else [True]
    eng = VolumeEngine(
        VolumeSpec("vid", "vol", 8 * CHUNK, CHUNK, sync),
        5,
        dict(reps),  # type: ignore[arg-type]
        local_node="r0",
        state=rec,
        lease_ok=lambda: ok[0],
    )
    return eng, reps, rec


def test_split_at_chunk_boundaries() -> None:
    pieces = list(split(CHUNK - 10, 30, CHUNK))
    assert [(p.chunk, p.offset, p.start, p.length) for p in pieces] == [
        (0, CHUNK - 10, 0, 10),
        (1, 0, 10, 20),
    ]


async def test_write_acknowledged_only_when_every_replica_holds_it() -> None:
    eng, reps, _ = make()
    await eng.open()
    reps["r2"].gate = asyncio.Event()
    task = asyncio.create_task(eng.write(100, memoryview(b"abc"), False))
    # r2 waits at its gate; once the loop has nothing else ready to run, the engine has done
    # all it would without r2: it must not have acknowledged.
    await asyncio.wait_for(reps["r2"].at_gate.wait(), 5)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()  # r2 has not applied it yet: no ack
    assert reps["r0"].chunks[0][100:103] == b"abc" and reps["r1"].chunks[0][100:103] == b"abc"
    reps["r2"].gate.set()
    await asyncio.wait_for(task, 1)
    assert all(r.chunks[0][100:103] == b"abc" for r in reps.values())


async def test_write_across_chunks_and_read_back() -> None:
    eng, reps, _ = make()
    await eng.open()
    data = bytes(range(256)) * 4
    await eng.write(CHUNK - 500, memoryview(data), False)
    assert await eng.read(CHUNK - 500, len(data)) == data
    assert reps["r1"].chunks[1][:524] == data[500:]


async def test_fua_and_flush_make_writes_durable_everywhere() -> None:
    eng, reps, _ = make()
    await eng.open()
    await eng.write(0, memoryview(b"x" * 10), True)
    assert all(r.durable[0][:10] == b"x" * 10 for r in reps.values())
    await eng.write(CHUNK, memoryview(b"y" * 10), False)
    assert all(1 not in r.durable for r in reps.values())
    await eng.flush()
    assert all(r.durable[1][:10] == b"y" * 10 for r in reps.values())


async def test_failed_replica_is_marked_stale_before_the_ack() -> None:
    eng, reps, rec = make()
    await eng.open()
    reps["r1"].fail = True
    await eng.write(0, memoryview(b"z"), False)
    assert rec.calls == [["r1"]]
    assert sorted(eng.in_sync) == ["r0", "r2"]
    await eng.write(1, memoryview(b"z"), False)  # r1 is no longer written to
    assert rec.calls == [["r1"]]


async def test_write_fails_when_stale_mark_cannot_be_recorded() -> None:
    eng, reps, _rec = make(state=Recorder(succeed=False))
    await eng.open()
    reps["r1"].fail = True
    with pytest.raises(VolumeIOError):
        await eng.write(0, memoryview(b"z"), False)
    assert "r1" in eng.in_sync  # the in-sync set shrinks only through etcd


async def test_no_replica_left_fails_the_write() -> None:
    eng, reps, _ = make(1)
    await eng.open()
    reps["r0"].fail = True
    with pytest.raises(NoInSyncReplica):
        await eng.write(0, memoryview(b"z"), False)


async def test_lease_at_risk_fences_the_engine() -> None:
    lease = [True]
    eng, _, _ = make(lease=lease)
    await eng.open()
    await eng.write(0, memoryview(b"a"), False)
    lease[0] = False
    with pytest.raises(Fenced):
        await eng.write(0, memoryview(b"b"), False)
    lease[0] = True
    with pytest.raises(Fenced):  # once fenced, for good
        await eng.read(0, 1)


async def test_newer_epoch_on_a_replica_fences_instead_of_marking_stale() -> None:
    eng, reps, rec = make()
    await eng.open()
    reps["r2"].epoch = 6
    with pytest.raises(Fenced):
        await eng.write(0, memoryview(b"a"), False)
    assert rec.calls == []


async def test_out_of_range_is_einval() -> None:
    eng, _, _ = make()
    await eng.open()
    with pytest.raises(OutOfBounds):
        await eng.write(8 * CHUNK - 1, memoryview(b"ab"), False)


async def test_open_marks_unreachable_replicas_stale_and_needs_one() -> None:
    eng, reps, rec = make()
    reps["r2"].fail = True
    report = await eng.open()
    assert report.marked_stale == ["r2"] and rec.calls == [["r2"]]
    eng2, reps2, _ = make()
    for r in reps2.values():
        r.fail = True
    with pytest.raises(NoInSyncReplica):
        await eng2.open()


async def test_open_reconciles_dirty_chunks_from_the_highest_generation() -> None:
    eng, reps, _ = make()
    # An engine died mid-write: r1 applied (epoch 4, seq 9), the others did not.
    for r in reps.values():
        r.chunks[2] = bytearray(b"o" * CHUNK)
        r.gens[2] = (4, 8)
        r.dirty.add(2)
    reps["r1"].chunks[2] = bytearray(b"n" * CHUNK)
    reps["r1"].gens[2] = (4, 9)
    report = await eng.open()
    assert report.reconciled_chunks == 1
    assert all(bytes(r.chunks[2]) == b"n" * CHUNK for r in reps.values())
    assert all(not r.dirty for r in reps.values())


def test_choose_source_is_deterministic_on_ties() -> None:
    infos = {n: VolumeInfo("v", 1, 1, 1, [0], unclean=(n == "b")) for n in ("a", "b", "c")}
    gens = {"a": {0: (3, 1)}, "b": {0: (3, 1)}, "c": {0: (3, 1)}}
    assert choose_source(0, gens, infos) == "a"
    gens["c"] = {0: (3, 2)}
    assert choose_source(0, gens, infos) == "c"
    # an unclean host loses a tie
    infos2 = {n: VolumeInfo("v", 1, 1, 1, [0], unclean=(n == "a")) for n in ("a", "b")}
    assert choose_source(0, {"a": {0: (1, 1)}, "b": {0: (1, 1)}}, infos2) == "b"


async def test_detach_marks_written_chunks_clean_after_flush() -> None:
    eng, reps, _ = make()
    await eng.open()
    await eng.write(0, memoryview(b"a"), False)
    await eng.write(3 * CHUNK, memoryview(b"b"), False)
    assert all(r.dirty == {0, 3} for r in reps.values())
    await eng.close()
    assert all(not r.dirty for r in reps.values())
    assert all(r.durable[3][:1] == b"b" for r in reps.values())


class Clock:
    """time.monotonic for the engine module, moved by the test: idleness without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_idle_chunks_are_marked_clean_after_a_flush_and_hot_ones_stay_dirty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(volume_module, "time", clock)
    eng, reps, _ = make()
    await eng.open()
    await eng.write(0, memoryview(b"a"), False)
    await eng.write(2 * CHUNK, memoryview(b"b"), False)
    clock.now += 0.06
    await eng.write(4 * CHUNK, memoryview(b"c"), False)  # hot: written just now
    cleaned = await eng.clean_idle(0.05)
    assert cleaned == [0, 2]
    for r in reps.values():
        assert r.dirty == {4}
        assert r.durable[0][:1] == b"a" and r.durable[2][:1] == b"b"  # flushed before cleaning
    await eng.write(0, memoryview(b"d"), False)
    assert all(0 in r.dirty for r in reps.values())  # a new write dirties it again


async def test_encrypted_volume_stores_ciphertext_and_reads_plaintext() -> None:
    from pxcluster.engine.crypt import BlockCipher, derive_key

    eng, reps, _ = make(2)
    eng.cipher = BlockCipher(derive_key(b"k" * 32, "vid"))
    await eng.open()
    secret = b"attack at dawn! " * 256  # 4 KiB
    await eng.write(8192, memoryview(secret), False)
    assert await eng.read(8192, 4096) == secret
    for r in reps.values():
        stored = bytes(r.chunks[0][8192 : 8192 + 4096])
        assert b"attack" not in stored and stored != bytes(4096)
    # Unaligned write: read-modify-write of the partial blocks only.
    await eng.write(8192 + 100, memoryview(b"XYZ" * 1500), False)
    expect = bytearray(secret + bytes(4096))
    expect[100 : 100 + 4500] = b"XYZ" * 1500
    assert await eng.read(8192, 8192) == bytes(expect)
    # Never written blocks and trimmed ranges read as zeros, partial trims keep the rest.
    assert await eng.read(0, 8192) == bytes(8192)
    await eng.trim(8192 + 4000, 5000, False)
    expect[4000:] = bytes(len(expect) - 4000)  # the trim reaches past what we read back
    assert await eng.read(8192, 8192) == bytes(expect)
    # Another key cannot read it.
    eng.cipher = BlockCipher(derive_key(b"other key material", "vid"))
    assert await eng.read(8192, 100) != bytes(expect[:100])


async def test_concurrent_partial_writes_to_one_encrypted_block_both_land() -> None:
    from pxcluster.engine.crypt import BlockCipher, random_key

    eng, _, _ = make(1)
    eng.cipher = BlockCipher(random_key())
    await eng.open()
    await asyncio.gather(
        *(eng.write(i * 100, memoryview(bytes([i + 1]) * 100), False) for i in range(40))
    )
    got = await eng.read(0, 4000)
    assert got == b"".join(bytes([i + 1]) * 100 for i in range(40))


async def test_a_chunk_trimmed_in_pieces_is_freed_once_it_reads_as_zeros(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fstrim through nbdfuse arrives as small discards: each only zeroes its range, so the
    engine frees a chunk by a whole-chunk trim once the pieces leave it reading as zeros, and
    never a chunk that still holds data."""
    from pxcluster.engine import volume as volume_module

    monkeypatch.setattr(volume_module, "TRIM_SETTLE", 0.01)
    eng, reps, _ = make(2)
    trims: list[tuple[int, int, int]] = []
    real_trim = FakeReplica.trim

    async def recording_trim(
        self: FakeReplica,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        length: int,
        *,
        seq: int,
    ) -> None:
        trims.append((chunk, offset, length))
        await real_trim(self, volume, epoch, chunk, offset, length, seq=seq)

    monkeypatch.setattr(FakeReplica, "trim", recording_trim)
    await eng.open()
    await eng.write(1 * CHUNK, memoryview(b"a" * 8192), False)
    await eng.write(2 * CHUNK, memoryview(b"b" * 8192), False)
    await eng.write(2 * CHUNK + CHUNK // 2, memoryview(b"c" * 4096), False)
    piece = CHUNK // 4
    for i in range(4):
        await eng.trim(1 * CHUNK + i * piece, piece, False)  # the whole chunk, in pieces
    for i in range(2):
        await eng.trim(2 * CHUNK + i * piece, piece, False)  # its first half: "c" stays
    for _ in range(500):  # bounded: 5 s
        if (1, 0, CHUNK) in trims and not eng._trim_checks and not eng._trim_tasks:
            break
        await asyncio.sleep(0.01)
    assert trims.count((1, 0, CHUNK)) == 2  # freed on both replicas
    assert (2, 0, CHUNK) not in trims
    # What /metrics reports: six trims of a quarter chunk each, and the one chunk freed.
    assert (eng.counters["trim_ops"], eng.counters["trim_bytes"]) == (6, 6 * piece)
    assert eng.counters["chunks_freed"] == 1
    assert await eng.read(2 * CHUNK + CHUNK // 2, 4096) == b"c" * 4096
    assert await eng.read(1 * CHUNK, CHUNK) == bytes(CHUNK)
    assert all(
        r.chunks.get(2, b"")[CHUNK // 2 : CHUNK // 2 + 4096] == b"c" * 4096 for r in reps.values()
    )
    await eng.close()
