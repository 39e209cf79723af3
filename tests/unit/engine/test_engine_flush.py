"""The client's FLUSH: on a --sync-writes volume every write and trim was durable on every
replica before its answer, so a FLUSH syncs none of them; everywhere else (default volumes, the
engine's own barriers) every replica is synced."""

from __future__ import annotations

import pytest

from pxcluster.engine.errors import Fenced
from pxcluster.engine.volume import VolumeEngine, VolumeSpec
from tests.unit.engine.test_engine import CHUNK, FakeReplica, Recorder


class CountingReplica(FakeReplica):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.flushes = 0

    async def flush(self, volume: str, epoch: int) -> None:
        self.flushes += 1
        await super().flush(volume, epoch)


async def engine(
    sync: bool, lease: list[bool] | None = None
) -> tuple[VolumeEngine, list[CountingReplica]]:
    reps = [CountingReplica(f"r{i}") for i in range(3)]
    ok = lease if lease is not None else [True]
    eng = VolumeEngine(
        VolumeSpec("vid", "vol", 8 * CHUNK, CHUNK, sync),
        5,
        {r.name: r for r in reps},  # type: ignore[misc]
        local_node="r0",
        state=Recorder(),
        lease_ok=lambda: ok[0],
    )
    await eng.open()
    return eng, reps


async def _write_and_trim(eng: VolumeEngine) -> None:
    await eng.write(100, memoryview(b"a" * 5000), False)
    await eng.write(CHUNK + 7, memoryview(b"b" * 300), False)
    await eng.trim(200, 50, False)


async def test_a_flush_on_a_sync_writes_volume_syncs_no_replica_and_loses_nothing() -> None:
    eng, reps = await engine(sync=True)
    await _write_and_trim(eng)
    before = [r.flushes for r in reps]
    await eng.flush()
    assert [r.flushes for r in reps] == before
    # What a power cut would leave on each replica: every answered write, trim included.
    for r in reps:
        assert r.durable[0][100:200] == b"a" * 100
        assert r.durable[0][200:250] == bytes(50)
        assert r.durable[0][250:5100] == b"a" * 4850
        assert r.durable[1][7:307] == b"b" * 300


async def test_a_flush_on_a_default_volume_syncs_every_replica() -> None:
    eng, reps = await engine(sync=False)
    await eng.write(100, memoryview(b"a" * 5000), False)
    assert all(0 not in r.durable for r in reps)
    await eng.flush()
    assert [r.flushes for r in reps] == [1, 1, 1]
    assert all(r.durable[0][100:5100] == b"a" * 5000 for r in reps)


async def test_the_engines_own_barriers_still_sync_every_replica() -> None:
    eng, reps = await engine(sync=True)
    await eng.write(0, memoryview(b"x" * 10), False)
    await eng.clean_idle(0.0)  # the dirty log's cleaning syncs before its clean mark
    assert [r.flushes for r in reps] == [1, 1, 1] and all(not r.dirty for r in reps)
    await eng.close()  # a clean detach syncs before it records chunks clean
    assert [r.flushes for r in reps] == [2, 2, 2]


async def test_a_flush_on_a_sync_writes_volume_still_fences_on_a_lease_at_risk() -> None:
    lease = [True]
    eng, _ = await engine(sync=True, lease=lease)
    lease[0] = False
    with pytest.raises(Fenced):
        await eng.flush()
    assert eng.fenced
