"""The NBD server against a raw client: handshake edge cases, transmission errors, flow control."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from pxcluster.nbd import ExportRegistry, MemoryExport, NbdServer, nbd_error
from pxcluster.nbd import protocol as p
from tests.harness.nbd_tools import RawNbdClient, error_chunk

SIZE = 1 << 20


class Served:
    def __init__(self, server: NbdServer, registry: ExportRegistry, port: int, sock: str) -> None:
        self.server = server
        self.registry = registry
        self.port = port
        self.sock = sock

    async def client(self) -> RawNbdClient:
        return await RawNbdClient.connect_tcp(self.port)

    async def transmit(self, name: str = "vol", *, structured: bool = False) -> RawNbdClient:
        c = await self.client()
        await c.go(name, structured=structured)
        return c


async def _start(tmp_path: Path) -> Served:
    registry = ExportRegistry()
    registry.add(MemoryExport("vol", SIZE))
    registry.add(MemoryExport("other", 4096))
    server = NbdServer(registry, max_inflight=8, max_request=1 << 20, handshake_timeout=1.0)
    port = await server.start_tcp("127.0.0.1", 0)
    sock = str(tmp_path / "nbd.sock")
    await server.start_unix(sock)
    return Served(server, registry, port, sock)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll `predicate` (the state the server must reach) until true; AssertionError after
    `timeout` seconds. What a test asserts next is then about that state, not a guess at how
    long the server takes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"not after {timeout} s: {what}")
        await asyncio.sleep(0.002)


def stopped_reading(server: NbdServer) -> bool:
    """The server's only connection has paused reading its socket because the client does
    not read replies (the transport paused writing): nothing more can reach the export."""
    conns = list(server._connections)
    return len(conns) == 1 and conns[0]._write_paused and conns[0]._reading_paused


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    s = await _start(tmp_path)
    yield s
    await s.server.close()


# --- handshake -----------------------------------------------------------------------------


async def test_greeting_advertises_fixed_newstyle_and_no_zeroes(served: Served) -> None:
    c = await served.client()
    flags = await c.greeting()
    assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    await c.close()


async def test_unknown_client_flags_close(served: Served) -> None:
    c = await served.client()
    await c.greeting(client_flags=1 << 7)
    assert await c.closed()


async def test_bad_option_magic_closes(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    c.send(p.OPTION_HEADER.pack(0x1234, p.OPT_LIST, 0))
    assert await c.closed()


async def test_huge_option_length_closes(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, 1 << 30))
    assert await c.closed()


async def test_unknown_option_is_unsupported_and_haggling_continues(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    for option in (999, p.OPT_STARTTLS, p.OPT_LIST_META_CONTEXT, p.OPT_EXTENDED_HEADERS):
        c.option(option, b"xyz")
        reply_option, reply_type, _ = await c.option_reply()
        assert (reply_option, reply_type) == (option, p.REP_ERR_UNSUP)
    size, _ = await c.go("vol", greet=False)
    assert size == SIZE
    await c.close()


async def test_list(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    c.option(p.OPT_LIST)
    names = []
    while True:
        _, reply_type, data = await c.option_reply()
        if reply_type == p.REP_ACK:
            break
        assert reply_type == p.REP_SERVER
        (n,) = p.U32.unpack_from(data)
        names.append(data[4 : 4 + n].decode())
    assert sorted(names) == ["other", "vol"]
    c.option(p.OPT_LIST, b"junk")
    assert (await c.option_reply())[1] == p.REP_ERR_INVALID
    await c.close()


async def test_info_then_go(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    c.option(p.OPT_INFO, c.info_data("other", (p.INFO_BLOCK_SIZE, p.INFO_NAME)))
    infos: dict[int, bytes] = {}
    while True:
        option, reply_type, data = await c.option_reply()
        assert option == p.OPT_INFO
        if reply_type == p.REP_ACK:
            break
        assert reply_type == p.REP_INFO
        infos[p.U16.unpack_from(data)[0]] = data
    _, size, flags = p.INFO_EXPORT_REPLY.unpack(infos[p.INFO_EXPORT])
    assert size == 4096
    for bit in (
        p.FLAG_HAS_FLAGS,
        p.FLAG_SEND_FLUSH,
        p.FLAG_SEND_FUA,
        p.FLAG_SEND_TRIM,
        p.FLAG_SEND_WRITE_ZEROES,
        p.FLAG_CAN_MULTI_CONN,
    ):
        assert flags & bit
    assert not flags & p.FLAG_READ_ONLY
    _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE_REPLY.unpack(infos[p.INFO_BLOCK_SIZE])
    assert (minimum, preferred, maximum) == (1, 4096, 1 << 20)
    # INFO leaves the client in haggling; GO then works.
    assert (await c.go("vol", greet=False))[0] == SIZE
    await c.close()


async def test_go_unknown_export_and_malformed(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    c.option(p.OPT_GO, c.info_data("nope"))
    assert (await c.option_reply())[1] == p.REP_ERR_UNKNOWN
    c.option(p.OPT_GO, b"\x00\x00\x00\x09vo")  # name length past the end
    assert (await c.option_reply())[1] == p.REP_ERR_INVALID
    c.option(p.OPT_INFO, c.info_data("vol") + b"\x00")  # trailing garbage
    assert (await c.option_reply())[1] == p.REP_ERR_INVALID
    c.option(p.OPT_GO, b"\x00")
    assert (await c.option_reply())[1] == p.REP_ERR_INVALID
    c.option(p.OPT_STRUCTURED_REPLY, b"x")
    assert (await c.option_reply())[1] == p.REP_ERR_INVALID
    await c.close()


async def test_export_name_known_with_and_without_zeroes(served: Served) -> None:
    for client_flags, pad in ((p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES, 0), (1, 124)):
        c = await served.client()
        await c.greeting(client_flags)
        c.option(p.OPT_EXPORT_NAME, b"vol")
        size, flags = p.EXPORT_NAME_REPLY.unpack(await c.read(p.EXPORT_NAME_REPLY.size))
        assert size == SIZE and flags & p.FLAG_HAS_FLAGS
        assert await c.read(pad) == bytes(pad)
        c.request(p.CMD_READ, 1, 0, 512)
        assert (await c.simple_reply(512))[:2] == (0, 1)
        await c.close()


async def test_export_name_unknown_closes(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    c.option(p.OPT_EXPORT_NAME, b"nope")
    assert await c.closed()


async def test_abort_acks_and_closes(served: Served) -> None:
    c = await served.client()
    await c.greeting()
    c.option(p.OPT_ABORT)
    assert (await c.option_reply())[1] == p.REP_ACK
    assert await c.closed()


async def test_handshake_timeout_closes_idle_client(served: Served) -> None:
    c = await served.client()
    await c.read(p.GREETING.size)
    assert await c.closed(timeout=3.0)


async def test_unix_socket(served: Served) -> None:
    c = await RawNbdClient.connect_unix(served.sock)
    assert (await c.go("vol"))[0] == SIZE
    await c.close()


# --- transmission: simple replies ------------------------------------------------------------


async def test_write_read_flush_trim_zero(served: Served) -> None:
    c = await served.transmit()
    data = os.urandom(8192)
    c.request(p.CMD_WRITE, 1, 4096, len(data), flags=p.CMD_FLAG_FUA)
    c.send(data)
    c.request(p.CMD_FLUSH, 2)
    assert sorted([(await c.simple_reply())[:2] for _ in range(2)]) == [(0, 1), (0, 2)]
    c.request(p.CMD_READ, 3, 4096, 8192)
    assert await c.simple_reply(8192) == (0, 3, data)
    c.request(p.CMD_TRIM, 4, 4096, 4096)
    assert (await c.simple_reply())[:2] == (0, 4)
    c.request(p.CMD_WRITE_ZEROES, 5, 8192, 4096, flags=p.CMD_FLAG_NO_HOLE)
    assert (await c.simple_reply())[:2] == (0, 5)
    c.request(p.CMD_READ, 6, 4096, 8192)
    assert await c.simple_reply(8192) == (0, 6, bytes(8192))
    export = served.registry.get("vol")
    assert isinstance(export, MemoryExport)
    assert (export.fua_writes, export.flushes, export.trims, export.no_hole_zeroes) == (1, 1, 1, 1)
    await c.close()


async def test_read_past_end_einval_and_connection_survives(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_READ, 7, SIZE - 512, 1024)
    assert (await c.simple_reply())[:2] == (p.NBD_EINVAL, 7)
    c.request(p.CMD_READ, 8, SIZE - 512, 512)
    assert (await c.simple_reply(512))[:2] == (0, 8)
    await c.close()


async def test_oversized_read_eoverflow(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_READ, 9, 0, (1 << 20) + 1)
    assert (await c.simple_reply())[:2] == (p.NBD_EOVERFLOW, 9)
    c.request(p.CMD_READ, 10, 0, 16)
    assert (await c.simple_reply(16))[:2] == (0, 10)
    await c.close()


async def test_write_past_end_consumes_payload(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_WRITE, 11, SIZE - 100, 200)
    c.send(bytes(range(200)))
    assert (await c.simple_reply())[:2] == (p.NBD_EINVAL, 11)
    c.request(p.CMD_WRITE, 12, 0, 4)
    c.send(b"abcd")
    c.request(p.CMD_READ, 13, 0, 4)
    assert (await c.simple_reply())[:2] == (0, 12)
    assert await c.simple_reply(4) == (0, 13, b"abcd")
    await c.close()


async def test_oversized_write_einval_then_close(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_WRITE, 14, 0, 64 << 20)
    assert (await c.simple_reply())[:2] == (p.NBD_EINVAL, 14)
    assert await c.closed()


async def test_bad_request_magic_closes(served: Served) -> None:
    c = await served.transmit()
    c.send(b"\xde\xad\xbe\xef" + bytes(24))
    assert await c.closed()


async def test_unknown_command_einval(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_BLOCK_STATUS, 15, 0, 4096)
    assert (await c.simple_reply())[:2] == (p.NBD_EINVAL, 15)
    await c.close()


async def test_disc_answers_inflight_then_closes(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_READ, 16, 0, 4096)
    c.request(p.CMD_DISC, 17)
    c.request(p.CMD_READ, 18, 0, 4096)  # after DISC: ignored
    assert (await c.simple_reply(4096))[:2] == (0, 16)
    assert await c.closed()


# --- transmission: structured replies ---------------------------------------------------------


async def test_structured_read_and_errors(served: Served) -> None:
    c = await served.transmit(structured=True)
    c.request(p.CMD_WRITE, 1, 100, 3)
    c.send(b"xyz")
    flags, rtype, cookie, payload = await c.structured_chunk()
    assert (flags, rtype, cookie, payload) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, 1, b"")
    c.request(p.CMD_READ, 2, 100, 3)
    flags, rtype, cookie, payload = await c.structured_chunk()
    assert (flags, rtype, cookie) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 2)
    assert payload == (100).to_bytes(8, "big") + b"xyz"
    c.request(p.CMD_READ, 3, SIZE, 1)
    flags, rtype, cookie, payload = await c.structured_chunk()
    assert (flags, rtype, cookie) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, 3)
    assert error_chunk(payload)[0] == p.NBD_EINVAL
    await c.close()


# --- export errors ----------------------------------------------------------------------------


class _Errno(Exception):
    errno = errno.EPERM


class _Coded(Exception):
    code = "ENOSPC"


class FailingExport(MemoryExport):
    def __init__(self) -> None:
        super().__init__("failing", SIZE)
        self.errors: list[BaseException] = []

    async def read(self, offset: int, length: int) -> bytes:
        raise self.errors[offset // 4096]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "full"), p.NBD_ENOSPC),
        (OSError(errno.ESHUTDOWN, "down"), p.NBD_ESHUTDOWN),
        (OSError(errno.ENOENT, "odd"), p.NBD_EIO),
        (OSError("no errno"), p.NBD_EIO),
        (_Errno(), p.NBD_EPERM),
        (_Coded(), p.NBD_ENOSPC),
        (RuntimeError("bug"), p.NBD_EIO),
    ],
)
def test_nbd_error_mapping(exc: BaseException, expected: int) -> None:
    assert nbd_error(exc) == expected


async def test_export_exceptions_become_errors_and_server_keeps_running(served: Served) -> None:
    export = FailingExport()
    export.errors = [OSError(errno.ENOSPC, "full"), RuntimeError("bug"), _Errno()]
    served.registry.add(export)
    c = await served.transmit("failing")
    for i in range(3):
        c.request(p.CMD_READ, i, i * 4096, 16)
    replies = {(await c.simple_reply())[1:2][0]: None for _ in range(3)}
    assert sorted(replies) == [0, 1, 2]
    c.request(p.CMD_READ, 0, 0, 16)
    assert (await c.simple_reply())[:2] == (p.NBD_ENOSPC, 0)
    c.request(p.CMD_READ, 1, 4096, 16)
    assert (await c.simple_reply())[:2] == (p.NBD_EIO, 1)
    c.request(p.CMD_READ, 2, 8192, 16)
    assert (await c.simple_reply())[:2] == (p.NBD_EPERM, 2)
    await c.close()


# --- concurrency, flow control, lifecycle ------------------------------------------------------


class GatedExport(MemoryExport):
    """Reads at offset 0 wait for the gate; others answer at once."""

    def __init__(self) -> None:
        super().__init__("gated", SIZE)
        self.gate = asyncio.Event()

    async def read(self, offset: int, length: int) -> bytes:
        if offset == 0:
            await self.gate.wait()
        return await super().read(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._enter()
        try:
            await self.gate.wait()
            self._view[offset : offset + data.nbytes] = data
        finally:
            self.inflight -= 1


async def test_replies_out_of_order(served: Served) -> None:
    export = GatedExport()
    served.registry.add(export)
    c = await served.transmit("gated")
    c.request(p.CMD_READ, 1, 0, 16)
    c.request(p.CMD_READ, 2, 4096, 16)
    assert (await c.simple_reply(16))[1] == 2
    export.gate.set()
    assert (await c.simple_reply(16))[1] == 1
    await c.close()


async def test_inflight_bounded_then_all_answered(served: Served) -> None:
    export = GatedExport()
    served.registry.add(export)
    c = await served.transmit("gated")
    n = 100
    for i in range(n):
        c.request(p.CMD_WRITE, i, i * 512, 512)
        c.send(bytes([i]) * 512)
    await c.writer.drain()
    limit = served.server.max_inflight  # 8: the rest wait unread
    await until(lambda: export.inflight == limit, f"{limit} writes in flight")
    export.gate.set()
    cookies = sorted([(await c.simple_reply())[1] for _ in range(n)])
    assert cookies == list(range(n))
    assert export.max_inflight_seen == served.server.max_inflight
    assert export.contents(99 * 512, 512) == bytes([99]) * 512
    await c.close()


async def test_client_disconnect_mid_request_does_not_hurt_others(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_WRITE, 1, 0, 65536)
    c.send(bytes(1000))  # then vanish halfway through the payload
    c.writer.transport.abort()
    await asyncio.sleep(0.05)
    d = await served.transmit()
    d.request(p.CMD_READ, 2, 0, 16)
    assert (await d.simple_reply(16))[:2] == (0, 2)
    await d.close()


async def test_remove_export_closes_its_connections_only(served: Served) -> None:
    export = GatedExport()
    served.registry.add(export)
    c = await served.transmit("gated")
    other = await served.transmit("vol")
    c.request(p.CMD_READ, 1, 0, 16)  # in flight while the export is removed
    await asyncio.sleep(0.05)
    removal = asyncio.create_task(served.registry.remove("gated"))
    await asyncio.sleep(0.05)
    assert not removal.done()
    export.gate.set()
    assert (await c.simple_reply(16))[:2] == (0, 1)
    assert await c.closed()
    await asyncio.wait_for(removal, 5)
    assert served.registry.get("gated") is None
    other.request(p.CMD_READ, 2, 0, 16)
    assert (await other.simple_reply(16))[:2] == (0, 2)
    d = await served.client()
    await d.greeting()
    d.option(p.OPT_GO, d.info_data("gated"))
    assert (await d.option_reply())[1] == p.REP_ERR_UNKNOWN
    await other.close()
    await d.close()


async def test_server_close_closes_clients(tmp_path: Path) -> None:
    registry = ExportRegistry()
    registry.add(MemoryExport("vol", SIZE))
    server = NbdServer(registry)
    port = await server.start_tcp("127.0.0.1", 0)
    sock = str(tmp_path / "s.sock")
    await server.start_unix(sock)
    c = await RawNbdClient.connect_tcp(port)
    await c.go("vol")
    await server.close()
    assert await c.closed()
    assert server.connection_count == 0
    assert not Path(sock).exists()  # noqa: ASYNC240


class CountingExport(MemoryExport):
    def __init__(self) -> None:
        super().__init__("counting", SIZE)
        self.reads = 0

    async def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return await super().read(offset, length)


async def test_client_not_reading_replies_stops_the_server_reading(served: Served) -> None:
    export = CountingExport()
    served.registry.add(export)
    c = await served.transmit("counting")
    n = 200
    for i in range(n):
        c.request(p.CMD_READ, i, 0, SIZE)  # 200 MiB of replies if nothing held back
    await c.writer.drain()
    await until(lambda: stopped_reading(served.server), "the server stopped reading")
    # Socket buffers absorb a few replies; after that the server must stop serving.
    stalled_at = export.reads
    assert stalled_at < 40
    for _ in range(n):
        error, _, data = await c.simple_reply(SIZE)
        assert error == 0 and len(data) == SIZE
    assert export.reads == n
    await c.close()


async def test_a_burst_answered_inline_queues_no_more_than_max_inflight(served: Served) -> None:
    # All requests in one segment: the server parses them in one pass, and each read completes
    # inline (a memory export never waits). Replies not yet handed to the transport count as
    # in flight, so the pass stops at max_inflight (8 here) however many requests are buffered.
    export = CountingExport()
    served.registry.add(export)
    c = await served.transmit("counting")
    n = 200
    c.send(b"".join(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, i, 0, SIZE) for i in range(n)))
    await c.writer.drain()
    await until(lambda: stopped_reading(served.server), "the server stopped reading")
    assert export.reads < 40  # a few replies' worth fit the socket buffers; never all 200
    for _ in range(n):
        error, _, data = await c.simple_reply(SIZE)
        assert error == 0 and len(data) == SIZE
    assert export.reads == n
    await c.close()


class FastExport(MemoryExport):
    """Offers the synchronous fast paths (as the volume engine does); declines requests that
    reach into its upper half, and FUA writes, which then take the coroutine path, held by
    `gate` in the upper half."""

    def __init__(self) -> None:
        super().__init__("fast", SIZE)
        self.slow_from = SIZE // 2
        self.gate = asyncio.Event()
        self.gate.set()
        self.now_reads = 0
        self.now_writes = 0

    def read_now(self, offset: int, length: int) -> bytes | None:
        if offset + length > self.slow_from:
            return None
        self.now_reads += 1
        return self.contents(offset, length)

    def write_now(self, offset: int, data: memoryview, fua: bool) -> bool:
        if offset + data.nbytes > self.slow_from or fua:
            return False
        self._view[offset : offset + data.nbytes] = data
        self.now_writes += 1
        return True

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        if offset + data.nbytes > self.slow_from:
            await self.gate.wait()
        await super().write(offset, data, fua)


@pytest.mark.parametrize("structured", [False, True])
async def test_fast_paths_answer_at_once_and_what_they_decline_goes_async(
    served: Served, structured: bool
) -> None:
    export = FastExport()
    served.registry.add(export)
    c = await served.transmit("fast", structured=structured)
    fast, slow = b"\x11" * 4096, b"\x22" * 4096
    for cookie, offset, data, flags in [
        (1, 0, fast, 0),
        (2, SIZE - 4096, slow, 0),
        (3, 8192, fast, p.CMD_FLAG_FUA),
    ]:
        c.request(p.CMD_WRITE, cookie, offset, len(data), flags)
        c.send(data)
        if structured:
            done = (p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie, b"")
            assert await c.structured_chunk() == done
        else:
            assert await c.simple_reply() == (0, cookie, b"")
    for cookie, offset, data in [(4, 0, fast), (5, SIZE - 4096, slow), (6, 8192, fast)]:
        c.request(p.CMD_READ, cookie, offset, 4096)
        if structured:
            read = (p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, cookie)
            flags, rtype, got, payload = await c.structured_chunk()
            assert (flags, rtype, got) == read
            assert payload == offset.to_bytes(8, "big") + data
        else:
            assert await c.simple_reply(4096) == (0, cookie, data)
    assert (export.now_writes, export.now_reads) == (1, 2)
    assert export.contents(SIZE - 4096, 4096) == slow and export.fua_writes == 1
    await c.close()


async def test_no_fast_path_ahead_of_a_request_still_waiting(served: Served) -> None:
    export = FastExport()
    served.registry.add(export)
    c = await served.transmit("fast")
    export.gate.clear()
    c.request(p.CMD_WRITE, 1, SIZE - 4096, 4096)  # declined: a task, waiting on the gate
    c.send(b"w" * 4096)
    c.request(p.CMD_READ, 2, 0, 4096)
    c.request(p.CMD_WRITE, 3, 0, 4096)
    c.send(b"x" * 4096)
    # Both later requests are answered (out of order is allowed), but not by a fast path,
    # which would start them ahead of the waiting write.
    error, cookie, data = await c.simple_reply(4096)
    assert (error, cookie, data) == (0, 2, bytes(4096))
    assert (await c.simple_reply())[:2] == (0, 3)
    assert (export.now_reads, export.now_writes) == (0, 0)
    export.gate.set()
    assert (await c.simple_reply())[:2] == (0, 1)
    # A write over 64 KiB is never offered to write_now: it is a task at once.
    big = b"b" * (128 << 10)
    c.request(p.CMD_WRITE, 4, 0, len(big))
    c.send(big)
    assert (await c.simple_reply())[:2] == (0, 4)
    assert export.now_writes == 0 and export.contents(0, len(big)) == big
    await c.close()


async def test_a_waiting_flush_does_not_hold_back_the_fast_paths(served: Served) -> None:
    # A flush promises only the writes answered before it arrived: what comes after it may be
    # served first (as nbdkit's threads do), at fast-path cost.
    export = FastExport()
    flushed = asyncio.Event()

    async def flush() -> None:
        await flushed.wait()

    export.flush = flush  # type: ignore[method-assign]
    served.registry.add(export)
    c = await served.transmit("fast")
    c.request(p.CMD_FLUSH, 1, 0, 0)
    c.request(p.CMD_WRITE, 2, 0, 4096)
    c.send(b"x" * 4096)
    c.request(p.CMD_READ, 3, 0, 4096)
    assert (await c.simple_reply())[:2] == (0, 2)
    assert await c.simple_reply(4096) == (0, 3, b"x" * 4096)
    assert (export.now_writes, export.now_reads) == (1, 1)
    flushed.set()
    assert (await c.simple_reply())[:2] == (0, 1)
    await c.close()


async def test_a_burst_of_fast_reads_queues_no_more_than_max_inflight(served: Served) -> None:
    export = FastExport()
    export.slow_from = SIZE
    served.registry.add(export)
    c = await served.transmit("fast")
    n = 200
    c.send(b"".join(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, i, 0, SIZE) for i in range(n)))
    await c.writer.drain()
    await until(lambda: stopped_reading(served.server), "the server stopped reading")
    assert export.now_reads < 40
    for _ in range(n):
        error, _, data = await c.simple_reply(SIZE)
        assert error == 0 and len(data) == SIZE
    assert export.now_reads == n
    await c.close()


class BeginExport(MemoryExport):
    """Starts every non-FUA write with write_begin (as the volume engine starts a replicated
    one) and leaves its acknowledgement to the test."""

    def __init__(self) -> None:
        super().__init__("begin", SIZE)
        self.acks: list[asyncio.Future[None]] = []
        self.begun = asyncio.Event()

    def write_begin(self, offset: int, data: memoryview, fua: bool) -> asyncio.Future[None] | None:
        if fua:
            return None
        self._view[offset : offset + data.nbytes] = data
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        self.begun.set()
        return ack


async def _begun(export: BeginExport, n: int) -> None:
    async with asyncio.timeout(5):
        while len(export.acks) < n:
            export.begun.clear()
            await export.begun.wait()


async def test_a_begun_write_is_answered_when_its_acknowledgement_is_done(served: Served) -> None:
    export = BeginExport()
    served.registry.add(export)
    c = await served.transmit("begin")
    for cookie in (1, 2):
        c.request(p.CMD_WRITE, cookie, cookie * 4096, 4096)
        c.send(bytes([cookie]) * 4096)
    await _begun(export, 2)
    export.acks[1].set_result(None)
    assert await c.simple_reply() == (0, 2, b"")  # out of order: as each is acknowledged
    export.acks[0].set_exception(OSError(errno.ENOSPC, "full"))
    assert await c.simple_reply() == (p.NBD_ENOSPC, 1, b"")
    assert export.contents(8192, 4096) == b"\x02" * 4096
    # A begun write is in flight: DISC waits for its answer before closing (closed at DISC,
    # the reply below would never come).
    c.request(p.CMD_WRITE, 3, 0, 4096)
    c.send(b"\x03" * 4096)
    c.request(p.CMD_DISC, 4)
    await _begun(export, 3)
    await asyncio.sleep(0.05)
    export.acks[2].set_result(None)
    assert await c.simple_reply() == (0, 3, b"")
    assert await c.closed()


# The node runs on uvloop; its transports differ from asyncio's (buffer handling, flow
# control callbacks), so the scenarios most sensitive to that run on it as well.
UVLOOP_SCENARIOS = [
    test_info_then_go,
    test_write_read_flush_trim_zero,
    test_write_past_end_consumes_payload,
    test_oversized_write_einval_then_close,
    test_bad_request_magic_closes,
    test_disc_answers_inflight_then_closes,
    test_structured_read_and_errors,
    test_replies_out_of_order,
    test_inflight_bounded_then_all_answered,
    test_client_disconnect_mid_request_does_not_hurt_others,
    test_remove_export_closes_its_connections_only,
    test_client_not_reading_replies_stops_the_server_reading,
    test_unix_socket,
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS, ids=lambda f: f.__name__[5:])
def test_under_uvloop(
    scenario: Callable[[Served], Coroutine[Any, Any, None]], tmp_path: Path
) -> None:
    async def main() -> None:
        s = await _start(tmp_path)
        try:
            await asyncio.wait_for(scenario(s), 30)
        finally:
            await s.server.close()

    uvloop.run(main())


async def test_registry_add_duplicate_and_remove_unknown() -> None:
    registry = ExportRegistry()
    registry.add(MemoryExport("a", 4096))
    with pytest.raises(ValueError):
        registry.add(MemoryExport("a", 4096))
    await registry.remove("nope")  # idempotent, for retried detaches
    assert registry.names() == ["a"]


async def test_grown_export_serves_new_range(served: Served) -> None:
    c = await served.transmit()
    c.request(p.CMD_READ, 1, SIZE, 4096)
    assert (await c.simple_reply())[:2] == (p.NBD_EINVAL, 1)
    export = served.registry.get("vol")
    assert isinstance(export, MemoryExport)
    export.resize(2 * SIZE)
    c.request(p.CMD_WRITE, 2, SIZE, 4)
    c.send(b"grow")
    c.request(p.CMD_READ, 3, SIZE, 4)
    assert (await c.simple_reply())[:2] == (0, 2)
    assert await c.simple_reply(4) == (0, 3, b"grow")
    e = await served.client()
    assert (await e.go("vol"))[0] == 2 * SIZE
    await c.close()
    await e.close()
