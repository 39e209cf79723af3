"""An in-memory `Export`, for tests and benchmarks of the NBD front end alone."""

from __future__ import annotations

import asyncio

_ZEROES = memoryview(bytes(1 << 20))


class MemoryExport:
    """A RAM-backed block device. Counts flushes, FUA writes, trims and zero requests so
    tests can check which flags reached the export. `delay` (seconds) makes every call
    yield to the loop for that long, to exercise out-of-order replies and backpressure."""

    def __init__(self, name: str, size: int, *, delay: float = 0.0) -> None:
        self._name = name
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self.delay = delay
        self.flushes = 0
        self.fua_writes = 0
        self.trims = 0
        self.zero_requests = 0
        self.no_hole_zeroes = 0
        self.inflight = 0
        self.max_inflight_seen = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return len(self._buf)

    def resize(self, size: int) -> None:
        """Grow online (shrinking is not a volume operation)."""
        if size < len(self._buf):
            raise ValueError("memory export can only grow")
        # A bytearray cannot be resized while a view of it exists.
        self._view.release()
        self._buf.extend(bytes(size - len(self._buf)))
        self._view = memoryview(self._buf)

    def contents(self, offset: int = 0, length: int | None = None) -> bytes:
        end = len(self._buf) if length is None else offset + length
        return bytes(self._view[offset:end])

    async def _enter(self) -> None:
        self.inflight += 1
        self.max_inflight_seen = max(self.max_inflight_seen, self.inflight)
        if self.delay:
            await asyncio.sleep(self.delay)

    async def read(self, offset: int, length: int) -> bytes:
        await self._enter()
        try:
            # A copy: the reply may sit in the transport while later writes change memory.
            return bytes(self._view[offset : offset + length])
        finally:
            self.inflight -= 1

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._enter()
        try:
            self._view[offset : offset + data.nbytes] = data
            if fua:
                self.fua_writes += 1
        finally:
            self.inflight -= 1

    async def flush(self) -> None:
        await self._enter()
        self.flushes += 1
        self.inflight -= 1

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._enter()
        # Trimmed ranges read back as zeroes, which NBD allows (contents are unspecified).
        self._zero(offset, length)
        self.trims += 1
        self.inflight -= 1

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        await self._enter()
        self._zero(offset, length)
        self.zero_requests += 1
        if not may_trim:
            self.no_hole_zeroes += 1
        self.inflight -= 1

    def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZEROES.nbytes, end - offset)
            self._view[offset : offset + n] = _ZEROES[:n]
            offset += n
