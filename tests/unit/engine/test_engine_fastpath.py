"""The engine's synchronous fast paths (`read_now`, `write_now`): done at once in the plain
case, declined (nothing changed) whenever anything else applies, so the coroutine path, which
owns every other rule, handles the request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pxcluster.engine.crypt import KEY_BYTES, BlockCipher
from pxcluster.engine.errors import Fenced, NoInSyncReplica, VolumeIOError
from pxcluster.engine.hydrate import Hydration
from pxcluster.engine.volume import CatchUp, VolumeEngine, VolumeSpec
from replica.api import Generation
from replica.errors import ReplicaUnavailable, StaleEpoch
from tests.unit.engine.test_engine import CHUNK, FakeReplica, Recorder


class FakeLocalReplica(FakeReplica):
    """The in-process replica: also answers at once, as replica.service.ReplicaService does.
    Like the chunk store, it declines a write to a chunk it has never written (whose dirty
    record would have to become durable first)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.now_reads = 0
        self.now_writes = 0
        self.flushed_after: list[bool] = []
        self.syncs: list[asyncio.Future[None]] = []

    def read_now(self, volume: str, epoch: int, chunk: int, offset: int, length: int) -> bytes:
        self._check(epoch)
        self.now_reads += 1
        return bytes(self.chunks.get(chunk, bytearray(CHUNK))[offset : offset + length])

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
    ) -> bool:
        self._check(epoch)
        buf = self.chunks.get(chunk)
        if buf is None:
            return False
        buf[offset : offset + len(data)] = data
        self.gens[chunk] = (epoch, seq)
        self.now_writes += 1
        self.flushed_after.append(flushed_after)
        return True

    def flush_soon(self, volume: str, epoch: int) -> asyncio.Future[None]:
        """The next group commit, done when the test says (`syncs[i]`)."""
        self._check(epoch)
        fut = asyncio.get_running_loop().create_future()
        self.syncs.append(fut)
        return fut


class FakeRemote(FakeReplica):
    """A remote replica as replica.client.ReplicaClient offers it to write_begin: the frame
    "arrives" at once (the bytes land here), the reply when the test answers `sent[i]`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.ready = True
        self.sent: list[asyncio.Future[None]] = []
        self.durable_frames: list[bool] = []  # each frame's durability, in order

    def ready_to_send(self) -> bool:
        return self.ready

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
    ) -> asyncio.Future[None]:
        self.durable_frames.append(durable)
        buf = self.chunks.setdefault(chunk, bytearray(CHUNK))
        buf[offset : offset + len(data)] = data
        self.gens[chunk] = (epoch, seq)
        fut = asyncio.get_running_loop().create_future()
        self.sent.append(fut)
        return fut

    @staticmethod
    def write_outcome(fut: asyncio.Future[None]) -> None:
        fut.result()


def make(
    n: int = 1,
    *,
    sync: bool = False,
    lease: list[bool] | None = None,
    remote: type[FakeReplica] = FakeReplica,
    state: Recorder | None = None,
) -> tuple[VolumeEngine, dict[str, FakeReplica]]:
    reps: dict[str, FakeReplica] = {"r0": FakeLocalReplica("r0")}
    reps.update({f"r{i}": remote(f"r{i}") for i in range(1, n)})
    ok = lease if lease is not None else [True]
    eng = VolumeEngine(
        VolumeSpec("vid", "vol", 8 * CHUNK, CHUNK, sync),
        5,
        dict(reps),  # type: ignore[arg-type]
        local_node="r0",
        state=state or Recorder(),
        lease_ok=lambda: ok[0],
    )
    return eng, reps


async def opened(n: int = 1, **kw: object) -> tuple[VolumeEngine, FakeLocalReplica]:
    eng, reps = make(n, **kw)  # type: ignore[arg-type]
    await eng.open()
    await eng.write(0, memoryview(b"\0"), False)  # chunk 0 written once: ready for write_now
    local = reps["r0"]
    assert isinstance(local, FakeLocalReplica)
    return eng, local


async def test_a_plain_write_and_read_are_done_at_once_and_tracked_dirty() -> None:
    eng, local = await opened()
    await eng.close()  # records chunk 0 clean: write_now must make it dirty again
    assert eng.dirty_chunks() == set()
    assert eng.write_now(100, memoryview(b"fast"), False)
    assert local.now_writes == 1
    assert local.chunks[0][100:104] == b"fast"
    # Invariant 5: the chunk is in the engine's dirty set, so the next clean mark covers it.
    assert eng.dirty_chunks() == {0}
    assert eng.counters["write_ops"] == 2 and eng.counters["write_bytes"] == 5
    assert eng.read_now(100, 4) == b"fast"
    assert local.now_reads == 1 and eng.counters["read_ops"] == 1
    assert await eng.read(100, 4) == b"fast"  # the coroutine path sees the same bytes


async def test_write_now_declines_a_chunk_the_replica_must_ready_first() -> None:
    eng, local = await opened()
    assert not eng.write_now(CHUNK + 5, memoryview(b"x"), False)
    assert 1 not in local.chunks and 1 not in eng.dirty_chunks()


def _barrier(eng: VolumeEngine) -> None:
    eng._barrier = asyncio.Event()


def _rebuild(eng: VolumeEngine) -> None:
    eng.rebuilding["r9"] = CatchUp(FakeReplica("r9"))  # type: ignore[arg-type]


def _gate(eng: VolumeEngine) -> None:
    eng.copying[0] = asyncio.Event()


def _hydrating(eng: VolumeEngine) -> None:
    eng.hydration = Hydration("src", "snap", [], {0}, _nothing, _nothing)


async def _nothing(_: int) -> None:
    pass


def _encrypted(eng: VolumeEngine) -> None:
    eng.cipher = BlockCipher(bytes(KEY_BYTES))


def _limited(eng: VolumeEngine) -> None:
    eng.limits.set(1000, 0)


def _fenced(eng: VolumeEngine) -> None:
    eng.fenced = True


def _local_not_in_sync(eng: VolumeEngine) -> None:
    eng.in_sync = {"r1": FakeReplica("r1")}  # type: ignore[dict-item]


def _local_fails(eng: VolumeEngine) -> None:
    eng.in_sync["r0"].fail = True  # type: ignore[attr-defined]


WRITE_DECLINED: dict[str, Callable[[VolumeEngine], None]] = {
    "snapshot barrier": _barrier,
    "replica catching up": _rebuild,
    "chunk being copied": _gate,
    "clone still copying the chunk": _hydrating,
    "encrypted": _encrypted,
    "io limits": _limited,
    "fenced": _fenced,
    "local replica failing": _local_fails,
}


@pytest.mark.parametrize("why", list(WRITE_DECLINED))
async def test_write_now_declines_and_changes_nothing(why: str) -> None:
    eng, local = await opened()
    dirty, gens, counters = eng.dirty_chunks(), dict(local.gens), dict(eng.counters)
    WRITE_DECLINED[why](eng)
    assert not eng.write_now(8, memoryview(b"abc"), False)
    assert local.chunks[0][8:11] == bytes(3)
    assert (eng.dirty_chunks(), local.gens, eng.counters) == (dirty, gens, counters)


async def test_write_now_declines_fua_sync_volumes_replicas_and_chunk_spans() -> None:
    eng, local = await opened()
    assert not eng.write_now(0, memoryview(b"a"), True)  # FUA: durable, needs a flush
    assert not eng.write_now(CHUNK - 1, memoryview(b"ab"), False)  # two chunks
    assert not eng.write_now(0, memoryview(b""), False)
    sync_eng, sync_local = await opened(sync=True)
    assert not sync_eng.write_now(0, memoryview(b"a"), False)
    repl3, local3 = await opened(3)
    assert not repl3.write_now(0, memoryview(b"a"), False)  # other replicas must get it too
    assert local.now_writes == sync_local.now_writes == local3.now_writes == 0


async def test_write_now_declines_when_the_lease_is_at_risk_and_the_full_path_fences() -> None:
    lease = [True]
    eng, local = await opened(lease=lease)
    lease[0] = False
    assert not eng.write_now(0, memoryview(b"a"), False)
    assert local.now_writes == 0
    assert eng.read_now(0, 1) is None
    with pytest.raises(Exception, match="lease"):
        await eng.write(0, memoryview(b"a"), False)
    assert eng.fenced


READ_DECLINED: dict[str, Callable[[VolumeEngine], None]] = {
    "clone still copying the chunk": _hydrating,
    "encrypted": _encrypted,
    "io limits": _limited,
    "fenced": _fenced,
    "local replica not in sync": _local_not_in_sync,
    "local replica failing": _local_fails,
}


@pytest.mark.parametrize("why", list(READ_DECLINED))
async def test_read_now_declines(why: str) -> None:
    eng, _local = await opened()
    READ_DECLINED[why](eng)
    assert eng.read_now(0, 4) is None
    assert eng.counters["read_ops"] == 0


async def test_read_now_serves_repl3_volumes_from_the_local_replica_within_one_chunk() -> None:
    eng, local = await opened(3)
    await eng.write(10, memoryview(b"three"), False)
    assert eng.read_now(10, 5) == b"three" and local.now_reads == 1
    assert eng.read_now(CHUNK - 2, 4) is None  # across chunks: the coroutine path joins them
    assert eng.read_now(0, 0) is None


def _gens(r: FakeReplica) -> dict[int, Generation]:
    return dict(r.gens)


async def test_write_now_gives_each_write_a_newer_generation() -> None:
    eng, local = await opened()
    before = _gens(local)[0]
    assert eng.write_now(0, memoryview(b"a"), False)
    first = _gens(local)[0]
    await eng.write(0, memoryview(b"b"), False)
    second = _gens(local)[0]
    assert eng.write_now(0, memoryview(b"c"), False)
    assert before < first < second < _gens(local)[0]


# --- write_begin: a replicated write started without a coroutine ------------------------------


async def repl3(**kw: object) -> tuple[VolumeEngine, FakeLocalReplica, FakeRemote, FakeRemote]:
    eng, reps = make(3, remote=FakeRemote, **kw)  # type: ignore[arg-type]
    await eng.open()
    await eng.write(0, memoryview(b"\0"), False)  # coroutine path (no frames yet): chunk 0 ready
    local, r1, r2 = reps["r0"], reps["r1"], reps["r2"]
    assert isinstance(local, FakeLocalReplica)
    assert isinstance(r1, FakeRemote) and isinstance(r2, FakeRemote)
    return eng, local, r1, r2


async def settled(fut: asyncio.Future[None]) -> None:
    await asyncio.wait_for(asyncio.shield(fut), 1)


async def test_write_begin_acknowledges_only_when_every_replica_holds_it() -> None:
    eng, local, r1, r2 = await repl3()
    ack = eng.write_begin(64, memoryview(b"abc"), False)
    assert ack is not None
    assert local.chunks[0][64:67] == r1.chunks[0][64:67] == r2.chunks[0][64:67] == b"abc"
    assert local.gens[0] == r1.gens[0] == r2.gens[0]  # one write, one generation everywhere
    # In flight until the replies: a rebuild or a copy gate waits for it.
    assert eng.inflight and eng.chunk_writes == {0: 1}
    r1.sent[0].set_result(None)
    await asyncio.sleep(0)
    assert not ack.done()  # invariant 1: r2 has not answered
    r2.sent[0].set_result(None)
    await settled(ack)
    assert ack.result() is None
    assert not eng.inflight and eng.chunk_writes == {} and 0 in eng.dirty_chunks()


async def test_write_begin_records_a_failed_replica_stale_before_the_ack() -> None:
    rec = Recorder()
    eng, _local, r1, r2 = await repl3(state=rec)
    ack = eng.write_begin(0, memoryview(b"x"), False)
    assert ack is not None
    r1.sent[0].set_result(None)
    r2.sent[0].set_exception(ReplicaUnavailable("r2 down"))
    await settled(ack)
    assert ack.result() is None and rec.calls == [["r2"]]  # invariant 2
    assert sorted(eng.in_sync) == ["r0", "r1"] and not eng.inflight


async def test_write_begin_fails_when_the_stale_mark_cannot_be_recorded() -> None:
    eng, _local, r1, r2 = await repl3(state=Recorder(succeed=False))
    ack = eng.write_begin(0, memoryview(b"x"), False)
    assert ack is not None
    r1.sent[0].set_exception(ReplicaUnavailable("r1 down"))
    r2.sent[0].set_result(None)
    with pytest.raises(VolumeIOError):
        await settled(ack)
    assert "r1" in eng.in_sync and not eng.inflight and eng.chunk_writes == {}


async def test_write_begin_fences_on_a_newer_epoch_or_a_lease_at_risk() -> None:
    eng, _local, r1, r2 = await repl3()
    ack = eng.write_begin(0, memoryview(b"x"), False)
    assert ack is not None
    r1.sent[0].set_exception(StaleEpoch("6 > 5"))
    r2.sent[0].set_result(None)
    with pytest.raises(Fenced):
        await settled(ack)
    assert eng.fenced
    lease = [True]
    eng, _local, r1, r2 = await repl3(lease=lease)
    ack = eng.write_begin(0, memoryview(b"x"), False)
    assert ack is not None
    lease[0] = False  # lost while the replies were on their way: no acknowledgement
    for f in r1.sent + r2.sent:
        f.set_result(None)
    with pytest.raises(Fenced):
        await settled(ack)


@pytest.mark.parametrize("why", [*WRITE_DECLINED, "a remote not ready"])
@pytest.mark.parametrize("durable", ["no", "fua", "sync volume"])
async def test_write_begin_declines_and_changes_nothing(why: str, durable: str) -> None:
    eng, local, r1, r2 = await repl3(sync=durable == "sync volume")
    before = [bytes(r.chunks[0]) for r in (local, r1, r2)]
    gens = [dict(r.gens) for r in (local, r1, r2)]
    if why == "a remote not ready":
        r2.ready = False
    elif why in WRITE_DECLINED:
        WRITE_DECLINED[why](eng)
    assert eng.write_begin(8, memoryview(b"abc"), durable == "fua") is None
    assert [bytes(r.chunks[0]) for r in (local, r1, r2)] == before
    assert [dict(r.gens) for r in (local, r1, r2)] == gens
    assert r1.sent == r2.sent == [] and local.syncs == [] and not eng.inflight


@pytest.mark.parametrize("durable", ["fua", "sync volume"])
async def test_a_durable_write_begun_is_acknowledged_only_once_durable_everywhere(
    durable: str,
) -> None:
    eng, local, r1, r2 = await repl3(sync=durable == "sync volume")
    ack = eng.write_begin(64, memoryview(b"abc"), durable == "fua")
    assert ack is not None
    assert local.chunks[0][64:67] == r1.chunks[0][64:67] == r2.chunks[0][64:67] == b"abc"
    # The local replica applied it for a sync that follows; the remote ones got durable frames.
    assert local.flushed_after == [True] and len(local.syncs) == 1
    assert r1.durable_frames == r2.durable_frames == [True]
    for f in r1.sent + r2.sent:
        f.set_result(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not ack.done()  # the local group commit has not covered it yet
    local.syncs[0].set_result(None)
    await settled(ack)
    assert ack.result() is None and not eng.inflight and 0 in eng.dirty_chunks()


async def test_a_durable_write_on_one_replica_waits_for_its_group_commit() -> None:
    eng, local = await opened(sync=True)
    assert not eng.write_now(8, memoryview(b"abc"), False)  # durable: not write_now's
    ack = eng.write_begin(8, memoryview(b"abc"), False)
    assert ack is not None and local.chunks[0][8:11] == b"abc"
    await asyncio.sleep(0)
    assert not ack.done() and eng.inflight
    local.syncs[0].set_result(None)
    await settled(ack)
    assert ack.result() is None and not eng.inflight


async def test_a_failed_group_commit_fails_the_write_on_one_replica() -> None:
    rec = Recorder()
    eng, local = await opened(sync=True, state=rec)
    ack = eng.write_begin(8, memoryview(b"abc"), True)
    assert ack is not None
    local.syncs[0].set_exception(OSError(5, "fdatasync: EIO"))
    # Its only replica failed: the write fails, never acknowledged (as the coroutine path).
    with pytest.raises(NoInSyncReplica):
        await settled(ack)
    assert not eng.inflight


async def test_a_failed_local_group_commit_marks_the_local_replica_stale_before_the_ack() -> None:
    rec = Recorder()
    eng, local, r1, r2 = await repl3(state=rec, sync=True)
    ack = eng.write_begin(0, memoryview(b"x"), False)
    assert ack is not None
    for f in r1.sent + r2.sent:
        f.set_result(None)
    local.syncs[0].set_exception(OSError(5, "fdatasync: EIO"))
    await settled(ack)
    assert ack.result() is None and rec.calls == [["r0"]]  # invariant 2
    assert sorted(eng.in_sync) == ["r1", "r2"]
