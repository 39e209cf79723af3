"""pxcluster.nbd.client against our own NBD server with in-memory exports."""

from __future__ import annotations

import asyncio
import errno

import pytest

from pxcluster.nbd import ExportRegistry, MemoryExport, NbdServer
from pxcluster.nbd.client import NbdClient, NbdCommandError, NbdError, parse_uri
from pxcluster.tools import stamp

SIZE = 1 << 20


class ReadFails(MemoryExport):
    async def read(self, offset: int, length: int) -> bytes:
        raise OSError(errno.ENOSPC, "full")


async def _serve() -> tuple[NbdServer, MemoryExport, int]:
    registry = ExportRegistry()
    export = MemoryExport("vol", SIZE, delay=0.001)
    registry.add(export)
    registry.add(ReadFails("bad", SIZE))
    server = NbdServer(registry, max_inflight=8, max_request=1 << 20, handshake_timeout=1.0)
    return server, export, await server.start_tcp("127.0.0.1", 0)


def test_parse_uri() -> None:
    assert parse_uri("nbd://10.0.0.1:10900/db") == ("10.0.0.1", 10900, "db")
    assert parse_uri("nbd://h/x") == ("h", 10809, "x")
    assert parse_uri("nbd+unix:///db?socket=/run/pxc/nbd.sock") == ("/run/pxc/nbd.sock", 0, "db")
    with pytest.raises(ValueError):
        parse_uri("http://h/x")


async def test_pipelined_writes_reads_flush_and_disc() -> None:
    server, export, port = await _serve()
    try:
        c = await NbdClient.connect(f"nbd://127.0.0.1:{port}/vol")
        assert c.size == SIZE
        blocks = [stamp.make(b, b + 1, 1000 + b) for b in range(64)]  # more than max_inflight
        await asyncio.gather(*(c.write(b * stamp.BLOCK, d) for b, d in enumerate(blocks)))
        await c.write(64 * stamp.BLOCK, blocks[0], fua=True)
        await c.flush()
        got = await asyncio.gather(*(c.read(b * stamp.BLOCK, stamp.BLOCK) for b in range(64)))
        assert got == blocks
        assert export.contents(0, 64 * stamp.BLOCK) == b"".join(blocks)
        assert export.flushes >= 1 and export.fua_writes == 1
        await c.close()
        with pytest.raises(NbdError):
            await c.read(0, 4096)
    finally:
        await server.close()


async def test_unknown_export_and_command_errors() -> None:
    server, _export, port = await _serve()
    try:
        with pytest.raises(NbdError, match="'nosuch' refused"):
            await NbdClient.connect(f"nbd://127.0.0.1:{port}/nosuch")
        c = await NbdClient.connect(f"nbd://127.0.0.1:{port}/bad")
        with pytest.raises(NbdCommandError) as e:
            await c.read(0, 4096)
        assert e.value.errno == errno.ENOSPC
        await c.write(0, bytes(4096))  # the connection survives a failed command
        await c.close()
    finally:
        await server.close()
