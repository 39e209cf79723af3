"""Snapshots in the chunk store: layers with copy on write per 4 KiB block.

A model (one bytearray per view) is checked against the store after every operation, after
a reopen from the durable image (replay of the journal and checkpoints), and for space."""

from __future__ import annotations

import random

import pytest

from replica.chunkstore import ChunkStore
from replica.errors import StaleEpoch, UnknownSnapshot
from replica.fileio import VolatileFile

CHUNK = 64 << 10
BLOCK = 4096
CHUNKS = 6
SIZE = CHUNKS * CHUNK - 3 * 512  # a last chunk that is not whole blocks


async def new_store(f: VolatileFile) -> ChunkStore:
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    return ChunkStore.open(f, cluster_id="c")


def read_all(store: ChunkStore, snapshot: str = "") -> bytes:
    parts = []
    for chunk in range(CHUNKS):
        n = min(CHUNK, SIZE - chunk * CHUNK)
        parts.append(store.read("v", 1, chunk, 0, n, snapshot=snapshot))
    return b"".join(parts)


async def write(store: ChunkStore, model: bytearray, pos: int, data: bytes, seq: int) -> None:
    done = 0
    while done < len(data):
        chunk, off = divmod(pos + done, CHUNK)
        n = min(CHUNK - off, len(data) - done)
        await store.write("v", 1, chunk, off, data[done : done + n], seq=seq)
        done += n
    model[pos : pos + len(data)] = data


async def test_snapshot_keeps_old_data_and_first_write_copies_no_chunk() -> None:
    f = VolatileFile(8 << 20)
    store = await new_store(f)
    await store.open_volume("v", 1, SIZE)
    head = bytearray(SIZE)
    await write(store, head, 0, b"a" * CHUNK, 1)
    used = store.stats().used
    await store.snapshot_create("v", 1, "s1", "first", 100.0)
    await write(store, head, 100, b"b" * 10, 2)  # inside block 0: read-modify-write
    await write(store, head, 5 * BLOCK, b"c" * BLOCK, 3)  # a whole block: no read below
    assert read_all(store) == bytes(head)
    assert read_all(store, "s1") == b"a" * CHUNK + bytes(SIZE - CHUNK)
    # One new slot for the written chunk; the snapshot's chunk was not copied into it.
    assert store.stats().used == used + CHUNK
    assert [s.name for s in store.snapshots("v")] == ["first"]
    assert store.generations("v") == {0: (1, 3)}
    assert store.generations("v", layer="s1") == {0: (1, 1)}
    assert store.snapshot_generations("v", "s1") == {0: (1, 1)}
    copy = store.read_chunk("v", 1, 0)
    assert copy.present is not None  # blocks 0 and 5 only
    assert int.from_bytes(copy.present, "little") == 0b100001
    with pytest.raises(UnknownSnapshot):
        store.read("v", 1, 0, 0, 10, snapshot="nope")
    with pytest.raises(StaleEpoch):
        await store.snapshot_create("v", 0, "s2", "late", 1.0)


async def test_trim_over_a_snapshot_writes_zeros_and_delete_frees_only_unshared() -> None:
    f = VolatileFile(8 << 20)
    store = await new_store(f)
    await store.open_volume("v", 1, SIZE)
    head = bytearray(SIZE)
    await write(store, head, 0, b"x" * (2 * CHUNK), 1)
    await store.snapshot_create("v", 1, "s1", "one", 1.0)
    await store.trim("v", 1, 0, 0, CHUNK, seq=2)  # whole chunk: must not expose the snapshot
    head[0:CHUNK] = bytes(CHUNK)
    assert read_all(store) == bytes(head)
    assert read_all(store, "s1")[:CHUNK] == b"x" * CHUNK
    await store.snapshot_delete("v", 1, "s1")
    assert read_all(store) == bytes(head)
    assert store.snapshots("v") == []
    # Chunk 0 was overwritten in the head: its snapshot slot is freed; chunk 1 moved up (its
    # empty head entry, made at the snapshot because the chunk was being written, is freed).
    assert (store.stats().used, store.stats().chunks) == (2 * CHUNK, 2)


@pytest.mark.parametrize("seed", range(12))
async def test_random_snapshots_match_a_model_and_survive_reopen(seed: int) -> None:
    rng = random.Random(seed)
    f = VolatileFile(16 << 20)
    store = await new_store(f)
    await store.open_volume("v", 1, SIZE)
    head = bytearray(SIZE)
    snaps: dict[str, bytes] = {}
    order: list[str] = []
    seq = 0
    for step in range(80):
        seq += 1
        op = rng.random()
        if op < 0.55:
            pos = rng.randrange(SIZE - 1)
            n = rng.choice([1, 512, BLOCK, 3 * BLOCK + 7, CHUNK // 2])
            n = min(n, SIZE - pos, CHUNK - pos % CHUNK)
            await write(store, head, pos, bytes([rng.randrange(1, 255)]) * n, seq)
        elif op < 0.65:
            pos = rng.randrange(SIZE - 1)
            n = min(rng.choice([512, BLOCK, CHUNK]), SIZE - pos, CHUNK - pos % CHUNK)
            chunk, off = divmod(pos, CHUNK)
            await store.trim("v", 1, chunk, off, n, seq=seq)
            head[pos : pos + n] = bytes(n)
        elif op < 0.8:
            sid = f"s{step}"
            await store.snapshot_create("v", 1, sid, f"name{step}", float(step))
            snaps[sid] = bytes(head)
            order.append(sid)
        elif op < 0.92 and order:
            sid = order.pop(rng.randrange(len(order)))
            await store.snapshot_delete("v", 1, sid)
            del snaps[sid]
        elif order:
            sid = order[rng.randrange(len(order))]
            await store.revert("v", 1, sid)
            head = bytearray(snaps[sid])
            for later in order[order.index(sid) + 1 :]:
                del snaps[later]
            order = order[: order.index(sid) + 1]
        assert read_all(store) == bytes(head), f"seed {seed} step {step}"
        assert [s.id for s in store.snapshots("v")] == order
    for sid in order:
        assert read_all(store, sid) == snaps[sid], sid
    await store.flush()
    # Replay from what is durable: the same views.
    again = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
    assert read_all(again) == bytes(head)
    for sid in order:
        assert read_all(again, sid) == snaps[sid]
    # And from a checkpoint written by a clean close.
    await store.close()
    closed = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
    assert read_all(closed) == bytes(head)
    for sid in order:
        assert read_all(closed, sid) == snaps[sid]
    # Deleting every snapshot leaves the head's data and at most one slot per chunk.
    for sid in list(order):
        await closed.snapshot_delete("v", 1, sid)
    assert read_all(closed) == bytes(head)
    assert closed.stats().chunks <= CHUNKS
    await closed.delete_volume("v")
    assert closed.stats().used == 0


async def test_exact_layer_copy_rebuilds_the_same_views() -> None:
    """What a rebuild does: copy each snapshot layer through the head and freeze it, then the
    head's entries with their block presence."""
    src_f, dst_f = VolatileFile(8 << 20), VolatileFile(8 << 20)
    src, dst = await new_store(src_f), await new_store(dst_f)
    await src.open_volume("v", 1, SIZE)
    await dst.open_volume("v", 1, SIZE)
    head = bytearray(SIZE)
    await write(src, head, 0, b"1" * (CHUNK + 100), 1)
    await src.snapshot_create("v", 1, "a", "a", 1.0)
    await write(src, head, 50, b"2" * 10, 2)
    await write(src, head, 3 * CHUNK, b"3" * 10, 3)
    await src.snapshot_create("v", 1, "b", "b", 2.0)
    await write(src, head, CHUNK + 8000, b"4" * 5000, 4)
    for snap in src.snapshots("v"):
        for chunk in src.generations("v", layer=snap.id):
            c = src.read_chunk("v", 1, chunk, layer=snap.id)
            await dst.write_chunk("v", 1, chunk, c.data, c.gen, present=c.present)
        await dst.snapshot_create("v", 1, snap.id, snap.name, snap.created)
    for chunk in src.generations("v"):
        c = src.read_chunk("v", 1, chunk)
        await dst.write_chunk("v", 1, chunk, c.data, c.gen, present=c.present)
    assert read_all(dst) == read_all(src) == bytes(head)
    for sid in ("a", "b"):
        assert read_all(dst, sid) == read_all(src, sid)
    assert dst.generations("v") == src.generations("v")


async def test_a_flipped_byte_is_never_served_and_the_chunk_is_marked_for_copy() -> None:
    from replica.errors import ChecksumMismatch

    f = VolatileFile(8 << 20)
    store = await new_store(f)
    await store.open_volume("v", 1, SIZE)
    head = bytearray(SIZE)
    await write(store, head, 0, bytes(range(256)) * (2 * CHUNK // 256), 1)
    await store.flush()
    await store.mark_clean("v", 1, [0, 1])
    sb = store.superblock
    slot = store._meta.vols["v"].chunks[1].slot  # the test reaches in to aim the corruption
    at = sb.slot_offset(slot) + 3 * BLOCK + 17
    f.pwrite(bytes([f.pread(1, at)[0] ^ 0x01]), at)
    assert store.read("v", 1, 0, 0, CHUNK) == bytes(head[:CHUNK])  # other chunks are fine
    assert store.read("v", 1, 1, 0, 3 * BLOCK) == bytes(head[CHUNK : CHUNK + 3 * BLOCK])
    with pytest.raises(ChecksumMismatch, match="chunk 1 block 3"):
        store.read("v", 1, 1, 3 * BLOCK + 100, 10)
    with pytest.raises(ChecksumMismatch):
        store.read_chunk("v", 1, 1)
    assert store.generations("v")[1] == (0, 0)  # a rebuild now sees it differ and copies it
    # The corruption survives a restart (the chunk was clean: nothing recomputes it) ...
    await store.flush()
    again = ChunkStore.open(VolatileFile.from_image(f.durable_image()), cluster_id="c")
    with pytest.raises(ChecksumMismatch):
        again.read("v", 1, 1, 3 * BLOCK, BLOCK)
    # ... and a write of the whole block repairs it.
    await store.write("v", 1, 1, 3 * BLOCK, b"\x07" * BLOCK, seq=9)
    assert store.read("v", 1, 1, 3 * BLOCK, BLOCK) == b"\x07" * BLOCK


async def test_unflushed_writes_over_a_snapshot_survive_a_process_crash() -> None:
    """Same boot: the page cache survives, and so must acknowledged writes into a chunk with a
    snapshot below (their block presence is in the page cache next to the data)."""
    f = VolatileFile(8 << 20)
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    store = ChunkStore.open(f, cluster_id="c", boot_id="boot-1")
    await store.open_volume("v", 1, SIZE)
    head = bytearray(SIZE)
    await write(store, head, 0, b"A" * (2 * CHUNK), 1)
    await store.snapshot_create("v", 1, "s1", "s1", 1.0)
    await write(store, head, 100, b"C" * 300, 2)  # partial block: read-modify-write
    await store.flush()
    await write(store, head, 3 * BLOCK, b"D" * BLOCK, 3)  # acknowledged, not flushed
    await write(store, head, CHUNK + 5 * BLOCK, b"E" * BLOCK, 4)
    page_cache = f.pread(f.size(), 0)  # what a restarted process finds (kill -9, same boot)
    again = ChunkStore.open(VolatileFile.from_image(page_cache), cluster_id="c", boot_id="boot-1")
    assert read_all(again) == bytes(head)
    assert read_all(again, "s1") == b"A" * (2 * CHUNK) + bytes(SIZE - 2 * CHUNK)


class PunchWatch(VolatileFile):
    """Keeps the durable image as it was at the first punch of a data slot."""

    data_offset = 0
    at_punch: bytes | None = None

    def punch(self, offset: int, length: int) -> None:
        if self.at_punch is None and self.data_offset and offset >= self.data_offset:
            self.at_punch = self.durable_image()
        super().punch(offset, length)


@pytest.mark.parametrize("op", ["delete", "revert"])
async def test_power_cut_when_a_snapshots_slots_are_freed_keeps_every_view(op: str) -> None:
    f = PunchWatch(8 << 20)
    store = await new_store(f)
    await store.open_volume("v", 1, SIZE)
    head = bytearray(SIZE)
    await write(store, head, 0, b"A" * (3 * CHUNK), 1)
    await store.snapshot_create("v", 1, "s1", "s1", 1.0)
    snap = bytes(head)
    await write(store, head, 0, b"B" * CHUNK, 2)  # chunk 0 overwritten whole: s1's copy freed
    await write(store, head, CHUNK + 10, b"C" * 10, 3)  # chunk 1: merged into the head
    await store.snapshot_create("v", 1, "s2", "s2", 2.0)
    await store.flush()
    f.data_offset = store.superblock.data_offset
    if op == "delete":
        await store.snapshot_delete("v", 1, "s1")
        want_head, want = bytes(head), {"s2": bytes(head)}
    else:
        await store.revert("v", 1, "s1")
        want_head, want = snap, {"s1": snap}
    assert f.at_punch is not None
    # A power cut at the first punch: the disk holds the old state or the new, never a mix.
    cut = ChunkStore.open(VolatileFile.from_image(f.at_punch), cluster_id="c")
    ids = [s.id for s in cut.snapshots("v")]
    assert ids == sorted(want) or ids == ["s1", "s2"], ids
    if ids == sorted(want):
        assert read_all(cut) == want_head
    for sid in ids:
        assert read_all(cut, sid) == (want.get(sid) or (snap if sid == "s1" else bytes(head)))
