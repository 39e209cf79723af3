"""The floor of a socket-fed replica server: the least any server behind a loopback socket can do
per write (receive the frame into a reused buffer, pwrite it, reply one byte in order), with
none of the replica's work (no protocol checks, epochs, dirty log, checksums, group commit).

`bench/replica_bench.py --floor` runs it beside the plain file and the replica server, so each
cell shows how much of the gap to the file is the socket itself and how much is ours.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import struct
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import cast

_HEAD = struct.Struct("<BQI")  # op, offset, payload length
WRITE, FLUSH, DURABLE = 0, 1, 2


class _Server(asyncio.BufferedProtocol):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray(8 << 20)
        self.view = memoryview(self.buf)
        self.have = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.have :]

    def buffer_updated(self, nbytes: int) -> None:
        self.have += nbytes
        pos = 0
        replies = 0
        while self.have - pos >= _HEAD.size:
            op, off, n = _HEAD.unpack_from(self.buf, pos)
            if self.have - pos < _HEAD.size + n:
                break
            start = pos + _HEAD.size
            if op != FLUSH:
                os.pwrite(self.fd, self.view[start : start + n], off)
            if op != WRITE:
                os.fdatasync(self.fd)
            pos = start + n
            replies += 1
        if pos:
            rest = self.have - pos
            self.buf[:rest] = self.buf[pos : self.have]
            self.have = rest
        if replies:
            assert self.transport is not None
            self.transport.write(bytes(replies))


def _serve(path: str, port: int, ready: Event) -> None:
    import uvloop

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _Server(fd), "127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


class FloorServer:
    def __init__(self, path: Path, size: int, port: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)
        self.port = port
        # spawn, not fork: the parent runs an event loop, which a forked child would inherit.
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(str(path), port, ready), daemon=True)
        self.proc.start()
        if not ready.wait(10):
            self.proc.kill()
            raise RuntimeError("floor server did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(5)


class FloorClient:
    """Pipelined: replies come back in request order, one byte each."""

    def __init__(self) -> None:
        self.pending: collections.deque[asyncio.Future[None]] = collections.deque()
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None

    async def connect(self, port: int) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for _ in range(len(data)):
                self.pending.popleft().set_result(None)

    async def _call(self, op: int, off: int, payload: memoryview | bytes) -> None:
        assert self.writer is not None
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.writer.write(_HEAD.pack(op, off, len(payload)))
        if payload:
            self.writer.write(payload)
        await self.writer.drain()
        await fut

    async def write(self, off: int, data: memoryview, durable: bool) -> None:
        await self._call(DURABLE if durable else WRITE, off, data)

    async def flush(self) -> None:
        await self._call(FLUSH, 0, b"")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.reader_task is not None:
            self.reader_task.cancel()
