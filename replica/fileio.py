"""The one small file-I/O interface the chunk store's durability order lives behind.

`OSFile` is a regular file or a block device. `VolatileFile` is an in-memory disk for tests
that models a page cache: writes are visible at once but only `fdatasync` makes them durable,
and `power_cut` returns what a disk could hold after losing power at that instant.

Large writes (a whole chunk installed by a rebuild) may go off the event loop: `submit` runs a
job in the file's own worker threads while the byte range it names stays *held*: every other
`pread`, `pwrite` and `punch` of an overlapping range waits until the job is done. So a held
range can be freed, zeroed and handed out again only after the job's bytes have landed, never
under them. (`fdatasync` does not wait for jobs: what a job wrote is durable after the first
`fdatasync` that starts once the job is done.) Inside
such a job, `pwrite_direct` writes with O_DIRECT (page-aligned bounce buffer, aligned offset
and length), skipping the page cache: the disk's sequential bandwidth without the writeback
and copy costs. The kernel keeps the cached pages of that range coherent (written back before,
invalidated after). O_DIRECT does not make a write durable (the device may cache it, and a
write into a hole allocates blocks): `fdatasync` does, as for any write.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import random
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol

from replica.errors import DiskInUse

SECTOR = 512
_ZERO_CHUNK = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
DIRECT_ALIGN = 4096  # offsets, lengths and buffers of O_DIRECT writes (any logical block size)
_WORKERS = 4  # threads per file for submitted jobs
_BOUNCE_KEEP = 8  # idle aligned buffers kept per file


class BlockFile(Protocol):
    def pread(self, length: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes | memoryview, offset: int) -> None: ...

    def fdatasync(self) -> None:
        """Blocking; the store calls it from a worker thread, never on the event loop."""
        ...

    def size(self) -> int: ...

    def punch(self, offset: int, length: int) -> None:
        """Zero a range and free its space where the disk can; durable like a write."""
        ...

    def submit(
        self, offset: int, length: int, job: Callable[[], None]
    ) -> concurrent.futures.Future[None]:
        """Run blocking `job` off the caller's thread with [offset, offset+length) held (see
        the module docstring); the range is held from this call on, not from the job's start."""
        ...

    def pwrite_direct(self, data: bytes | memoryview, offset: int) -> None:
        """Blocking: `pwrite` around the page cache where it can (an aligned whole-chunk write);
        the same result as `pwrite` otherwise. Durable only after `fdatasync`, like `pwrite`."""
        ...

    @property
    def changes(self) -> int:
        """How many writes and punches have completed, from any thread: an unchanged count
        means nothing reached the file in between (the group commit skips a sync then)."""
        ...

    def close(self) -> None: ...


def _load_fallocate() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


class OSFile:
    """A disk on the host: regular (possibly sparse) file or block device, held exclusively."""

    def __init__(self, fd: int, path: str, is_block: bool) -> None:
        self._fd = fd
        self.path = path
        self._is_block = is_block
        self._can_punch = not is_block and _fallocate is not None
        self._held = _HeldRanges()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._dfd = -1  # the O_DIRECT descriptor, opened on first use
        self._direct_ok = True  # False once the filesystem refused O_DIRECT
        self._bounce: list[mmap.mmap] = []
        self._bounce_lock = threading.Lock()
        self._changes = 0
        self._changes_lock = threading.Lock()  # writes complete on worker threads too

    @classmethod
    def open(cls, path: str) -> OSFile:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            # Two processes driving one disk would each trust their own metadata and
            # silently overwrite each other's chunks.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskInUse(f"disk {path} is in use by another process") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, stat.S_ISBLK(os.fstat(fd).st_mode))

    def pread(self, length: int, offset: int) -> bytes:
        if self._held.busy:
            self._held.wait_clear(offset, length)
        return os.pread(self._fd, length, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        if self._held.busy:
            self._held.wait_clear(offset, len(data))
        self._pwrite(self._fd, memoryview(data), offset)
        self._changed()

    @property
    def changes(self) -> int:
        return self._changes

    def _changed(self) -> None:
        # Counted once the write is done, never before: a sync that read the count may only
        # vouch for writes that had completed when it read it.
        with self._changes_lock:
            self._changes += 1

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int) -> None:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def submit(
        self, offset: int, length: int, job: Callable[[], None]
    ) -> concurrent.futures.Future[None]:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(_WORKERS, "pxc-fileio")
        ticket = self._held.hold(offset, length)
        try:
            fut = self._pool.submit(job)
        except BaseException:
            self._held.release(ticket)
            raise
        fut.add_done_callback(lambda _: self._held.release(ticket))
        return fut

    def pwrite_direct(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        if not n or offset % DIRECT_ALIGN or n % DIRECT_ALIGN or not self._open_direct():
            self._pwrite(self._fd, view, offset)  # the caller holds the range already
            self._changed()
            return
        # A large frame's payload sits page-aligned in its receive buffer: O_DIRECT takes it
        # from there. Anything else goes through an aligned bounce buffer.
        buf = None if _aligned(view) else self._take_bounce(n)
        out = view if buf is None else memoryview(buf)[:n]
        try:
            if buf is not None:
                _copy_into(buf, view, n)
            self._pwrite(self._dfd, out, offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Alignment this device does not take after all: the page cache it is.
            self._direct_ok = False
            self._pwrite(self._fd, view, offset)
        finally:
            if buf is not None:
                out.release()
                self._give_bounce(buf)
        self._changed()

    def _open_direct(self) -> bool:
        if self._dfd >= 0:
            return True
        if not self._direct_ok or not hasattr(os, "O_DIRECT"):
            return False
        with self._bounce_lock:
            if self._dfd < 0:
                try:
                    self._dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
                except OSError:  # tmpfs and some others: no O_DIRECT
                    self._direct_ok = False
                    return False
                if not os.path.samestat(os.fstat(self._dfd), os.fstat(self._fd)):
                    os.close(self._dfd)  # the path names another file now: never write there
                    self._dfd = -1
                    self._direct_ok = False
                    return False
        return True

    def _take_bounce(self, n: int) -> mmap.mmap:
        with self._bounce_lock:
            for i, b in enumerate(self._bounce):
                if len(b) >= n:
                    return self._bounce.pop(i)
        # Anonymous mappings are page-aligned, as O_DIRECT wants its buffers.
        return mmap.mmap(-1, -(-n // mmap.PAGESIZE) * mmap.PAGESIZE)

    def _give_bounce(self, buf: mmap.mmap) -> None:
        with self._bounce_lock:
            if len(self._bounce) < _BOUNCE_KEEP:
                self._bounce.append(buf)
                return
        buf.close()

    def fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def punch(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._held.busy:
            self._held.wait_clear(offset, length)
        if self._can_punch and _fallocate is not None:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if _fallocate(self._fd, mode, offset, length) == 0:
                self._changed()
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err))
            self._can_punch = False
        zeros = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.pwrite(memoryview(zeros)[:n], offset)
            offset += n

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        with self._bounce_lock:
            bufs, self._bounce = self._bounce, []
        for b in bufs:
            b.close()
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1


def _aligned(view: memoryview) -> bool:
    """Whether O_DIRECT can write straight from `view` (writable, contiguous, page-aligned)."""
    if view.readonly or not view.c_contiguous:
        return False
    src = (ctypes.c_char * view.nbytes).from_buffer(view)
    try:
        return ctypes.addressof(src) % DIRECT_ALIGN == 0
    finally:
        del src  # its export of the buffer ends here


def _copy_into(buf: mmap.mmap, view: memoryview, n: int) -> None:
    """buf[:n] = view, without holding the GIL where ctypes can reach the source's memory
    (a writable buffer: a receive buffer; or bytes): the event loop keeps receiving meanwhile."""
    src: Any = None
    if isinstance(view.obj, bytes) and view.nbytes == len(view.obj):
        src = ctypes.c_char_p(view.obj)  # points into the bytes object itself, no copy
        addr: int | None = ctypes.cast(src, ctypes.c_void_p).value
    elif not view.readonly and view.c_contiguous:
        src = (ctypes.c_char * n).from_buffer(view)
        addr = ctypes.addressof(src)
    if src is None or addr is None:
        memoryview(buf)[:n] = view
        return
    dst = ctypes.c_char.from_buffer(buf)
    try:
        ctypes.memmove(ctypes.addressof(dst), addr, n)
    finally:
        del dst, src  # their exports of the buffers end here, not at some later collection


class _HeldRanges:
    """Byte ranges held by jobs in flight, and the waits for them to clear."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ranges: dict[int, tuple[int, int]] = {}  # ticket -> (start, end)
        self._next = 0
        self.busy = False  # read without the lock: a fast path that only ever errs towards it

    def hold(self, offset: int, length: int) -> int:
        with self._cond:
            self._next += 1
            self._ranges[self._next] = (offset, offset + length)
            self.busy = True
            return self._next

    def release(self, ticket: int) -> None:
        with self._cond:
            self._ranges.pop(ticket, None)
            self.busy = bool(self._ranges)
            self._cond.notify_all()

    def wait_clear(self, offset: int, length: int) -> None:
        end = offset + length
        with self._cond:
            self._cond.wait_for(
                lambda: not any(s < end and offset < e for s, e in self._ranges.values())
            )


class VolatileFile:
    """In-memory disk with a page cache, for power-cut tests.

    Thread-safe: the store runs fdatasync in a worker thread while the loop keeps writing.
    """

    def __init__(self, size: int) -> None:
        self._durable = bytearray(size)
        self._current = bytearray(size)
        self._pending: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()
        self.syncs = 0
        self._changes = 0

    @classmethod
    def from_image(cls, image: bytes) -> VolatileFile:
        f = cls(len(image))
        f._durable[:] = image
        f._current[:] = image
        return f

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            return bytes(self._current[offset : offset + length])

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        blob = bytes(data)
        if offset < 0 or offset + len(blob) > len(self._current):
            raise OSError(errno.ENOSPC, "write past the end of the disk")
        with self._lock:
            self._current[offset : offset + len(blob)] = blob
            self._pending.append((offset, blob))
            self._changes += 1

    @property
    def changes(self) -> int:
        return self._changes

    def fdatasync(self) -> None:
        with self._lock:
            for offset, blob in self._pending:
                self._durable[offset : offset + len(blob)] = blob
            self._pending.clear()
            self.syncs += 1

    def size(self) -> int:
        return len(self._current)

    def punch(self, offset: int, length: int) -> None:
        self.pwrite(bytes(length), offset)

    def submit(
        self, offset: int, length: int, job: Callable[[], None]
    ) -> concurrent.futures.Future[None]:
        """Runs the job at once: deterministic for tests, and nothing can overlap it."""
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            job()
        except BaseException as e:
            fut.set_exception(e)
        else:
            fut.set_result(None)
        return fut

    def pwrite_direct(self, data: bytes | memoryview, offset: int) -> None:
        # Like the real one: on the device once it returns, durable only after fdatasync.
        self.pwrite(data, offset)

    def close(self) -> None:
        pass

    def durable_image(self) -> bytes:
        with self._lock:
            return bytes(self._durable)

    def power_cut(self, rng: random.Random, tear: bool = True) -> bytes:
        """What the disk may hold after power loss now: the durable image plus any subset of
        the unsynced writes, landed in any order, the last one possibly torn at a sector."""
        with self._lock:
            image = bytearray(self._durable)
            survivors = [w for w in self._pending if rng.random() < 0.5]
        rng.shuffle(survivors)
        for i, (offset, blob) in enumerate(survivors):
            if tear and i == len(survivors) - 1 and rng.random() < 0.5:
                blob = _torn(blob, offset, rng)
            image[offset : offset + len(blob)] = blob
        return bytes(image)


def _torn(blob: bytes, offset: int, rng: random.Random) -> bytes:
    """A prefix of the write ending at a sector boundary of the disk."""
    first_boundary = (-offset) % SECTOR
    cuts = list(range(first_boundary, len(blob), SECTOR))
    if not cuts:
        return b""
    return blob[: rng.choice(cuts)]
