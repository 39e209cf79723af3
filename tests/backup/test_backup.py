"""Backups end to end through the library, against a directory and a real S3 server."""

from __future__ import annotations

import asyncio
import time

import pytest

from pxcluster.backup import (
    create_backup,
    delete_backup,
    inspect_backup,
    list_backups,
    markers,
    restore_backup,
    verify_backup,
)
from pxcluster.backup import format as fmt
from pxcluster.backup.errors import BackupCorrupt, BackupNotFound, BlockMissing
from pxcluster.backup.target import Target
from tests.backup.fakes import MemSink, MemSnapshot, MemVolume, MiB

CHUNK = 2 * MiB  # two 1 MiB backup blocks per chunk
SIZE = 7 * MiB + 512 * 1024  # four chunks, the last 1.5 MiB: one full and one half block


def make_volume(name: str = "db") -> MemVolume:
    vol = MemVolume(name, SIZE, CHUNK)
    vol.fill_random(0, 3 * MiB)  # chunk 0 (2 blocks), chunk 1 block 0
    vol.write(2 * MiB + MiB, bytes(MiB))  # chunk 1 block 1: written, but zeros
    vol.fill_random(6 * MiB + 100, 1000)  # chunk 3 block 0 (partly), block 1 stays zero
    return vol  # chunk 2 never written: not in the snapshot's generations


async def restored(target: Target, backup_id: str) -> MemSink:
    m = await inspect_backup(target, backup_id)
    sink = MemSink(m.size, m.chunk_size)
    await restore_backup(target, backup_id, sink)
    return sink


async def stored_blocks(target: Target) -> set[str]:
    return {d for k in await target.list(fmt.BLOCKS) if (d := fmt.digest_of_key(k))}


async def test_full_then_incremental_restores_both(target: Target) -> None:
    vol = make_volume()
    snap1 = vol.snapshot()
    r1 = await create_backup(target, snap1)
    assert r1.volume == "db" and r1.snapshot == "snap1" and r1.size == SIZE
    # Chunks 0, 1 and 3 are allocated: 2 + 2 + 1.5 MiB read; chunk 2 is not.
    assert sorted(snap1.reads) == [0, 1, 3]
    assert r1.bytes_read == 2 * CHUNK + 1.5 * MiB
    assert r1.blocks == 4  # chunk 0: 2, chunk 1: 1 (one zero block), chunk 3: 1 (one zero)
    assert r1.blocks_uploaded == 4
    assert 0 < r1.bytes_uploaded < 4 * MiB + 4096  # random data does not compress
    assert await stored_blocks(target) == (await inspect_backup(target, r1.id)).digests()

    # Change 4 KiB in chunk 1's first block; everything else keeps its generation.
    vol.write(2 * MiB + 8192, b"\xab" * 4096)
    snap2 = vol.snapshot()
    r2 = await create_backup(target, snap2)
    assert snap2.reads == [1]
    assert r2.bytes_read == CHUNK
    assert r2.blocks == 4
    assert r2.blocks_uploaded == 1  # chunk 1's zero block stays null, nothing else changed
    m2 = await inspect_backup(target, r2.id)
    assert m2.parent == r1.id
    new_key = fmt.block_key(m2.chunks[1].blocks[0] or "")
    assert r2.bytes_uploaded == len(await target.get(new_key))
    assert r2.id > r1.id

    s1, s2 = await restored(target, r1.id), await restored(target, r2.id)
    assert s1.sha256() == snap1.sha256()
    assert s2.sha256() == snap2.sha256()
    assert sorted(s2.written) == [0, 1, 3]
    assert [m.id for m in await list_backups(target)] == [r1.id, r2.id]
    assert [m.id for m in await list_backups(target, "db")] == [r1.id, r2.id]
    assert await list_backups(target, "other") == []


async def test_nothing_changed_reads_and_uploads_nothing(target: Target) -> None:
    vol = make_volume()
    await create_backup(target, vol.snapshot())
    snap = vol.snapshot()
    r = await create_backup(target, snap)
    assert (snap.reads, r.bytes_read, r.blocks_uploaded, r.bytes_uploaded) == ([], 0, 0, 0)
    assert r.blocks == 4
    assert (await restored(target, r.id)).sha256() == snap.sha256()


async def test_identical_blocks_are_stored_once_across_volumes(target: Target) -> None:
    a = make_volume("a")
    ra = await create_backup(target, a.snapshot())
    b = MemVolume("b", SIZE, CHUNK)
    b.write(0, bytes(a.data))  # the same bytes, another volume (no parent to reuse)
    snap_b = b.snapshot()
    rb = await create_backup(target, snap_b)
    assert rb.bytes_read == 4 * CHUNK - MiB // 2  # every chunk is allocated in b
    assert (rb.blocks, rb.blocks_uploaded, rb.bytes_uploaded) == (4, 0, 0)
    assert len(await stored_blocks(target)) == ra.blocks_uploaded
    assert (await restored(target, rb.id)).sha256() == snap_b.sha256()
    # Within one backup too: two identical blocks are one object.
    c = MemVolume("c", 4 * MiB, CHUNK)
    c.write(0, b"\x01" * (4 * MiB))
    rc = await create_backup(target, c.snapshot())
    assert (rc.blocks, rc.blocks_uploaded) == (4, 1)


async def test_verify_and_restore_name_corrupt_and_missing_blocks(target: Target) -> None:
    vol = make_volume()
    snap = vol.snapshot()
    r = await create_backup(target, snap)
    assert (await verify_backup(target, r.id)).ok
    m = await inspect_backup(target, r.id)
    corrupt = m.chunks[0].blocks[1] or ""  # chunk 0, volume offset 1 MiB
    missing = m.chunks[3].blocks[0] or ""  # chunk 3, volume offset 6 MiB
    blob = bytearray(await target.get(fmt.block_key(corrupt)))
    blob[len(blob) // 2] ^= 0xFF
    await target.put(fmt.block_key(corrupt), bytes(blob))
    with pytest.raises(BackupCorrupt, match=f"{corrupt}.*chunk 0, volume offset {MiB}"):
        await restore_backup(target, r.id, MemSink(SIZE, CHUNK))
    await target.delete(fmt.block_key(missing))

    report = await verify_backup(target, r.id)
    assert not report.ok
    d = report.to_dict()
    assert [(p["block"], p["chunk"], p["offset"]) for p in d["corrupt"]] == [(corrupt, 0, MiB)]
    assert [(p["block"], p["chunk"], p["offset"]) for p in d["missing"]] == [(missing, 3, 6 * MiB)]
    err = report.error()
    assert isinstance(err, BackupCorrupt) and corrupt in str(err) and "1 more" in str(err)
    assert "\n" not in str(err)

    # Repair the corrupt one: restore now stops at the missing one, by name.
    await target.put(fmt.block_key(corrupt), fmt.encode_block(snap.data[MiB : 2 * MiB]))
    with pytest.raises(BlockMissing, match=f"{missing}.*chunk 3, volume offset {6 * MiB}"):
        await restore_backup(target, r.id, MemSink(SIZE, CHUNK))
    report = await verify_backup(target, r.id)
    assert [type(p) for p in report.problems] == [BlockMissing]


async def test_truncated_and_foreign_objects_are_corrupt(target: Target) -> None:
    vol = MemVolume("v", 2 * MiB, 64 * 1024)  # 64 KiB chunks: 64 KiB blocks
    vol.fill_random(0, 128 * 1024)
    r = await create_backup(target, vol.snapshot())
    m = await inspect_backup(target, r.id)
    a, b = m.chunks[0].blocks[0] or "", m.chunks[1].blocks[0] or ""
    await target.put(fmt.block_key(a), (await target.get(fmt.block_key(a)))[:20])
    await target.put(fmt.block_key(b), fmt.encode_block(b"not this block"))
    report = await verify_backup(target, r.id)
    assert {p.digest for p in report.problems} == {a, b}
    assert all(isinstance(p, BackupCorrupt) for p in report.problems)


async def test_delete_keeps_shared_blocks_and_frees_the_rest(target: Target) -> None:
    vol = make_volume()
    r1 = await create_backup(target, vol.snapshot())
    vol.fill_random(0, MiB)  # replaces one block of chunk 0
    snap2 = vol.snapshot()
    r2 = await create_backup(target, snap2)
    m1, m2 = await inspect_backup(target, r1.id), await inspect_backup(target, r2.id)
    assert len(m1.digests() - m2.digests()) == 1

    d = await delete_backup(target, r1.id)
    assert (d.gc, d.blocks_deleted, d.blocks_kept) == ("done", 1, 3)
    assert await stored_blocks(target) == m2.digests()
    with pytest.raises(BackupNotFound):
        await inspect_backup(target, r1.id)
    assert (await verify_backup(target, r2.id)).ok
    assert (await restored(target, r2.id)).sha256() == snap2.sha256()

    d2 = await delete_backup(target, r2.id)
    assert (d2.gc, d2.blocks_deleted, d2.blocks_kept) == ("done", 4, 0)
    assert await target.list("") == []
    with pytest.raises(BackupNotFound):
        await delete_backup(target, r2.id)


async def test_delete_during_a_running_backup(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = make_volume()
    r1 = await create_backup(target, vol.snapshot())
    m1 = await inspect_backup(target, r1.id)
    vol.write(2 * MiB, b"\x07" * 4096)  # chunk 1 changes; chunks 0 and 3 are reused from r1
    snap2 = vol.snapshot()
    snap2.gate = asyncio.Event()
    running = asyncio.create_task(create_backup(target, snap2))
    await asyncio.wait_for(snap2.reading.wait(), 10)
    assert len(await target.list(fmt.INPROGRESS)) == 1

    # The delete removes r1 but leaves every block alone while the backup runs.
    d = await delete_backup(target, r1.id)
    assert d.gc == "skipped" and "in progress" in d.gc_reason and d.blocks_deleted == 0
    assert await stored_blocks(target) == m1.digests()
    # As if a collection that started before the backup's marker had removed a block the
    # backup reuses without reading (chunk 3's): the backup must notice and re-read it.
    gone = m1.chunks[3].blocks[0] or ""
    await target.delete(fmt.block_key(gone))

    snap2.gate.set()
    r2 = await asyncio.wait_for(running, 30)
    assert sorted(snap2.reads) == [1, 3]  # chunk 3 re-read to put its block back
    assert r2.bytes_read == CHUNK + 1.5 * MiB
    assert await target.list(fmt.INPROGRESS) == []
    assert (await verify_backup(target, r2.id)).ok
    assert (await restored(target, r2.id)).sha256() == snap2.sha256()
    # The next delete may collect: r1's block that r2 does not use is freed now.
    r3 = await create_backup(target, vol.snapshot())
    d3 = await delete_backup(target, r3.id)
    assert d3.gc == "done"
    assert await stored_blocks(target) == (await inspect_backup(target, r2.id)).digests()


async def test_backup_waits_for_a_running_collection(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(markers, "HEARTBEAT_EVERY", 0.2)
    vol = make_volume()
    now = time.time()
    gc_marker = fmt.Marker("20260101T000000000Z-abcdef", "gc", "", "", now, now, "test")
    key = fmt.marker_key(fmt.GC, gc_marker.id)
    await target.put(key, gc_marker.to_json())
    task = asyncio.create_task(create_backup(target, vol.snapshot()))
    await asyncio.sleep(1.0)
    assert not task.done()  # blocks read and uploaded, but it waits before its final check
    assert await target.list(fmt.BACKUPS) == []
    await target.delete(key)
    r = await asyncio.wait_for(task, 10)
    assert (await verify_backup(target, r.id)).ok


async def test_stale_markers_do_not_stop_collection(target: Target) -> None:
    vol = make_volume()
    r1 = await create_backup(target, vol.snapshot())
    old = time.time() - 10 * markers.STALE_AFTER
    dead = fmt.Marker("20260101T000000000Z-123456", "backup", "db", "x", old, old, "gone:1")
    await target.put(fmt.marker_key(fmt.INPROGRESS, dead.id), dead.to_json())
    await target.put(fmt.block_key("ab" * 32), fmt.encode_block(b"orphan of a crashed backup"))
    d = await delete_backup(target, r1.id)
    assert d.gc == "done" and d.blocks_deleted == 5  # r1's four and the orphan
    assert await target.list("") == []


async def test_backup_never_written_leaves_no_backup(target: Target) -> None:
    class Broken(MemSnapshot):
        async def read_chunk(self, chunk: int) -> bytes:
            if chunk == 3:
                raise OSError("replica went away")
            return await super().read_chunk(chunk)

    vol = make_volume()
    src = Broken(vol, "s")
    with pytest.raises(OSError, match="replica went away"):
        await create_backup(target, src)
    assert await list_backups(target) == []
    assert await target.list(fmt.INPROGRESS) == []
