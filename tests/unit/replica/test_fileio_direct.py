"""Whole-chunk writes off the event loop: O_DIRECT landing of exactly the bytes given,
ranges held while a job runs, and the chunk store's write_chunk over a real file (page cache
coherency, crash-style reopen, a failed landing)."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from replica.chunkstore import ChunkStore
from replica.fileio import OSFile, VolatileFile

CHUNK = 256 << 10


def new_file(tmp_path: Path, size: int = 8 << 20) -> OSFile:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return OSFile.open(str(path))


def direct_io_works(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_CREAT | os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_pwrite_direct_writes_exactly_the_bytes(tmp_path: Path) -> None:
    f = new_file(tmp_path)
    try:
        a = os.urandom(CHUNK)
        f.pwrite(b"\xee" * (3 * CHUNK), 0)
        assert f.pread(CHUNK, CHUNK) == b"\xee" * CHUNK  # now in the page cache
        f.pwrite_direct(a, CHUNK)  # bytes
        assert f._dfd >= 0 or not direct_io_works(tmp_path)  # around the page cache indeed
        # The cached pages of the range went: the page-cache fd reads the new bytes.
        assert f.pread(CHUNK, CHUNK) == a
        assert f.pread(CHUNK, 0) == b"\xee" * CHUNK
        assert f.pread(CHUNK, 2 * CHUNK) == b"\xee" * CHUNK
        # A payload inside a receive buffer: unaligned, writable, sliced.
        rx = bytearray(os.urandom(CHUNK + 100))
        view = memoryview(rx)[37 : 37 + CHUNK]
        f.pwrite_direct(view, 0)
        assert f.pread(CHUNK, 0) == bytes(view)
        view.release()
        rx.extend(b"x")  # no export of the buffer is left behind
        # A read-only slice of bytes (copied under the GIL), an unaligned length and offset
        # (through the page cache): the same result either way.
        blob = os.urandom(CHUNK + 8)
        f.pwrite_direct(memoryview(blob)[8:], 2 * CHUNK)
        assert f.pread(CHUNK, 2 * CHUNK) == blob[8:]
        f.pwrite_direct(b"abc", 4 * CHUNK + 5)
        assert f.pread(5, 4 * CHUNK + 3) == b"\0\0abc"
        f.fdatasync()
    finally:
        f.close()
    # What another open of the file sees (after close: nothing cached by this OSFile).
    with open(tmp_path / "disk.img", "rb") as g:
        g.seek(CHUNK)
        assert g.read(CHUNK) == a


def test_pwrite_direct_from_an_aligned_buffer_takes_no_bounce(tmp_path: Path) -> None:
    if not direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    f = new_file(tmp_path)
    try:
        rx = mmap.mmap(-1, 2 * CHUNK)  # a large receive buffer: page-aligned
        data = os.urandom(CHUNK)
        rx[4096 : 4096 + CHUNK] = data
        view = memoryview(rx)[4096 : 4096 + CHUNK]
        f.pwrite_direct(view, CHUNK)
        assert f._bounce == []  # written from the buffer itself
        assert f.pread(CHUNK, CHUNK) == data
        view.release()
        # The same buffer, off by 512 bytes: through a bounce buffer, the same bytes.
        view = memoryview(rx)[512 : 512 + CHUNK]
        f.pwrite_direct(view, 0)
        assert len(f._bounce) == 1
        assert f.pread(CHUNK, 0) == bytes(view)
        view.release()
        rx.close()  # no export of the buffer is left behind
    finally:
        f.close()


def test_held_range_makes_overlapping_access_wait(tmp_path: Path) -> None:
    f = new_file(tmp_path)
    release = threading.Event()
    events: list[str] = []

    def job() -> None:
        release.wait(5)
        f.pwrite_direct(b"\x01" * CHUNK, CHUNK)
        events.append("landed")

    fut = f.submit(CHUNK, CHUNK, job)
    try:
        # Outside the range: no wait.
        f.pwrite(b"\x02" * 4096, 0)
        assert f.pread(4096, 2 * CHUNK) == bytes(4096)
        assert events == []

        def overlapping(name: str, op: object) -> threading.Thread:
            def run() -> None:
                op()  # type: ignore[operator]
                events.append(name)

            t = threading.Thread(target=run)
            t.start()
            return t

        readers = [
            overlapping("read", lambda: f.pread(100, CHUNK + 4000)),
            overlapping("punch", lambda: f.punch(CHUNK + CHUNK // 2, CHUNK)),
        ]
        time.sleep(0.2)
        assert events == []  # both wait for the job
        release.set()
        fut.result(5)
        for t in readers:
            t.join(5)
        assert events[0] == "landed" and sorted(events[1:]) == ["punch", "read"]
        # The punch came after the landing: its part of the range is zero, the rest landed.
        assert f.pread(CHUNK // 2, CHUNK) == b"\x01" * (CHUNK // 2)
        assert f.pread(CHUNK // 2, CHUNK + CHUNK // 2) == bytes(CHUNK // 2)
    finally:
        release.set()
        f.close()


async def store_on(f: OSFile | VolatileFile) -> ChunkStore:
    ChunkStore.format(f, cluster_id="c", node_id="n", disk_id="d", chunk_size=CHUNK)
    return ChunkStore.open(f, cluster_id="c", boot_id="b")


async def test_write_chunk_over_a_real_file_and_reopen(tmp_path: Path) -> None:
    f = new_file(tmp_path, 16 << 20)
    store = await store_on(f)
    await store.open_volume("v", 1, 8 * CHUNK)
    chunks = {i: os.urandom(CHUNK) for i in range(6)}
    # Fresh chunks, several at once (as a rebuild sends them).
    await asyncio.gather(*(store.write_chunk("v", 1, i, d, (1, 10 + i)) for i, d in chunks.items()))
    # An existing chunk, cached by a read first, replaced by a whole-chunk write.
    await store.write("v", 1, 6, 4096, b"old" * 100, seq=20)
    assert store.read("v", 1, 6, 4096, 300) == b"old" * 100
    chunks[6] = os.urandom(CHUNK)
    await store.write_chunk("v", 1, 6, chunks[6], (1, 30))
    # A later small write into a rebuilt chunk goes through the page cache as usual.
    await store.write("v", 1, 2, 8192, b"new", seq=31)
    chunks[2] = chunks[2][:8192] + b"new" + chunks[2][8195:]
    for i, d in chunks.items():
        copy = store.read_chunk("v", 1, i)  # checksums verified
        assert copy.data == d
    gens = store.generations("v")
    assert gens[0] == (1, 10) and gens[5] == (1, 15) and gens[6] == (1, 30)
    assert gens[2] == (1, 31)
    await store.flush()
    # A crash-style stop: no close, so the reopen is unclean (same boot: page cache kept).
    f.close()
    g = OSFile.open(str(tmp_path / "disk.img"))
    try:
        again = ChunkStore.open(g, cluster_id="c", boot_id="b")
        assert again.unclean
        meta = again.volumes()["v"]
        for i, d in chunks.items():
            assert again.read_chunk("v", meta.epoch, i).data == d
        assert again.generations("v") == gens
        await again.close()
    finally:
        g.close()


class FailingLanding(VolatileFile):
    def pwrite_direct(self, data: bytes | memoryview, offset: int) -> None:
        raise OSError(errno.EIO, "injected")


async def test_failed_landing_fails_the_write_and_drops_the_generation() -> None:
    f = FailingLanding(16 << 20)
    store = await store_on(f)
    await store.open_volume("v", 1, 4 * CHUNK)
    with pytest.raises(OSError):
        await store.write_chunk("v", 1, 1, os.urandom(CHUNK), (1, 5))
    # Whatever the slot holds, the generation does not claim the copy: a rebuild redoes it.
    assert store.generations("v").get(1, (0, 0)) == (0, 0)
    assert 1 in store.volumes()["v"].dirty
