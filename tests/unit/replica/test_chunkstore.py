"""Chunk store: format, superblock checks, journal replay and checkpoints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from replica.chunkstore import ChunkStore
from replica.errors import (
    CorruptSuperblock,
    DiskError,
    DiskInUse,
    ForeignDisk,
    NotFormatted,
    UnsupportedFormat,
)
from replica.fileio import OSFile, VolatileFile
from replica.ondisk import (
    FORMAT_VERSION,
    decode_checkpoint,
    decode_records,
    encode_superblock,
)

CHUNK = 64 << 10


def formatted(size: int = 4 << 20) -> VolatileFile:
    f = VolatileFile(size)
    ChunkStore.format(f, cluster_id="c1", node_id="n1", disk_id="d1", chunk_size=CHUNK)
    return f


def reboot(f: VolatileFile) -> VolatileFile:
    """The disk as it is after a power cut with nothing unsynced surviving."""
    return VolatileFile.from_image(f.durable_image())


def checkpoint_seq(image: bytes) -> int:
    sb = ChunkStore.read_superblock(VolatileFile.from_image(image))
    seqs = [0]
    for area in (0, 1):
        start = sb.meta_offset + area * sb.meta_size
        got = decode_checkpoint(image[start : start + sb.meta_size])
        if got is not None:
            seqs.append(got[0])
    return max(seqs)


def journal_extents(image: bytes) -> list[tuple[int, int]]:
    """(start, end) disk offsets of the records replay would apply, in order."""
    sb = ChunkStore.read_superblock(VolatileFile.from_image(image))
    area = image[sb.journal_offset : sb.journal_offset + sb.journal_size]
    out, pos = [], 0
    for end, _ in decode_records(area, checkpoint_seq(image)):
        out.append((sb.journal_offset + pos, sb.journal_offset + end))
        pos = end
    return out


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


def patched(image: bytes, offset: int, data: bytes) -> VolatileFile:
    buf = bytearray(image)
    buf[offset : offset + len(data)] = data
    return VolatileFile.from_image(bytes(buf))


async def test_format_and_reopen_keeps_ids_and_chunks() -> None:
    f = formatted()
    store = ChunkStore.open(f, cluster_id="c1")
    assert not store.unclean
    sb = store.superblock
    assert (sb.cluster_id, sb.node_id, sb.disk_id, sb.chunk_size) == ("c1", "n1", "d1", CHUNK)
    assert sb.format_version == FORMAT_VERSION
    await store.open_volume("v", 3, 10 * CHUNK)
    await store.write("v", 3, 2, 5, b"abc", seq=9)
    await store.close()

    again = ChunkStore.open(reboot(f), cluster_id="c1")
    assert not again.unclean
    assert again.superblock == sb
    assert again.read("v", 3, 2, 5, 3) == b"abc"
    assert again.generations("v") == {2: (3, 9)}
    meta = again.volumes()["v"]
    assert (meta.size, meta.epoch, meta.dirty, meta.unclean_dirty) == (10 * CHUNK, 3, {2}, False)
    assert ChunkStore.read_superblock(f) == sb


def test_foreign_disk_is_refused() -> None:
    f = formatted()
    with pytest.raises(ForeignDisk, match=r"c1.*other"):
        ChunkStore.open(f, cluster_id="other")
    ChunkStore.open(f)  # no cluster given: the caller only wants to look


def test_corrupt_superblock_is_refused() -> None:
    image = formatted().durable_image()
    at = image.index(b"n1")
    with pytest.raises(CorruptSuperblock):
        ChunkStore.open(patched(image, at, b"m"), cluster_id="c1")


def test_unsupported_version_is_refused() -> None:
    f = formatted()
    sb = ChunkStore.read_superblock(f)
    f.pwrite(encode_superblock(dataclasses.replace(sb, format_version=FORMAT_VERSION + 1)), 0)
    f.fdatasync()
    with pytest.raises(UnsupportedFormat):
        ChunkStore.open(f)
    # A different version whose checksum also does not match still reads as a version issue.
    image = f.durable_image()
    with pytest.raises(UnsupportedFormat):
        ChunkStore.read_superblock(patched(image, 100, b"\xff"))


def test_not_formatted() -> None:
    with pytest.raises(NotFormatted):
        ChunkStore.open(VolatileFile(1 << 20))
    junk = VolatileFile(1 << 20)
    junk.pwrite(b"EXT4FS\0\0" + b"\x01" * 100, 0)
    with pytest.raises(NotFormatted):
        ChunkStore.read_superblock(junk)


def test_disk_too_small_for_a_chunk() -> None:
    with pytest.raises(DiskError):
        ChunkStore.format(
            VolatileFile(200 << 10), cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK
        )


async def test_journal_replay_after_reopen_without_close() -> None:
    f = formatted()
    store = ChunkStore.open(f, cluster_id="c1", boot_id="boot-1")
    await store.open_volume("v", 1, 4 * CHUNK, sync_writes=True)
    await store.write("v", 1, 0, 0, b"x" * 4096, seq=1)
    await store.write("v", 1, 3, 100, b"y" * 10, seq=2)
    await store.trim("v", 1, 0, 0, 512, seq=3)
    await store.flush()

    # Host rebooted (other boot id): the dirty chunks may have lost unflushed writes.
    after = ChunkStore.open(reboot(f), cluster_id="c1", boot_id="boot-2")
    assert after.unclean
    meta = after.volumes()["v"]
    assert (meta.epoch, meta.sync_writes, meta.dirty, meta.unclean_dirty) == (1, True, {0, 3}, True)
    assert after.read("v", 1, 0, 0, 4096) == bytes(512) + b"x" * 3584
    assert after.read("v", 1, 3, 100, 10) == b"y" * 10
    assert after.generations("v") == {0: (1, 3), 3: (1, 2)}

    # Only the process died (same boot): the page cache kept every applied write.
    same_boot = ChunkStore.open(reboot(f), cluster_id="c1", boot_id="boot-1")
    assert same_boot.unclean
    assert same_boot.volumes()["v"].unclean_dirty is False


async def test_unclean_flag_survives_a_clean_restart_until_mark_clean() -> None:
    f = formatted()
    store = ChunkStore.open(f)
    await store.open_volume("v", 1, 4 * CHUNK)
    await store.write("v", 1, 1, 0, b"a", seq=1)
    await store.flush()
    f = reboot(f)
    crashed = ChunkStore.open(f)
    await crashed.close()
    f = reboot(f)
    clean = ChunkStore.open(f)
    assert not clean.unclean
    assert clean.volumes()["v"].unclean_dirty  # still not resynced
    await clean.mark_clean("v", 1, [1])
    meta = ChunkStore.open(reboot(f)).volumes()["v"]
    assert (meta.dirty, meta.unclean_dirty) == (set(), False)


async def _volume_with_epochs(f: VolatileFile) -> None:
    store = ChunkStore.open(f)
    await store.open_volume("v", 5, 4 * CHUNK)
    await store.write("v", 5, 0, 0, b"data", seq=1)
    await store.flush()
    await store.open_volume("v", 6, 4 * CHUNK)
    await store.open_volume("v", 7, 4 * CHUNK)


async def test_torn_last_journal_record_is_ignored() -> None:
    f = formatted()
    await _volume_with_epochs(f)
    image = f.durable_image()
    start, end = journal_extents(image)[-1]
    for keep in (end - start - 1, 12, 3):  # torn inside the body, after the header, in it
        torn = patched(image, start + keep, bytes(end - start - keep))
        store = ChunkStore.open(torn)
        assert store.volumes()["v"].epoch == 6
        assert store.read("v", 6, 0, 0, 4) == b"data"


async def test_checksum_mismatch_in_a_middle_record_stops_replay_there() -> None:
    f = formatted()
    await _volume_with_epochs(f)
    image = f.durable_image()
    extents = journal_extents(image)
    _, end = extents[-2]  # epoch 6; the epoch 7 record after it is intact
    flipped = bytes([image[end - 1] ^ 0x40])
    store = ChunkStore.open(patched(image, end - 1, flipped))
    assert store.volumes()["v"].epoch == 5
    assert store.read("v", 5, 0, 0, 4) == b"data"
    assert ChunkStore.open(VolatileFile.from_image(image)).volumes()["v"].epoch == 7


async def test_full_journal_rotates_through_checkpoints() -> None:
    f = formatted()
    store = ChunkStore.open(f)
    first = checkpoint_seq(f.durable_image())
    for epoch in range(1, 3000):
        await store.open_volume("v", epoch, 4 * CHUNK)
        if epoch == 10:
            await store.write("v", epoch, 1, 0, b"kept", seq=1)
    # More records than the journal holds were written, so it must have wrapped...
    assert checkpoint_seq(f.durable_image()) > first
    after = ChunkStore.open(reboot(f))
    assert after.volumes()["v"].epoch == 2999
    assert after.read("v", 2999, 1, 0, 4) == b"kept"
    # ...and records of older checkpoints left in the journal area are not replayed.
    live = journal_extents(f.durable_image())
    assert 0 < len(live) < 2999
    # The area past the live records still holds older checkpoints' records, rejected by
    # their generation alone.
    sb = store.superblock
    image = f.durable_image()
    rest = image[live[-1][1] : sb.journal_offset + sb.journal_size]
    older = checkpoint_seq(image) - 1
    assert any(
        True for _ in decode_records(rest[rest.index(older.to_bytes(8, "little")) - 8 :], older)
    )


def test_disk_in_use(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    sparse_file(path, 4 << 20)
    first = OSFile.open(str(path))
    try:
        with pytest.raises(DiskInUse, match="in use"):
            OSFile.open(str(path))
    finally:
        first.close()
    OSFile.open(str(path)).close()  # the lock went with the first handle


async def test_os_file_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    sparse_file(path, 8 << 20)
    f = OSFile.open(str(path))
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    store = ChunkStore.open(f, cluster_id="c")
    await store.open_volume("v", 1, 8 * CHUNK)
    await store.write("v", 1, 4, 0, os.urandom(CHUNK), seq=1, durable=True)
    allocated = os.stat(path).st_blocks
    await store.trim("v", 1, 4, 0, CHUNK, seq=2)
    await store.flush()
    assert os.stat(path).st_blocks < allocated  # the hole was punched
    await store.write("v", 1, 2, 10, b"keep", seq=3)
    await store.close()
    f.close()
    f = OSFile.open(str(path))
    try:
        again = ChunkStore.open(f, cluster_id="c")
        assert again.read("v", 1, 2, 10, 4) == b"keep"
        assert again.read("v", 1, 4, 0, CHUNK) == bytes(CHUNK)
        assert f.size() == 8 << 20
    finally:
        f.close()
