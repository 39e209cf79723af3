"""Incremental rebuild inside the engine, against in-memory replicas."""

from __future__ import annotations

import asyncio
import random

import pytest

from pxcluster.engine.rebuild import rebuild
from replica.errors import ReplicaUnavailable
from tests.unit.engine.test_engine import CHUNK, FakeReplica, make


async def marked(flag: list[bool]) -> bool:
    flag.append(True)
    return True


async def test_copies_only_differing_chunks_and_rejoins() -> None:
    eng, reps, _ = make(3)
    stale = reps.pop("r2")
    eng._all.pop("r2")
    await eng.open()
    for c in range(8):
        await eng.write(c * CHUNK, memoryview(bytes([c + 1]) * 100), False)
    # r2 missed writes to chunks 1 and 5 only
    for c in (0, 2, 3, 4, 6, 7):
        stale.chunks[c] = bytearray(reps["r0"].chunks[c])
        stale.gens[c] = reps["r0"].gens[c]
    done: list[bool] = []
    progress = await rebuild(eng, "r2", stale, mark_in_sync=lambda: marked(done))
    assert progress.copied_chunks == 2 and progress.total_chunks == 2
    assert done == [True] and "r2" in eng.in_sync and not eng.rebuilding
    for c in range(8):
        assert stale.chunks[c] == reps["r0"].chunks[c]


async def test_writes_during_rebuild_reach_the_new_replica() -> None:
    eng, reps, _ = make(2)
    target = FakeReplica("new")
    await eng.open()
    rng = random.Random(3)
    for c in range(8):
        await eng.write(c * CHUNK, memoryview(rng.randbytes(CHUNK)), False)
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            off = rng.randrange(0, 8 * CHUNK - 5000)
            await eng.write(off, memoryview(rng.randbytes(5000)), False)  # unaligned, cross-chunk
            await asyncio.sleep(0)

    w = asyncio.create_task(writer())
    done: list[bool] = []
    await rebuild(eng, "new", target, mark_in_sync=lambda: marked(done), parallel=2)
    for _ in range(50):
        await eng.write(rng.randrange(0, 8 * CHUNK - 10), memoryview(b"after-join"), False)
    stop.set()
    await w
    for c in range(8):
        assert bytes(target.chunks[c]) == bytes(reps["r0"].chunks[c]), c


class SlowCopyReplica(FakeReplica):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.copy_gate = asyncio.Event()

    async def write_chunk(self, *args: object, **kwargs: object) -> None:
        await self.copy_gate.wait()
        await super().write_chunk(*args, **kwargs)  # type: ignore[arg-type]


async def test_target_failure_aborts_without_failing_client_writes() -> None:
    eng, _, rec = make(2)
    target = SlowCopyReplica("t")
    await eng.open()
    for c in range(4):
        await eng.write(c * CHUNK, memoryview(b"x" * 10), False)
    task = asyncio.create_task(rebuild(eng, "t", target, mark_in_sync=lambda: marked([])))
    for _ in range(100):
        if eng.copying:
            break
        await asyncio.sleep(0.001)
    assert "t" in eng.rebuilding
    target.fail = True  # the target dies while a chunk is being copied
    await eng.write(5 * CHUNK, memoryview(b"y"), False)  # the client's write still succeeds
    assert "t" not in eng.rebuilding
    target.copy_gate.set()
    with pytest.raises(Exception):  # noqa: B017 - the copy's own failure or RebuildAborted
        await task
    assert "t" not in eng.in_sync and rec.calls == []


async def test_resume_skips_chunks_already_copied() -> None:
    eng, reps, _ = make(1)
    target = FakeReplica("t")
    await eng.open()
    for c in range(6):
        await eng.write(c * CHUNK, memoryview(b"d" * 10), False)
    # a previous, interrupted run copied chunks 0..3
    for c in range(4):
        target.chunks[c] = bytearray(reps["r0"].chunks[c])
        target.gens[c] = reps["r0"].gens[c]
    progress = await rebuild(eng, "t", target, mark_in_sync=lambda: marked([]))
    assert progress.total_chunks == 2


class FailingAfter(FakeReplica):
    """Dies after installing `n` chunks, as a target killed mid-rebuild (its data stays)."""

    def __init__(self, name: str, n: int) -> None:
        super().__init__(name)
        self.left = n
        self.go = asyncio.Event()

    async def write_chunk(self, *args: object, **kwargs: object) -> None:
        await self.go.wait()
        if self.left == 0:
            raise ReplicaUnavailable("killed")
        self.left -= 1
        await super().write_chunk(*args, **kwargs)  # type: ignore[arg-type]


async def test_writes_during_an_interrupted_rebuild_do_not_fool_the_resume() -> None:
    """A chunk not yet copied must not look caught up because a new write reached it."""
    eng, reps, _ = make(1)
    await eng.open()
    rng = random.Random(9)
    for c in range(8):
        await eng.write(c * CHUNK, memoryview(rng.randbytes(CHUNK)), False)
    target = FailingAfter("t", 2)
    task = asyncio.create_task(
        rebuild(eng, "t", target, mark_in_sync=lambda: marked([]), parallel=1)
    )
    for _ in range(200):
        if eng.copying:
            break
        await asyncio.sleep(0)
    await eng.write(7 * CHUNK + 100, memoryview(b"new" * 10), False)  # chunk 7: not copied yet
    target.go.set()
    with pytest.raises(Exception):  # noqa: B017 - the target dies after two chunks
        await task
    target.left = 1 << 30
    target.dirty.clear()  # nothing suspect: only generations decide what to copy
    await rebuild(eng, "t", target, mark_in_sync=lambda: marked([]))
    for c in range(8):
        assert bytes(target.chunks.get(c, b"")) == bytes(reps["r0"].chunks[c]), c
