"""Framing, request validation, and server+client in process over an in-memory replica."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import msgpack
import pytest

from replica import auth
from replica import server as server_module
from replica.api import ChunkCopy, Generation, ReplicaStats, VolumeInfo
from replica.client import ReplicaClient
from replica.errors import OutOfRange, ProtocolError, StaleEpoch, UnknownVolume
from replica.protocol import (
    MAX_FRAME,
    FramedProtocol,
    Header,
    RxBuffer,
    check_request,
    encode_frame,
)
from replica.server import ReplicaServer
from tests.harness.replica_proc import TEST_KEY, raw_connect


class Collector(FramedProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[Header, bytes]] = []
        self.bad: list[str] = []
        self.broken: list[str] = []

    def frame_received(self, header: Header, payload: memoryview, rx: RxBuffer) -> None:
        self.frames.append((header, bytes(payload)))

    def bad_frame(self, reason: str) -> None:
        self.bad.append(reason)

    def framing_error(self, reason: str) -> None:
        self.broken.append(reason)
        self.closed = True


def wire(header: Header, payload: bytes | None = None) -> bytes:
    return b"".join(encode_frame(header, payload))


def feed(p: FramedProtocol, data: bytes, step: int) -> None:
    i = 0
    while i < len(data) and not p.closed:
        buf = p.get_buffer(-1)
        n = min(len(buf), step, len(data) - i)
        assert n > 0
        buf[:n] = data[i : i + n]
        p.buffer_updated(n)
        i += n


async def test_round_trip_header_and_payload() -> None:
    p = Collector()
    feed(p, wire({"id": 7, "op": "write", "x": [1, 2]}, b"abc" * 1000), 1 << 20)
    assert p.frames == [({"id": 7, "op": "write", "x": [1, 2]}, b"abc" * 1000)]


@pytest.mark.parametrize("step", [1, 3, 7, 4096, 65536, 1 << 20])
async def test_partial_frames_and_many_per_buffer(step: int) -> None:
    frames = [({"id": i, "op": "write"}, os.urandom(i * 37 % 5000)) for i in range(200)]
    big = (3 << 20) if step > 100 else (300 << 10)
    frames.append(({"id": 999, "op": "big"}, os.urandom(big)))  # larger than a rx buffer
    frames += [({"id": 1000 + i, "op": "read"}, b"") for i in range(50)]
    p = Collector()
    feed(p, b"".join(wire(h, d) for h, d in frames), step)
    assert p.frames == frames
    assert not p.bad and not p.broken


@pytest.mark.parametrize("step", [1001, 65536, 1 << 20])
async def test_a_large_payload_lands_page_aligned(step: int) -> None:
    """A chunk-sized payload starts on a PAYLOAD_ALIGN boundary of its receive buffer (so
    O_DIRECT writes it from there), whatever its header's length and the receive sizes."""
    import ctypes

    from replica.protocol import PAYLOAD_ALIGN

    class Addresses(Collector):
        addresses: list[int] = []

        def frame_received(self, header: Header, payload: memoryview, rx: RxBuffer) -> None:
            if len(payload) >= 1 << 20:
                c = (ctypes.c_char * len(payload)).from_buffer(payload)
                self.addresses.append(ctypes.addressof(c))
                del c
            super().frame_received(header, payload, rx)

    frames = [
        ({"id": i, "op": "write_chunk", "pad": "x" * (i * 131)}, os.urandom(4 << 20))
        for i in range(4)
    ]
    frames.insert(2, ({"id": 99, "op": "write"}, os.urandom(3000)))
    p = Addresses()
    feed(p, b"".join(wire(h, d) for h, d in frames), step)
    assert p.frames == frames
    assert len(p.addresses) == 4
    assert all(a % PAYLOAD_ALIGN == 0 for a in p.addresses)


async def test_buffers_are_reused_when_released() -> None:
    class Holder(Collector):
        held: list[tuple[memoryview, RxBuffer]] = []

        def frame_received(self, header: Header, payload: memoryview, rx: RxBuffer) -> None:
            rx.refs += 1
            self.held.append((payload, rx))
            super().frame_received(header, payload, rx)

    p = Holder()
    payloads = [os.urandom(4096) for _ in range(300)]
    data = b"".join(wire({"id": i}, d) for i, d in enumerate(payloads))
    feed(p, data, 50_000)
    # Every held view still shows its own bytes: no buffer was overwritten under a holder.
    assert [bytes(v) for v, _ in p.held] == payloads
    for _, rx in p.held:
        rx.release()
    feed(p, data, 50_000)
    assert len(p.frames) == 600


async def test_bad_header_keeps_stream_and_bad_length_breaks_it() -> None:
    p = Collector()
    garbage = b"\xc1\xc1\xc1"  # never valid msgpack
    bad = struct.pack("!II", 4 + len(garbage), len(garbage)) + garbage
    too_long_header = struct.pack("!II", 4 + 2, 50) + b"xx"
    feed(p, bad + too_long_header + wire({"id": 1}), 5)
    assert len(p.bad) == 2 and p.frames == [({"id": 1}, b"")]
    # Half a prefix with an impossible length must not make it reserve room for that length.
    feed(p, struct.pack("!I", MAX_FRAME + 1), 100)
    assert len(p.get_buffer(-1)) < 1 << 20 and not p.broken
    feed(p, struct.pack("!I", 0), 100)
    assert p.broken


def test_check_request() -> None:
    ok = {"id": 3, "op": "read", "volume": "v", "epoch": 1, "chunk": 0, "offset": 0, "length": 4}
    assert check_request(ok) == (3, "read")
    for bad in (
        [1, 2],
        {**ok, "id": "3"},
        {**ok, "op": "nope"},
        {**ok, "epoch": True},
        {**ok, "offset": -1},
        {**ok, "length": 1.5},
        {k: v for k, v in ok.items() if k != "volume"},
        {
            "id": 1,
            "op": "write_chunk",
            "volume": "v",
            "epoch": 1,
            "chunk": 0,
            "present": True,
            "gen": [1],
        },
        {"id": 1, "op": "mark_clean", "volume": "v", "epoch": 1, "chunks": ["a"]},
        {"id": 1, "op": "writes", "volume": "v", "epoch": 1, "items": []},
        {"id": 1, "op": "writes", "volume": "v", "epoch": 1, "items": [[0, 0, 4]]},
        {"id": 1, "op": "writes", "volume": "v", "epoch": 1, "items": [[0, 0, 4, -1]]},
        {"id": 1, "op": "writes", "volume": "v", "epoch": 1, "items": [[0, 0, 4, 1]] * 65},
    ):
        with pytest.raises(ProtocolError):
            check_request(bad)


class MemoryReplica:
    """A minimal in-memory ReplicaAPI: enough to exercise the wire, not the store."""

    def __init__(self, chunk_size: int = 1 << 20) -> None:
        self.chunk_size = chunk_size
        self.vols: dict[str, dict[str, Any]] = {}
        self.gate: asyncio.Event | None = None
        self.log: list[tuple[Any, ...]] = []  # writes and flushes, in the order applied

    def _vol(self, volume: str, epoch: int) -> dict[str, Any]:
        v = self.vols.get(volume)
        if v is None:
            raise UnknownVolume(volume)
        if epoch < v["epoch"]:
            raise StaleEpoch(f"{epoch} < {v['epoch']}")
        return v

    async def open(
        self, volume: str, epoch: int, size: int, chunk_size: int, *, sync_writes: bool = False
    ) -> VolumeInfo:
        v = self.vols.setdefault(volume, {"epoch": 0, "size": size, "chunks": {}, "gens": {}})
        if epoch < v["epoch"]:
            raise StaleEpoch("stale")
        v["epoch"] = epoch
        return VolumeInfo(volume, v["size"], self.chunk_size, epoch, [1, 2], False)

    def _buf(self, v: dict[str, Any], chunk: int) -> bytearray:
        b: bytearray = v["chunks"].setdefault(chunk, bytearray(self.chunk_size))
        return b

    async def write(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: bytes | memoryview,
        *,
        seq: int,
        durable: bool = False,
    ) -> None:
        v = self._vol(volume, epoch)
        if offset + len(data) > self.chunk_size:
            raise OutOfRange("past the chunk")
        if self.gate is not None:
            await self.gate.wait()
        self._buf(v, chunk)[offset : offset + len(data)] = data
        v["gens"][chunk] = (epoch, seq)
        self.log.append(("write", chunk, offset, seq))

    async def read(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, snapshot: str = ""
    ) -> bytes:
        v = self._vol(volume, epoch)
        return bytes(self._buf(v, chunk)[offset : offset + length])

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        v = self._vol(volume, epoch)
        self._buf(v, chunk)[offset : offset + length] = bytes(length)

    async def flush(self, volume: str, epoch: int) -> None:
        self._vol(volume, epoch)
        self.log.append(("flush",))

    async def generations(
        self, volume: str, epoch: int, *, layer: str = ""
    ) -> dict[int, Generation]:
        return dict(self._vol(volume, epoch)["gens"])

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        self._vol(volume, epoch)

    async def read_chunk(
        self, volume: str, epoch: int, chunk: int, *, layer: str = ""
    ) -> ChunkCopy:
        v = self._vol(volume, epoch)
        data = v["chunks"].get(chunk)
        return ChunkCopy(bytes(data) if data is not None else None, v["gens"].get(chunk, (0, 0)))

    async def write_chunk(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | None,
        generation: Generation,
        *,
        present: bytes | None = None,
        layer: str = "",
    ) -> None:
        v = self._vol(volume, epoch)
        if data is None:
            v["chunks"].pop(chunk, None)
        else:
            v["chunks"][chunk] = bytearray(data)
        v["gens"][chunk] = generation

    async def delete(self, volume: str, epoch: int) -> None:
        self.vols.pop(volume, None)

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(100, 10, 90, len(self.vols))

    async def close(self) -> None:
        pass


async def _pair(svc: MemoryReplica, **kw: Any) -> tuple[ReplicaServer, ReplicaClient]:
    server = ReplicaServer(svc, TEST_KEY)
    await server.start("127.0.0.1", 0)
    return server, ReplicaClient("127.0.0.1", server.port, key=TEST_KEY, **kw)


async def test_client_server_every_call() -> None:
    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        info = await c.open("v", 3, 10 << 20, 1 << 20)
        assert info == VolumeInfo("v", 10 << 20, 1 << 20, 3, [1, 2], False)
        await c.write("v", 3, 2, 4096, b"x" * 4096, seq=1)
        await c.write("v", 3, 1, 0, memoryview(b"y" * 100_000), seq=2, durable=True)
        assert await c.read("v", 3, 2, 4096, 4096) == b"x" * 4096
        assert await c.read("v", 3, 1, 0, 100_000) == b"y" * 100_000
        await c.trim("v", 3, 2, 4096, 100, seq=3)
        assert await c.read("v", 3, 2, 4096, 101) == bytes(100) + b"x"
        await c.flush("v", 3)
        assert await c.generations("v", 3) == {2: (3, 1), 1: (3, 2)}
        await c.mark_clean("v", 3, [1, 2])
        data, gen, _ = await c.read_chunk("v", 3, 1)
        assert data is not None and data[:3] == b"yyy" and gen == (3, 2)
        assert await c.read_chunk("v", 3, 9) == (None, (0, 0), None)
        await c.write_chunk("v", 3, 9, b"z" * (1 << 20), (3, 7))
        await c.write_chunk("v", 3, 1, None, (3, 8))
        assert await c.read_chunk("v", 3, 9) == (b"z" * (1 << 20), (3, 7), None)
        assert await c.read_chunk("v", 3, 1) == (None, (3, 8), None)
        assert await c.stats() == ReplicaStats(100, 10, 90, 1)
        with pytest.raises(StaleEpoch):
            await c.write("v", 2, 0, 0, b"a", seq=9)
        with pytest.raises(OutOfRange):
            await c.write("v", 3, 0, (1 << 20) - 1, b"ab", seq=9)
        with pytest.raises(UnknownVolume):
            await c.read("nope", 1, 0, 0, 1)
        await c.delete("v", 3)
        await c.delete("v", 3)
    finally:
        await c.close()
        await server.close()


async def test_write_nowait_sends_at_once_and_reports_as_write_does() -> None:
    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        assert not c.ready_to_send()  # not connected yet: the engine takes the coroutine path
        await c.open("v", 3, 10 << 20, 1 << 20)
        assert c.ready_to_send()
        ok = c.write_nowait("v", 3, 2, 0, memoryview(b"w" * 4096), seq=5)
        stale = c.write_nowait("v", 2, 2, 0, memoryview(b"s"), seq=6)
        out_of_range = c.write_nowait("v", 3, 0, (1 << 20) - 1, memoryview(b"ab"), seq=7)
        await asyncio.wait_for(asyncio.gather(ok, stale, out_of_range), 5)
        assert ReplicaClient.write_outcome(ok) is None
        with pytest.raises(StaleEpoch):
            ReplicaClient.write_outcome(stale)
        with pytest.raises(OutOfRange):
            ReplicaClient.write_outcome(out_of_range)
        assert await c.read("v", 3, 2, 0, 4096) == b"w" * 4096
        assert (await c.generations("v", 3))[2] == (3, 5)
    finally:
        await c.close()
        await server.close()
    assert not c.ready_to_send()


async def test_writes_of_one_iteration_leave_as_one_frame_applied_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames: list[str] = []
    for op in ("write", "writes"):
        handler = server_module.HANDLERS[op]

        async def counted(s: Any, h: Header, p: memoryview, handler: Any = handler) -> Any:
            frames.append(h["op"])
            return await handler(s, h, p)

        monkeypatch.setitem(server_module.HANDLERS, op, counted)
    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        await c.open("v", 3, 10 << 20, 1 << 20)
        futs = [
            c.write_nowait("v", 3, i % 3, 4096 * i, memoryview(bytes([i]) * 4096), seq=10 + i)
            for i in range(70)
        ]
        other_epoch = c.write_nowait("v", 4, 5, 0, memoryview(b"e"), seq=99)
        # The first 64 share a frame (and so a future); the bound starts a second; a write of
        # another epoch, a third. Each reply settles every write of its frame.
        assert len({id(f) for f in futs[:64]}) == 1 and futs[64] is futs[69]
        assert futs[0] is not futs[64] and other_epoch is not futs[64]
        flushed = asyncio.ensure_future(c.flush("v", 3))  # sent after them, so applied after
        await asyncio.wait_for(asyncio.gather(*futs, other_epoch, flushed), 5)
        assert frames == ["writes", "writes", "write"]
        for f in (futs[0], futs[64], other_epoch):
            assert ReplicaClient.write_outcome(f) is None
        writes = [e for e in svc.log if e[0] == "write"]
        assert [e[3] for e in writes[:70]] == [10 + i for i in range(70)]
        assert svc.log[-1] == ("flush",)
        for i in (0, 33, 63, 64, 69):
            assert await c.read("v", 3, i % 3, 4096 * i, 4096) == bytes([i]) * 4096
        assert await c.read("v", 4, 5, 0, 1) == b"e"
    finally:
        await c.close()
        await server.close()


async def test_durable_writes_of_one_iteration_are_answered_after_one_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames: list[tuple[str, bool]] = []
    for op in ("write", "writes"):
        handler = server_module.HANDLERS[op]

        async def counted(s: Any, h: Header, p: memoryview, handler: Any = handler) -> Any:
            frames.append((h["op"], h["durable"]))
            return await handler(s, h, p)

        monkeypatch.setitem(server_module.HANDLERS, op, counted)
    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        await c.open("v", 3, 10 << 20, 1 << 20)
        flushed = asyncio.Event()
        flush = svc.flush

        async def gated_flush(volume: str, epoch: int) -> None:
            await flushed.wait()
            await flush(volume, epoch)

        svc.flush = gated_flush  # type: ignore[method-assign]
        durable = [
            asyncio.ensure_future(c.write("v", 3, 0, 512 * i, b"d" * 512, seq=i, durable=True))
            for i in range(5)
        ]
        plain = [
            asyncio.ensure_future(c.write("v", 3, 1, 512 * i, b"p" * 512, seq=10 + i))
            for i in range(3)
        ]
        await asyncio.wait_for(asyncio.gather(*plain), 5)
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in durable)  # applied, but not answered before the sync
        assert [e[3] for e in svc.log if e[0] == "write"][:5] == list(range(5))
        flushed.set()
        await asyncio.wait_for(asyncio.gather(*durable), 5)
        assert frames == [("writes", True), ("writes", False)]
        assert svc.log[-1] == ("flush",) and len([e for e in svc.log if e[0] == "flush"]) == 1
    finally:
        await c.close()
        await server.close()


async def test_a_server_that_does_not_say_it_takes_batches_gets_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server from before "writes" frames would refuse them, and the engine would degrade
    # the replica for it: only an "open" reply saying "writes" turns them on.
    frames: list[str] = []
    handlers = dict(server_module.HANDLERS)

    async def old_open(s: Any, h: Header, p: memoryview) -> Any:
        result, out = await handlers["open"](s, h, p)
        del result["writes"]
        return result, out

    async def counted(s: Any, h: Header, p: memoryview) -> Any:
        frames.append(h["op"])
        return await handlers[h["op"]](s, h, p)

    monkeypatch.setitem(server_module.HANDLERS, "open", old_open)
    monkeypatch.setitem(server_module.HANDLERS, "write", counted)
    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        await c.open("v", 3, 10 << 20, 1 << 20)
        futs = [c.write_nowait("v", 3, 0, 8 * i, memoryview(b"n" * 8), seq=i) for i in range(3)]
        writes = [c.write("v", 3, 1, 8 * i, b"m" * 8, seq=10 + i, durable=True) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*futs, *writes), 5)
        assert frames == ["write"] * 6
        assert await c.read("v", 3, 0, 0, 24) == b"n" * 24
    finally:
        await c.close()
        await server.close()


async def test_a_failed_write_fails_every_write_of_its_frame() -> None:
    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        await c.open("v", 3, 10 << 20, 1 << 20)
        first = c.write_nowait("v", 3, 0, 0, memoryview(b"a" * 4096), seq=1)
        bad = c.write_nowait("v", 3, 0, (1 << 20) - 1, memoryview(b"ab"), seq=2)
        after = c.write_nowait("v", 3, 1, 0, memoryview(b"c" * 4096), seq=3)
        assert first is bad is after
        await asyncio.wait_for(first, 5)
        # The replica may hold some of them: the caller treats it as failed for all (the
        # engine degrades it), which is what one error for the frame says.
        with pytest.raises(OutOfRange):
            ReplicaClient.write_outcome(after)
        assert await c.read("v", 3, 0, 0, 4096) == b"a" * 4096  # applied in order, up to it
        assert await c.read("v", 3, 1, 0, 4096) == bytes(4096)
    finally:
        await c.close()
        await server.close()


async def test_a_writes_frame_whose_lengths_do_not_match_its_payload_is_refused() -> None:
    svc = MemoryReplica()
    await svc.open("v", 1, 10 << 20, 1 << 20)
    server = ReplicaServer(svc, TEST_KEY)
    await server.start("127.0.0.1", 0)
    try:
        r, w = await raw_connect("127.0.0.1", server.port)
        header = {"op": "writes", "volume": "v", "epoch": 1, "items": [[0, 0, 8, 1], [1, 0, 8, 2]]}
        w.write(wire({"id": 5, **header}, b"x" * 12))
        w.write(wire({"id": 6, **header}, b"y" * 16))
        replies = []
        for _ in range(2):
            total, hlen = struct.unpack("!II", await r.readexactly(8))
            replies.append(msgpack.unpackb((await r.readexactly(total - 4))[:hlen]))
        by_id = {h["id"]: h for h in replies}
        assert by_id[5]["code"] == "PROTOCOL" and by_id[6]["ok"] is True
        assert svc.vols["v"]["chunks"][0][:8] == b"y" * 8  # nothing of frame 5 was applied
        assert svc.vols["v"]["chunks"][1][:8] == b"y" * 8
        w.close()
    finally:
        await server.close()


async def test_a_volume_opened_anew_takes_no_more_changes_over_older_connections() -> None:
    """A write still on its way over a connection its client dropped (a retransmission after
    a partition heals) must not land after the rebuild that opened the volume anew."""
    svc = MemoryReplica()
    await svc.open("v", 1, 10 << 20, 1 << 20)
    await svc.open("w", 1, 10 << 20, 1 << 20)
    server = ReplicaServer(svc, TEST_KEY)
    await server.start("127.0.0.1", 0)

    async def call(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, header: Header, payload: bytes = b""
    ) -> dict[str, Any]:
        w.write(wire(header, payload))
        total, hlen = struct.unpack("!II", await r.readexactly(8))
        return dict(msgpack.unpackb((await r.readexactly(total - 4))[:hlen]))

    def write(rid: int, volume: str, seq: int) -> Header:
        return {
            "id": rid,
            "op": "write",
            "volume": volume,
            "epoch": 1,
            "chunk": 0,
            "offset": 0,
            "seq": seq,
            "durable": False,
        }

    try:
        old_r, old_w = await raw_connect("127.0.0.1", server.port)
        assert (await call(old_r, old_w, write(1, "v", 1), b"a" * 8))["ok"] is True
        new_r, new_w = await raw_connect("127.0.0.1", server.port)
        opened = await call(
            new_r,
            new_w,
            {
                "id": 2,
                "op": "open",
                "volume": "v",
                "epoch": 1,
                "size": 10 << 20,
                "chunk_size": 1 << 20,
                "sync_writes": False,
            },
        )
        assert opened["ok"] is True
        late = await call(old_r, old_w, write(3, "v", 2), b"b" * 8)
        assert late["ok"] is False and late["code"] == "STALE_EPOCH", late
        assert svc.vols["v"]["chunks"][0][:8] == b"a" * 8  # the late write did not land
        # The older connection still serves the volumes nobody opened anew.
        assert (await call(old_r, old_w, write(4, "w", 3), b"c" * 8))["ok"] is True
        assert (await call(new_r, new_w, write(5, "v", 4), b"d" * 8))["ok"] is True
        old_w.close()
        new_w.close()
    finally:
        await server.close()


async def test_pipelined_out_of_order_and_inflight_bound() -> None:
    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        await c.open("v", 1, 1 << 30, 1 << 20)
        svc.gate = asyncio.Event()
        writes = [
            asyncio.ensure_future(c.write("v", 1, i % 4, i * 4, i.to_bytes(4, "big"), seq=i))
            for i in range(600)
        ]
        await asyncio.sleep(0.2)
        # The server stops reading at its in-flight bound; the rest wait in socket buffers.
        assert len(server._tasks) <= 128
        svc.gate.set()
        await asyncio.gather(*writes)
        for i in (0, 299, 599):
            assert await c.read("v", 1, i % 4, i * 4, 4) == i.to_bytes(4, "big")
    finally:
        await c.close()
        await server.close()


async def test_timeout_then_reconnect() -> None:
    svc = MemoryReplica()
    server, c = await _pair(svc, timeout=0.3)
    try:
        await c.open("v", 1, 1 << 30, 1 << 20)
        svc.gate = asyncio.Event()
        from replica.errors import ReplicaUnavailable

        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ReplicaUnavailable):
            await c.write("v", 1, 0, 0, b"a", seq=1)
        assert asyncio.get_running_loop().time() - t0 < 1.0
        svc.gate.set()
        await c.write("v", 1, 0, 0, b"b", seq=2)
        assert await c.read("v", 1, 0, 0, 1) == b"b"
    finally:
        await c.close()
        await server.close()


async def test_connect_refused_is_unavailable() -> None:
    from replica.errors import ReplicaUnavailable

    c = ReplicaClient("127.0.0.1", 1, connect_timeout=0.5, key=TEST_KEY)
    with pytest.raises(ReplicaUnavailable):
        await c.stats()


async def test_raw_bad_frames_get_protocol_errors() -> None:
    svc = MemoryReplica()
    server = ReplicaServer(svc, TEST_KEY)
    await server.start("127.0.0.1", 0)
    try:
        r, w = await raw_connect("127.0.0.1", server.port)
        w.write(wire({"id": 5, "op": "read", "volume": 1}))
        w.write(wire({"id": 6, "op": "bogus"}))
        w.write(wire({"id": 7, "op": "stats"}))
        replies = []
        for _ in range(3):
            total, hlen = struct.unpack("!II", await r.readexactly(8))
            replies.append(msgpack.unpackb((await r.readexactly(total - 4))[:hlen]))
        by_id = {h["id"]: h for h in replies}
        assert by_id[5]["code"] == "PROTOCOL" and by_id[6]["code"] == "PROTOCOL"
        assert by_id[7]["ok"] is True
        w.close()
    finally:
        await server.close()


async def test_client_that_stops_reading_bounds_server_memory() -> None:
    """Replies nobody reads must stop the server reading requests, not pile up in memory."""
    svc = MemoryReplica()
    server = ReplicaServer(svc, TEST_KEY)
    await server.start("127.0.0.1", 0)
    try:
        await svc.open("v", 1, 1 << 30, 1 << 20)
        r, w = await raw_connect("127.0.0.1", server.port)
        req = wire(
            {
                "id": 1,
                "op": "read",
                "volume": "v",
                "epoch": 1,
                "chunk": 0,
                "offset": 0,
                "length": 512 << 10,
            }
        )
        for _ in range(600):  # 300 MiB of replies asked for
            w.write(req)
        (conn,) = server._conns
        # Wait (bounded) for the server to stop: reading paused, nothing left in flight.
        for _ in range(1000):
            if conn._parsing_paused and conn._inflight == 0:
                break
            await asyncio.sleep(0.01)
        assert conn.transport is not None
        buffered = conn.transport.get_write_buffer_size()
        # In flight at the pause, at most: MAX_INFLIGHT replies of 512 KiB.
        assert buffered <= (128 + 2) * (512 << 10)
        assert conn._inflight == 0 and conn._parsing_paused
        # Reading the replies lets it carry on to the end.
        got = 0
        while got < 600:
            (total,) = struct.unpack("!I", await r.readexactly(4))
            await r.readexactly(total)
            got += 1
        w.close()
    finally:
        await server.close()


async def test_client_waits_for_a_peer_that_stops_reading() -> None:
    from replica.errors import ReplicaUnavailable

    stop = asyncio.Event()

    async def never_read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Takes the client's proof of the key, proves its own, then reads nothing more.
        nonce = auth.new_nonce()
        w.write(wire({"id": 0, "op": "challenge", "v": 1, "nonce": nonce}))
        total, hlen = struct.unpack("!II", await r.readexactly(8))
        proof = msgpack.unpackb((await r.readexactly(total - 4))[:hlen])
        mac = auth.server_mac(TEST_KEY, nonce, proof["nonce"])
        w.write(wire({"id": 0, "ok": True, "code": "", "msg": "", "mac": mac}))
        await stop.wait()
        w.close()

    srv = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    c = ReplicaClient("127.0.0.1", port, timeout=1.0, key=TEST_KEY)
    try:
        data = memoryview(bytes(1 << 20))
        calls = []
        for i in range(64):
            calls.append(asyncio.ensure_future(c.write("v", 1, 0, 0, data, seq=i)))
            await asyncio.sleep(0.005)
        conn = c._conn
        assert conn is not None and conn.write_paused and conn.transport is not None
        # Callers past the pause wait for a drain instead of queueing their data.
        assert conn.transport.get_write_buffer_size() < 16 << 20
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(e, ReplicaUnavailable) for e in results)
    finally:
        await c.close()
        stop.set()
        srv.close()
        await srv.wait_closed()


async def test_payload_bytes_in_flight_are_bounded() -> None:
    from replica.server import MAX_HELD

    svc = MemoryReplica()
    server, c = await _pair(svc)
    try:
        await c.open("v", 1, 1 << 30, 1 << 20)
        svc.gate = asyncio.Event()
        data = memoryview(bytes(1 << 20))
        writes = [asyncio.ensure_future(c.write("v", 1, i % 4, 0, data, seq=i)) for i in range(100)]
        # Until the server holds at least half the bound (a loaded machine may take seconds),
        # then a moment more, in which it must not read past the bound.
        for _ in range(3000):  # at most 30 s
            if server._conns and next(iter(server._conns))._held >= MAX_HELD // 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        (conn,) = server._conns
        assert MAX_HELD // 2 <= conn._held <= MAX_HELD + (1 << 20)
        assert len(server._tasks) <= MAX_HELD // (1 << 20)
        svc.gate.set()
        await asyncio.gather(*writes)
        assert conn._held == 0 and conn._inflight == 0
    finally:
        await c.close()
        await server.close()
