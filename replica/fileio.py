"""The one small file-I/O interface the chunk store's durability order lives behind.

`OSFile` is a regular file or a block device. `VolatileFile` is an in-memory disk for tests
that models a page cache: writes are visible at once but only `fdatasync` makes them durable,
and `power_cut` returns what a disk could hold after losing power at that instant.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import random
import stat
import threading
from typing import Any, Protocol

from replica.errors import DiskInUse

SECTOR = 512
_ZERO_CHUNK = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


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
        return os.pread(self._fd, length, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def fdatasync(self) -> None:
        os.fdatasync(self._fd)

    def size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_END)

    def punch(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._can_punch and _fallocate is not None:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if _fallocate(self._fd, mode, offset, length) == 0:
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
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1


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
