"""The replica wire format, in one place; replica/server.py and replica/client.py both use it.

Frame: ``u32 total | u32 header_len | msgpack header | payload`` (big endian), where ``total``
counts the bytes after itself (``4 + header_len + len(payload)``). Data bytes travel as the raw
payload and never through msgpack.

Request header: ``{"id": int, "op": str, ...args}`` (args per op in ``OPS``).
Reply header: ``{"id": int, "ok": bool, "code": str, "msg": str, ...result}`` + payload.

A frame whose length fields are impossible (``total`` too small or above ``MAX_FRAME``) breaks the
framing itself: the connection is closed. A frame with an intact boundary but a bad header is
answered with a ProtocolError reply (id 0 when the id itself is unreadable) and the stream goes on.

``FramedProtocol`` is the shared transport half: it receives with ``recv_into`` into reusable
buffers (a payload is copied once, kernel -> buffer, and handed on as a memoryview; a frame
larger than the standard buffer gets a page-aligned one with its payload on a ``PAYLOAD_ALIGN``
boundary, so a whole chunk can go to the disk with O_DIRECT straight from there), and it
gathers outgoing frames into one ``writelines`` per loop iteration, since each transport write
costs a syscall and, on these VMs, often a cross-CPU wakeup of the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import socket
import struct
from typing import Any, cast

import msgpack

from replica.errors import ProtocolError

PREFIX = struct.Struct("!II")
_LINGER_NONE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST, drops the queue
_TOTAL = struct.Struct("!I")
MAX_PAYLOAD = 64 << 20
MAX_HEADER = 16 << 20  # generations / dirty lists of a large volume travel in the header
MAX_FRAME = 4 + MAX_HEADER + MAX_PAYLOAD  # largest acceptable ``total``

_RX_SIZE = 256 << 10  # standard receive buffer: many small frames per recv_into
_RX_MIN_FREE = 16 << 10  # roll to a fresh buffer below this much room, so recv stays large
_POOL_BYTES = 32 << 20  # idle receive buffers kept per connection (saves page faults)
PAYLOAD_ALIGN = 4096  # where a large frame's payload starts in its receive buffer
_JOIN_MAX = 16 << 10  # payloads up to this are joined to their header; larger go by reference
NAME_MAX = 64  # bytes of any name or id on the wire (volume ids, snapshot ids and names)
BYTES_MAX = 64 << 10  # a bytes argument (a chunk's block mask)
LIST_MAX = 1 << 20  # entries of a list argument (chunk indices of mark_clean)
WRITES_MAX_ITEMS = 64  # a "writes" frame's bounds (the client closes a batch at either)
WRITES_MAX_BYTES = 1 << 20

Header = dict[str, Any]

# op -> (field, type) of its request arguments. ``int`` means a non-negative int, not a bool.
OPS: dict[str, tuple[tuple[str, type], ...]] = {
    "open": (
        ("volume", str),
        ("epoch", int),
        ("size", int),
        ("chunk_size", int),
        ("sync_writes", bool),
    ),
    "write": (
        ("volume", str),
        ("epoch", int),
        ("chunk", int),
        ("offset", int),
        ("seq", int),
        ("durable", bool),
    ),
    # Small writes of one volume made in one loop iteration, in one frame: items are [chunk,
    # offset, length, seq], their data the payload, back to back, applied in order; with the
    # optional "durable", all of them on stable storage (one sync) before the reply.
    "writes": (("volume", str), ("epoch", int), ("items", list)),
    "read": (("volume", str), ("epoch", int), ("chunk", int), ("offset", int), ("length", int)),
    "trim": (
        ("volume", str),
        ("epoch", int),
        ("chunk", int),
        ("offset", int),
        ("length", int),
        ("seq", int),
    ),
    "flush": (("volume", str), ("epoch", int)),
    "generations": (("volume", str), ("epoch", int)),
    "mark_clean": (("volume", str), ("epoch", int), ("chunks", list)),
    "read_chunk": (("volume", str), ("epoch", int), ("chunk", int)),
    "write_chunk": (
        ("volume", str),
        ("epoch", int),
        ("chunk", int),
        ("present", bool),
        ("gen", list),
    ),
    "delete": (("volume", str), ("epoch", int)),
    "stats": (),
    "ping": (),
    "snapshot_generations": (("volume", str), ("snap_id", str)),
    "snapshots": (("volume", str),),
    "snapshot_create": (
        ("volume", str),
        ("epoch", int),
        ("snap_id", str),
        ("name", str),
        ("created", float),
    ),
    "snapshot_delete": (("volume", str), ("epoch", int), ("snap_id", str)),
    "revert": (("volume", str), ("epoch", int), ("snap_id", str)),
    "chunk_digest": (("volume", str), ("epoch", int), ("chunk", int)),
}

# op -> optional request fields: absent means the default ("" / None).
OPTIONAL: dict[str, tuple[tuple[str, type], ...]] = {
    "writes": (("durable", bool),),
    "read": (("snapshot", str),),
    "generations": (("layer", str),),
    "read_chunk": (("layer", str),),
    "write_chunk": (("mask", bytes), ("layer", str)),
    "chunk_digest": (("layer", str),),
}

_TYPE_NAMES = {
    int: "a non-negative int",
    bool: "a bool",
    str: "a string",
    list: "a list",
    float: "a number",
    bytes: "bytes",
}
_packb = msgpack.Packer(autoreset=True, use_bin_type=True).pack


def _is_uint(v: object) -> bool:
    return type(v) is int and v >= 0


def _check_bounds(op: str, name: str, v: object) -> None:
    """Names end up in the store's metadata and lists in memory: bound both before use."""
    if type(v) is str:
        n = len(v.encode())
        if n > NAME_MAX or (n == 0 and name == "volume"):
            raise ProtocolError(f"{op}: field {name!r} must be 1 to {NAME_MAX} bytes")
    if type(v) is bytes and len(v) > BYTES_MAX:
        raise ProtocolError(f"{op}: field {name!r} has more than {BYTES_MAX} bytes")
    if type(v) is list and len(v) > LIST_MAX:
        raise ProtocolError(f"{op}: field {name!r} has more than {LIST_MAX} entries")


def check_request(header: object) -> tuple[int, str]:
    """Validate a decoded request header; returns (id, op). Raises ProtocolError."""
    if not isinstance(header, dict):
        raise ProtocolError("request header is not a map")
    rid = header.get("id")
    if type(rid) is not int or rid < 0:
        raise ProtocolError("request id missing or not a non-negative int")
    op = header.get("op")
    fields = OPS.get(op) if type(op) is str else None
    if fields is None:
        raise ProtocolError(f"unknown op {op!r}")
    assert isinstance(op, str)
    get = header.get
    for name, typ in fields:
        v: Any = get(name)
        # type() rather than isinstance: a bool must not pass for an int
        if typ is float and type(v) is int:
            continue
        if type(v) is not typ or (typ is int and cast(int, v) < 0):
            raise ProtocolError(f"{op}: field {name!r} missing or not {_TYPE_NAMES[typ]}: {v!r}")
        _check_bounds(op, name, v)
    for name, typ in OPTIONAL.get(op, ()):
        v = get(name)
        if v is not None:
            if type(v) is not typ:
                raise ProtocolError(f"{op}: field {name!r} is not {_TYPE_NAMES[typ]}: {v!r}")
            _check_bounds(op, name, v)
    if op == "mark_clean" and not all(_is_uint(c) for c in header["chunks"]):
        raise ProtocolError("mark_clean: chunks must be non-negative ints")
    if op == "writes":
        items = header["items"]
        if not 0 < len(items) <= WRITES_MAX_ITEMS or not all(
            type(it) is list and len(it) == 4 and all(_is_uint(x) for x in it) for it in items
        ):
            raise ProtocolError(
                f"writes: items must be 1 to {WRITES_MAX_ITEMS} [chunk, offset, length, seq]"
            )
    if op == "write_chunk":
        gen = header["gen"]
        if len(gen) != 2 or not all(_is_uint(g) for g in gen):
            raise ProtocolError("write_chunk: gen must be [epoch, seq]")
    return rid, op


def encode_frame(
    header: Header, payload: bytes | memoryview | None = None
) -> list[bytes | memoryview]:
    """Pieces of one frame, for ``writelines``. Large payloads are passed by reference."""
    h = _packb(header)
    plen = len(payload) if payload is not None else 0
    if plen > MAX_PAYLOAD or len(h) > MAX_HEADER:
        raise ProtocolError(f"frame too large (header {len(h)}, payload {plen})")
    prefix = PREFIX.pack(4 + len(h) + plen, len(h))
    if not plen:
        return [prefix + h]
    assert payload is not None
    if plen <= _JOIN_MAX:
        return [b"".join((prefix, h, payload))]
    return [prefix + h, payload]


def encode_frame_parts(header: Header, parts: list[memoryview]) -> list[bytes | memoryview]:
    """Pieces of one frame whose payload is `parts` back to back (a "writes" frame)."""
    h = _packb(header)
    plen = sum(len(x) for x in parts)
    if plen > MAX_PAYLOAD or len(h) > MAX_HEADER:
        raise ProtocolError(f"frame too large (header {len(h)}, payload {plen})")
    prefix = PREFIX.pack(4 + len(h) + plen, len(h))
    if plen <= _JOIN_MAX:
        return [b"".join((prefix, h, *parts))]
    return [prefix + h, *parts]


def decode_header(view: memoryview) -> Header:
    try:
        header = msgpack.unpackb(view, raw=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    return header


class RxPool:
    """Idle receive buffers of one connection: a fresh large buffer page-faults on first use,
    which costs more than the copy it receives."""

    __slots__ = ("bufs", "nbytes")

    def __init__(self) -> None:
        self.bufs: list[RxBuffer] = []
        self.nbytes = 0

    def put(self, buf: RxBuffer) -> None:
        if self.nbytes + len(buf.data) <= _POOL_BYTES:
            self.bufs.append(buf)
            self.nbytes += len(buf.data)

    def take(self, size: int) -> RxBuffer:
        for i, b in enumerate(self.bufs):
            if size <= len(b.data) <= max(size * 2, _RX_SIZE):
                del self.bufs[i]
                self.nbytes -= len(b.data)
                return b
        return RxBuffer(size, self)


class RxBuffer:
    """A receive buffer that frames' payload memoryviews point into.

    ``refs`` counts payloads still in use; a buffer is reused (or pooled) only once it is 0,
    so a payload handed to an async write is never overwritten under it.
    """

    __slots__ = ("data", "pool", "refs", "retired", "view")

    def __init__(self, size: int, pool: RxPool) -> None:
        # A large buffer is an anonymous mapping: page-aligned (see _roll), and zero-filled
        # lazily like the allocator's own large blocks.
        self.data: bytearray | mmap.mmap = (
            bytearray(size) if size <= _RX_SIZE else mmap.mmap(-1, size)
        )
        self.view = memoryview(self.data)
        self.refs = 0
        self.retired = False  # no longer the connection's current buffer
        self.pool = pool

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.retired:
            self.retired = False
            self.pool.put(self)


class FramedProtocol(asyncio.BufferedProtocol):
    """Framing, receive buffers, batched sends and write flow control, shared by both ends.

    Subclasses implement ``frame_received`` (and may call ``pause_parsing``/``resume_parsing``
    to bound work in flight) and ``bad_frame`` for frames whose boundary is intact.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._pool = RxPool()
        self._rx = RxBuffer(_RX_SIZE, self._pool)
        self._pos = 0
        self._end = 0
        self._parsing_paused = False
        self._in_parse = False
        self._out: list[bytes | memoryview] = []
        self._out_scheduled = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed = False
        self.loop = asyncio.get_running_loop()
        # The largest frame taken now: small until the peer has authenticated (replica/auth.py).
        self.max_frame = MAX_FRAME

    # -- hooks -----------------------------------------------------------------------------
    def frame_received(self, header: Header, payload: memoryview, rx: RxBuffer) -> None:
        raise NotImplementedError

    def bad_frame(self, reason: str) -> None:
        raise NotImplementedError

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._wake_drain_waiters()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain_waiters()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport accepts more (or is closed)."""
        while self.write_paused and not self.closed:
            w: asyncio.Future[None] = self.loop.create_future()
            self._drain_waiters.append(w)
            await w

    def get_buffer(self, sizehint: int) -> memoryview:
        rx = self._rx
        size = len(rx.data)
        if size - self._end < _RX_MIN_FREE or self._frame_end() > size:
            self._roll()
            rx = self._rx
        return rx.view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._parse()

    def eof_received(self) -> bool | None:
        return None  # close the transport; a half-closed peer sends no more requests

    # -- receive path ----------------------------------------------------------------------
    def _frame_end(self) -> int:
        """Where the frame being received ends in the current buffer (a prefix, if unknown)."""
        if self._end - self._pos < 4:
            return self._pos + 8
        total: int = _TOTAL.unpack_from(self._rx.data, self._pos)[0]
        if not 4 <= total <= self.max_frame:
            return self._pos + 8  # a bad length: room for the prefix is all _parse needs
        return self._pos + 4 + total

    def _roll(self) -> None:
        """Move the unparsed tail to a buffer with room for the whole frame being received."""
        rx, pos, end = self._rx, self._pos, self._end
        pending = end - pos
        need = max(self._frame_end() - pos, _RX_MIN_FREE + pending)
        lead = 0
        if rx.refs == 0 and need <= len(rx.data) and len(rx.data) == _RX_SIZE:
            rx.data[0:pending] = rx.data[pos:end]  # nobody points into it: reuse in place
        else:
            if need > _RX_SIZE and pending >= PREFIX.size:
                # A large frame, its header length known: start it so that its payload lands
                # on an aligned address of the (page-aligned) buffer.
                hlen = PREFIX.unpack_from(rx.data, pos)[1]
                lead = -(PREFIX.size + min(hlen, MAX_HEADER)) % PAYLOAD_ALIGN
            new = self._pool.take(max(need + lead, _RX_SIZE))
            new.view[lead : lead + pending] = rx.view[pos:end]
            if rx.refs == 0:
                self._pool.put(rx)
            else:
                rx.retired = True
            self._rx = new
        self._pos = lead
        self._end = lead + pending

    def pause_parsing(self) -> None:
        if not self._parsing_paused:
            self._parsing_paused = True
            if self.transport is not None and not self.closed:
                self.transport.pause_reading()

    def resume_parsing(self) -> None:
        if self._parsing_paused and not self.closed:
            self._parsing_paused = False
            if not self._in_parse:  # else the running parse loop simply carries on
                self._parse()
            if not self._parsing_paused and self.transport is not None:
                self.transport.resume_reading()

    def _parse(self) -> None:
        self._in_parse = True
        try:
            self._parse_frames()
        finally:
            self._in_parse = False

    def _parse_frames(self) -> None:
        rx = self._rx
        data, view = rx.data, rx.view
        pos, end = self._pos, self._end
        unpack = PREFIX.unpack_from
        while not self._parsing_paused and end - pos >= 8:
            total, hlen = unpack(data, pos)
            if total < 4 or total > self.max_frame:
                self._pos = self._end = 0
                self.framing_error(f"bad frame length {total}")
                return
            fend = pos + 4 + total
            if fend > end:
                break
            hstart = pos + 8
            pstart = hstart + hlen
            pos = fend
            if hlen > total - 4 or hlen > MAX_HEADER:
                self._pos = pos
                self.bad_frame(f"header length {hlen} exceeds frame length {total}")
                continue
            try:
                header = decode_header(view[hstart:pstart])
            except ProtocolError as e:
                self._pos = pos
                self.bad_frame(str(e))
                continue
            self._pos = pos
            self.frame_received(header, view[pstart:fend], rx)
            if self.closed:
                return
        if pos == end and rx.refs == 0:
            pos = end = 0  # everything consumed and unreferenced: start over at the front
        self._pos, self._end = pos, end

    def framing_error(self, reason: str) -> None:
        """The stream cannot be re-synchronised: drop this connection only."""
        self.reset()

    def reset(self) -> None:
        """Drop the connection at once, and everything it still had to send. A plain close
        leaves the kernel an orphan socket that keeps retransmitting what was not yet
        acknowledged: frames that would reach the peer seconds later, after a partition
        heals, and be applied there as if they were new (a write landing after the rebuild
        that had already copied a newer version of its chunk)."""
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
        transport.abort()

    # -- send path -------------------------------------------------------------------------
    def send_frame(self, header: Header, payload: bytes | memoryview | None = None) -> None:
        if self.closed:
            return
        self._out.extend(encode_frame(header, payload))
        if not self._out_scheduled:
            self._out_scheduled = True
            self.loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._out_scheduled = False
        out, self._out = self._out, []
        if out and not self.closed and self.transport is not None:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)
