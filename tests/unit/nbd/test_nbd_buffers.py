"""Payload buffer reuse: large buffers are recycled, never while an export still holds one."""

from __future__ import annotations

import os

from pxcluster.nbd import ExportRegistry, MemoryExport, NbdServer
from pxcluster.nbd import protocol as p
from pxcluster.nbd.buffers import POOL_MIN_LENGTH, BufferPool
from tests.harness.nbd_tools import RawNbdClient

MIB = 1 << 20


def test_pool_reuses_large_buffers_within_budget() -> None:
    pool = BufferPool(max_bytes=2 * MIB)
    a = pool.take(MIB)
    pool.give(a)
    assert pool.take(MIB) is a
    small = pool.take(POOL_MIN_LENGTH - 1)
    pool.give(small)
    assert pool.pooled_bytes == 0
    for buf in [bytearray(MIB) for _ in range(3)]:
        pool.give(buf)
    assert pool.pooled_bytes == 2 * MIB


class KeepingExport(MemoryExport):
    """Breaks the contract by keeping a slice of what it was given."""

    def __init__(self) -> None:
        super().__init__("keeping", 8 * MIB)
        self.kept: list[memoryview] = []

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.kept.append(data[:16])
        await super().write(offset, data, fua)


async def _write_mib_chunks(port: int, name: str, count: int) -> list[bytes]:
    c = await RawNbdClient.connect_tcp(port)
    await c.go(name)
    sent = []
    for i in range(count):
        data = os.urandom(MIB)
        sent.append(data)
        c.request(p.CMD_WRITE, i, i * MIB, MIB)
        c.send(data)
        assert (await c.simple_reply())[:2] == (0, i)
    await c.close()
    return sent


async def test_buffers_recycled_but_not_while_referenced() -> None:
    registry = ExportRegistry()
    plain = MemoryExport("plain", 8 * MIB)
    keeping = KeepingExport()
    registry.add(plain)
    registry.add(keeping)
    server = NbdServer(registry)
    port = await server.start_tcp("127.0.0.1", 0)
    try:
        sent = await _write_mib_chunks(port, "plain", 4)
        assert server.buffers.pooled_bytes == MIB  # one buffer, reused by each write
        assert plain.contents(0, 4 * MIB) == b"".join(sent)
        sent = await _write_mib_chunks(port, "keeping", 4)
        # Each kept slice pins its buffer: none went back to the pool to be overwritten.
        assert server.buffers.pooled_bytes == 0
        assert [bytes(k) for k in keeping.kept] == [d[:16] for d in sent]
    finally:
        await server.close()
