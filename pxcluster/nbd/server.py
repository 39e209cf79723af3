"""The NBD server: one `NbdConnection` (an asyncio BufferedProtocol) per client.

Hot path design, from measurements on our machines (see ENVIRONMENT.md):
- bytes are received with recv_into straight into a preallocated buffer, and a WRITE's
  payload straight into its own bytearray once its header is parsed; the export gets a
  memoryview of it, never a copy of a copy;
- a READ or a small WRITE with no earlier request pending is first offered to the export's
  `read_now` / `write_now` / `write_begin`, if it has them (the volume engine serves a read
  from the local replica, and a write only the local replica holds, that way, and starts a
  replicated write, answered from its future's callback): no coroutine;
- otherwise a request (but a WRITE over 64 KiB) with no earlier request pending runs its
  first step inline (`replica/inline.py`) and becomes a task only if it has to wait;
  each request is answered as soon as it completes (replies go out of order); replies are
  gathered and written once per loop iteration;
- backpressure: at most `max_inflight` requests (and about `max_inflight_bytes` of
  payload) per connection, replies not yet handed to the transport included; past that,
  or when the client stops reading replies (pause_writing), the transport stops reading,
  so memory stays bounded and a slow export slows its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
import stat
import sys
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import Any, Protocol, cast

from pxcluster.nbd import protocol as p
from pxcluster.nbd.buffers import BufferPool
from pxcluster.nbd.export import (
    BeginsWrites,
    Export,
    ExportRegistry,
    ReadsNow,
    WritesNow,
    has_errno,
    nbd_error,
)
from pxcluster.nbd.handshake import Negotiation, Next
from pxcluster.nbd.tls import HANDSHAKE_TIMEOUT
from replica import inline

log = logging.getLogger(__name__)

_RECV_BUFFER = 256 * 1024
# Compact the receive buffer when less than this is free at its tail.
_COMPACT_BELOW = 32 * 1024
# Largest WRITE whose first step runs inline (see _dispatch_write).
_INLINE_WRITE_MAX = 64 * 1024

_PHASE_CLIENT_FLAGS = 0
_PHASE_OPTIONS = 1
_PHASE_TRANSMISSION = 2

# Indexes into a volume's latency observers.
_OP_READ = 0
_OP_WRITE = 1
_OP_FLUSH = 2


class Observer(Protocol):
    """A latency histogram (prometheus_client's Histogram child has this method)."""

    def observe(self, amount: float) -> None: ...


# Export name -> its (read, write, flush) observers; called once per connection.
LatencyFor = Callable[[str], tuple[Observer, Observer, Observer]]
# An export's optional synchronous fast paths (pxcluster/nbd/export.py).
ReadNow = Callable[[int, int], bytes | bytearray | memoryview | None]
WriteNow = Callable[[int, memoryview, bool], bool]
WriteBegin = Callable[[int, memoryview, bool], "asyncio.Future[None] | None"]


class NbdConnection(asyncio.BufferedProtocol):
    __slots__ = (
        "_buf",
        "_closed",
        "_closing",
        "_cookie",
        "_end",
        "_export",
        "_export_name",
        "_flush_scheduled",
        "_fua",
        "_handshake_timer",
        "_inflight",
        "_inflight_bytes",
        "_lat",
        "_loop",
        "_lost",
        "_negotiation",
        "_offset",
        "_ordered",
        "_parsing",
        "_payload",
        "_payload_filled",
        "_phase",
        "_read_now",
        "_reading_paused",
        "_replies",
        "_server",
        "_skip",
        "_spent",
        "_stall_mark",
        "_stall_timer",
        "_start",
        "_structured",
        "_tasks",
        "_tls",
        "_transport",
        "_unsent",
        "_unsent_bytes",
        "_upgrading",
        "_view",
        "_write_begin",
        "_write_now",
        "_write_paused",
    )

    def __init__(self, server: NbdServer, tls: ssl.SSLContext | None = None) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._phase = _PHASE_CLIENT_FLAGS
        self._tls = tls  # STARTTLS required first (pxcluster/nbd/tls.py), or None
        self._upgrading = False  # STARTTLS acknowledged, TLS handshake under way
        self._negotiation = Negotiation(
            server.registry, server.max_request, tls_required=tls is not None
        )
        self._structured = False
        self._export: Export | None = None
        self._export_name = ""
        self._lat: tuple[Observer, Observer, Observer] | None = None
        # The export's optional synchronous fast paths (see pxcluster/nbd/export.py), or None.
        self._read_now: ReadNow | None = None
        self._write_now: WriteNow | None = None
        self._write_begin: WriteBegin | None = None
        self._transport: asyncio.Transport | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        # A WRITE whose payload is still arriving: its buffer, bytes received, header. Its
        # length counts against the server's receive budget until it is all here, and it
        # must keep arriving (the stall timer), or the connection is dropped.
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_mark = 0
        self._payload: memoryview | None = None
        self._payload_filled = 0
        self._cookie = 0
        self._offset = 0
        self._fua = False
        self._skip = 0  # payload bytes of a refused WRITE still to discard
        self._inflight = 0
        self._inflight_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()  # every request waiting as a task
        # Those a later read or write must not overtake: all but flushes. A flush promises
        # only the writes answered before it arrived, so a write after it may finish first.
        self._ordered: set[asyncio.Task[None]] = set()
        self._replies: list[bytes | bytearray | memoryview] = []
        # Replies (and read bytes) queued but not yet handed to the transport: they count as
        # in flight, or a burst of requests answered inline would queue replies unbounded.
        self._unsent = 0
        self._unsent_bytes = 0
        self._spent: list[bytearray] = []  # payload buffers of finished writes, to recycle
        self._flush_scheduled = False
        self._parsing = False  # inside _process: a request finishing inline must not re-enter
        self._reading_paused = False
        self._write_paused = False
        self._closing = False  # no new requests; close once in-flight ones are answered
        self._closed = False  # transport closed or lost: replies are dropped
        self._lost: asyncio.Future[None] = self._loop.create_future()

    # --- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies are already batched per loop iteration; Nagle would only add latency.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self._server._connections) >= self._server.max_connections:
            log.warning(
                "nbd: %d connections already; refusing one more", self._server.max_connections
            )
            self._closing = self._closed = True
            transport.abort()
            return
        self._server._connections.add(self)
        self._handshake_timer = self._loop.call_later(
            self._server.handshake_timeout, self._handshake_timed_out
        )
        transport.write(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.HANDSHAKE_FLAGS))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._closing = True
        self._replies.clear()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._payload is not None:
            self._end_payload()
        if self._export is not None:
            self._server.registry.unbind(self._export_name, self)
        self._server._connections.discard(self)
        if not self._lost.done():
            self._lost.set_result(None)
        # In-flight export calls are left to finish: cancelling a write halfway through
        # its replication would leave replicas needlessly diverged.

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            return self._payload[self._payload_filled :]
        if len(self._buf) - self._end < _COMPACT_BELOW and self._start > 0:
            pending = bytes(self._view[self._start : self._end])
            self._end = len(pending)
            self._start = 0
            self._view[: self._end] = pending
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload is not None:
            self._payload_filled += nbytes
            if self._payload_filled < len(self._payload):
                return
            data = self._payload
            self._end_payload()
            self._dispatch_write(self._cookie, self._offset, data, self._fua)
        else:
            self._end += nbytes
        self._process()
        self._update_reading()

    def eof_received(self) -> bool:
        # Keep the write side open so in-flight replies still reach a half-closed client.
        self._begin_close()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    # --- input -----------------------------------------------------------------------------

    def _can_dispatch(self) -> bool:
        return (
            not self._write_paused
            and self._inflight + self._unsent < self._server.max_inflight
            and self._inflight_bytes + self._unsent_bytes < self._server.max_inflight_bytes
        )

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        want = not self._closing and (self._payload is not None or self._can_dispatch())
        if want and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        elif not want and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()

    def _resume(self) -> None:
        """Room again (a request finished, or the client reads again): work through what
        is already buffered before asking the transport for more."""
        if self._payload is None and self._end > self._start and not self._parsing:
            self._process()
        self._update_reading()

    def _process(self) -> None:
        self._parsing = True
        try:
            self._process_buffered()
        finally:
            self._parsing = False

    def _process_buffered(self) -> None:
        buf = self._buf
        while not self._closing and self._payload is None and not self._upgrading:
            avail = self._end - self._start
            if self._skip:
                n = min(self._skip, avail)
                self._start += n
                self._skip -= n
                if self._skip:
                    break
                continue
            if self._phase == _PHASE_TRANSMISSION:
                if avail < p.REQUEST.size or not self._can_dispatch():
                    break
                magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack_from(buf, self._start)
                if (
                    cmd == p.CMD_WRITE
                    and avail < p.REQUEST.size + length
                    and not self._server.may_receive(self, length)
                ):
                    break  # the server's receive budget is spent: on again when it frees
                self._start += p.REQUEST.size
                if magic != p.REQUEST_MAGIC:
                    log.warning("nbd: bad request magic %#x; closing connection", magic)
                    self._begin_close()
                    break
                self._request(flags, cmd, cookie, offset, length)
            elif self._phase == _PHASE_OPTIONS:
                if avail < p.OPTION_HEADER.size:
                    break
                magic, option, length = p.OPTION_HEADER.unpack_from(buf, self._start)
                if magic != p.IHAVEOPT or length > p.MAX_OPTION_LENGTH:
                    self._abort_handshake()
                    break
                if avail < p.OPTION_HEADER.size + length:
                    break
                begin = self._start + p.OPTION_HEADER.size
                data = bytes(self._view[begin : begin + length])
                self._start = begin + length
                self._option(option, data)
            else:
                if avail < p.CLIENT_FLAGS.size:
                    break
                (flags,) = p.CLIENT_FLAGS.unpack_from(buf, self._start)
                self._start += p.CLIENT_FLAGS.size
                if not self._negotiation.client_flags(flags):
                    self._abort_handshake()
                    break
                self._phase = _PHASE_OPTIONS
        if self._start == self._end:
            self._start = self._end = 0

    def _begin_payload(self, payload: memoryview, have: int) -> None:
        self._payload = payload
        self._payload_filled = have
        self._server.receiving += len(payload)
        self._stall_mark = have
        self._stall_timer = self._loop.call_later(self._server.stall_timeout, self._stalled)

    def _end_payload(self) -> None:
        assert self._payload is not None
        self._server.receiving -= len(self._payload)
        self._payload = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._server.budget_freed()

    def _stalled(self) -> None:
        """A WRITE's payload stopped arriving: a client that sends a header and then nothing
        would otherwise hold its buffer for ever."""
        self._stall_timer = None
        if self._payload is None or self._closed:
            return
        if self._payload_filled > self._stall_mark:
            self._stall_mark = self._payload_filled
            self._stall_timer = self._loop.call_later(self._server.stall_timeout, self._stalled)
            return
        log.warning(
            "nbd: a write's payload stalled for %.0fs; closing the connection",
            self._server.stall_timeout,
        )
        self.abort()

    def _abort_handshake(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def _handshake_timed_out(self) -> None:
        if self._phase != _PHASE_TRANSMISSION and not self._closed:
            log.info("nbd: handshake timed out; closing connection")
            self._abort_handshake()

    def _option(self, option: int, data: bytes) -> None:
        assert self._transport is not None
        outcome = self._negotiation.option(option, data)
        if outcome.send:
            self._transport.writelines(outcome.send)
        if outcome.next is Next.CLOSE:
            self._abort_handshake()
        elif outcome.next is Next.STARTTLS:
            if self._end > self._start:  # the client may not send before TLS is up
                self._abort_handshake()
                return
            self._upgrading = True
            self._loop.create_task(self._start_tls())
        elif outcome.next is Next.TRANSMIT:
            export = self._server.registry.bind(outcome.export_name, self)
            if export is None:  # cannot happen within one callback, but never serve None
                self._abort_handshake()
                return
            self._export = export
            self._export_name = outcome.export_name
            # Found once per connection: the hot path's calls (pxcluster/nbd/export.py).
            if isinstance(export, ReadsNow):
                self._read_now = export.read_now
            if isinstance(export, WritesNow):
                self._write_now = export.write_now
            if isinstance(export, BeginsWrites):
                self._write_begin = export.write_begin
            if self._server.latency is not None:
                self._lat = self._server.latency(outcome.export_name)
            self._structured = self._negotiation.structured
            self._phase = _PHASE_TRANSMISSION
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
                self._handshake_timer = None

    async def _start_tls(self) -> None:
        assert self._transport is not None and self._tls is not None
        try:
            transport = await self._loop.start_tls(
                self._transport,
                self,
                self._tls,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (OSError, TimeoutError, ConnectionError) as e:  # ssl.SSLError is an OSError
            log.warning("nbd: TLS handshake failed: %s", e)
            self.abort()
            return
        if transport is None or self._closed:
            return
        self._transport = transport
        self._negotiation.tls_started()
        self._upgrading = False
        self._resume()

    # --- requests --------------------------------------------------------------------------

    def _request(self, flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
        export = self._export
        assert export is not None
        beyond_end = offset + length > export.size
        if cmd == p.CMD_WRITE:
            if length > self._server.max_request:
                # The payload cannot be skipped safely (a hostile length could be 4 GiB),
                # so the stream is lost: answer, then close.
                self._reply_error(cookie, p.NBD_EINVAL, "write larger than maximum request")
                self._begin_close()
                return
            if beyond_end:
                self._reply_error(cookie, p.NBD_EINVAL, "write beyond end of export")
                self._skip = length
                return
            payload = memoryview(self._server.buffers.take(length))
            have = min(self._end - self._start, length)
            payload[:have] = self._view[self._start : self._start + have]
            self._start += have
            if have == length:
                self._dispatch_write(cookie, offset, payload, bool(flags & p.CMD_FLAG_FUA))
            else:
                self._begin_payload(payload, have)
                self._cookie = cookie
                self._offset = offset
                self._fua = bool(flags & p.CMD_FLAG_FUA)
        elif cmd == p.CMD_READ:
            if length > self._server.max_request:
                self._reply_error(cookie, p.NBD_EOVERFLOW, "read larger than maximum request")
            elif beyond_end:
                self._reply_error(cookie, p.NBD_EINVAL, "read beyond end of export")
            else:
                t0 = perf_counter()
                # Never ahead of an earlier request still waiting as a task.
                if self._read_now is not None and not self._ordered:
                    data = self._read_now(offset, length)
                    if data is not None and len(data) == length:
                        self._reply_read(cookie, offset, length, data)
                        if self._lat is not None:
                            self._lat[_OP_READ].observe(perf_counter() - t0)
                        return
                self._spawn(self._read(export, cookie, offset, length, t0), length)
        elif cmd == p.CMD_FLUSH:
            flush = self._call(cookie, export.flush(), _OP_FLUSH, perf_counter())
            self._spawn(flush, 0, ordered=False)
        elif cmd == p.CMD_TRIM:
            if beyond_end:
                self._reply_error(cookie, p.NBD_EINVAL, "trim beyond end of export")
            else:
                fua = bool(flags & p.CMD_FLAG_FUA)
                self._spawn(self._call(cookie, export.trim(offset, length, fua)), 0)
        elif cmd == p.CMD_WRITE_ZEROES:
            if beyond_end:
                self._reply_error(cookie, p.NBD_EINVAL, "write zeroes beyond end of export")
            else:
                fua = bool(flags & p.CMD_FLAG_FUA)
                may_trim = not flags & p.CMD_FLAG_NO_HOLE
                coro = export.write_zeroes(offset, length, fua, may_trim)
                self._spawn(self._call(cookie, coro), 0)
        elif cmd == p.CMD_DISC:
            self._begin_close()
        else:
            # Unknown or not advertised (CACHE, BLOCK_STATUS, ...): no payload to skip.
            self._reply_error(cookie, p.NBD_EINVAL, f"unsupported command {cmd}")

    def _dispatch_write(self, cookie: int, offset: int, data: memoryview, fua: bool) -> None:
        # A small write is offered to write_now (one only the local replica holds is done
        # there), else runs inline like a read: one that waits for remote replicas has sent
        # their frames by then. A large one is a task at once: run inline, its page-cache copy
        # would hold up receiving the requests behind it (1 MiB sequential writes ~10% slower,
        # measured).
        t0 = perf_counter()
        inline_ok = len(data) <= _INLINE_WRITE_MAX
        if inline_ok and not self._ordered:
            if self._write_now is not None and self._write_now(offset, data, fua):
                self._reply_ok(cookie)
                self._recycle(data)
                if self._lat is not None:
                    self._lat[_OP_WRITE].observe(perf_counter() - t0)
                return
            if self._write_begin is not None:
                ack = self._write_begin(offset, data, fua)
                if ack is not None:
                    self._inflight += 1
                    self._inflight_bytes += len(data)
                    ack.add_done_callback(functools.partial(self._write_acked, cookie, data, t0))
                    return
        self._spawn(self._write(cookie, offset, data, fua, t0), len(data), inline_ok=inline_ok)

    def _write_acked(
        self, cookie: int, data: memoryview, t0: float, ack: asyncio.Future[None]
    ) -> None:
        """A write started by the export's write_begin is over: answer it, as _run and _call
        end a request."""
        nbytes = len(data)
        exc = BaseException() if ack.cancelled() else ack.exception()
        if exc is None:
            self._reply_ok(cookie)
        elif isinstance(exc, Exception):
            self._reply_failure(cookie, exc)
        else:
            self._reply_error(cookie, p.NBD_EIO, "write cancelled")
        if self._lat is not None:
            self._lat[_OP_WRITE].observe(perf_counter() - t0)
        self._recycle(data)
        self._request_done(nbytes)

    async def _write(
        self, cookie: int, offset: int, data: memoryview, fua: bool, t0: float
    ) -> None:
        export = self._export
        assert export is not None
        try:
            await self._call(cookie, export.write(offset, data, fua), _OP_WRITE, t0)
        finally:
            self._recycle(data)

    def _recycle(self, data: memoryview) -> None:
        """Hand a finished WRITE's payload buffer back to the pool (at the next flush)."""
        buf: object = data.obj
        try:
            data.release()
        except BufferError:  # the export built on `data` and still holds it
            buf = None
        if isinstance(buf, bytearray):
            # Checked at the next flush, not here: a write that completed inline, inside
            # buffer_updated, still has its buffer pinned by the transport's receive view.
            self._spent.append(buf)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    def _spawn(
        self,
        coro: Coroutine[Any, Any, None],
        nbytes: int,
        *,
        inline_ok: bool = True,
        ordered: bool = True,
    ) -> None:
        self._inflight += 1
        self._inflight_bytes += nbytes
        run = self._run(coro, nbytes)
        # Inline only when no earlier read or write still waits as a task: a request never
        # starts ahead of one received before it (a flush may be overtaken, see _ordered).
        if inline_ok and not self._ordered:
            task = inline.start(self._loop, run)
        else:
            task = self._loop.create_task(run)
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if ordered:
                self._ordered.add(task)
                task.add_done_callback(self._ordered.discard)

    async def _run(self, coro: Coroutine[Any, Any, None], nbytes: int) -> None:
        try:
            await coro
        finally:
            self._request_done(nbytes)

    def _request_done(self, nbytes: int) -> None:
        """A request counted in flight is answered: close if closing, else take more."""
        self._inflight -= 1
        self._inflight_bytes -= nbytes
        if self._closing:
            if self._inflight == 0:
                self._finish_close()
        elif not self._closed:
            self._resume()

    async def _call(
        self, cookie: int, coro: Coroutine[Any, Any, None], op: int = -1, t0: float = 0.0
    ) -> None:
        try:
            await coro
        except Exception as exc:
            self._reply_failure(cookie, exc)
        else:
            self._reply_ok(cookie)
        if op >= 0 and self._lat is not None:
            self._lat[op].observe(perf_counter() - t0)

    async def _read(self, export: Export, cookie: int, offset: int, length: int, t0: float) -> None:
        try:
            data = await export.read(offset, length)
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            if size != length:
                raise RuntimeError(f"export returned {size} bytes for a {length}-byte read")
        except Exception as exc:
            self._reply_failure(cookie, exc)
            if self._lat is not None:
                self._lat[_OP_READ].observe(perf_counter() - t0)
            return
        self._reply_read(cookie, offset, length, data)
        if self._lat is not None:
            self._lat[_OP_READ].observe(perf_counter() - t0)

    # --- output ----------------------------------------------------------------------------

    def _reply_read(
        self, cookie: int, offset: int, length: int, data: bytes | bytearray | memoryview
    ) -> None:
        if self._structured:
            if length == 0:  # an OFFSET_DATA chunk must carry data
                header = p.STRUCTURED_REPLY.pack(
                    p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie, 0
                )
            else:
                header = p.STRUCTURED_READ.pack(
                    p.STRUCTURED_REPLY_MAGIC,
                    p.REPLY_FLAG_DONE,
                    p.REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + length,
                    offset,
                )
        else:
            header = p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie)
        self._unsent_bytes += length
        self._queue(header, data)

    def _reply_ok(self, cookie: int) -> None:
        if self._structured:
            self._queue(
                p.STRUCTURED_REPLY.pack(
                    p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie, 0
                )
            )
        else:
            self._queue(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _reply_failure(self, cookie: int, exc: Exception) -> None:
        error = nbd_error(exc)
        if has_errno(exc):
            log.debug("nbd: request failed on %s: %r", self._export_name, exc)
        else:
            log.error("nbd: request failed on %s", self._export_name, exc_info=exc)
        self._reply_error(cookie, error, "")

    def _reply_error(self, cookie: int, error: int, message: str) -> None:
        if self._structured:
            raw = message.encode()
            self._queue(
                p.STRUCTURED_ERROR.pack(
                    p.STRUCTURED_REPLY_MAGIC,
                    p.REPLY_FLAG_DONE,
                    p.REPLY_TYPE_ERROR,
                    cookie,
                    6 + len(raw),
                    error,
                    len(raw),
                )
                + raw
            )
        else:
            self._queue(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie))

    def _queue(self, *chunks: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        self._replies.extend(chunks)
        self._unsent += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        spent = self._spent
        while spent:
            buf = spent.pop()
            # Reuse only what nothing references any more (the export contract says so; this
            # guards against an export that keeps a slice anyway): our local and the
            # getrefcount argument are the only two references then.
            if sys.getrefcount(buf) == 2:
                self._server.buffers.give(buf)
            del buf
        if self._replies and not self._closed and self._transport is not None:
            replies = self._replies
            self._replies = []
            self._unsent = self._unsent_bytes = 0
            # The transport may pause_writing here (the client is not reading): then nothing
            # more is dispatched; otherwise what the queued replies held back goes on now.
            self._transport.writelines(replies)
            if not self._closing:
                self._resume()

    # --- closing ---------------------------------------------------------------------------

    def _begin_close(self) -> None:
        """Take no new requests; close once every in-flight request has been answered."""
        if self._closing:
            return
        self._closing = True
        self._update_reading()
        if self._inflight == 0:
            self._finish_close()

    def _finish_close(self) -> None:
        if self._closed:
            return
        self._flush()
        self._closed = True
        if self._transport is not None:
            self._transport.close()  # still sends what is buffered

    async def drain_and_close(self, timeout: float) -> None:
        if self._phase != _PHASE_TRANSMISSION:
            self._abort_handshake()
        else:
            self._begin_close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        except TimeoutError:
            log.warning("nbd: connection to %s did not drain in %.1fs", self._export_name, timeout)
            self.abort()

    def abort(self) -> None:
        self._closing = True
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.abort()


class NbdServer:
    """Serves the exports of a registry over TCP and/or unix sockets."""

    def __init__(
        self,
        registry: ExportRegistry,
        *,
        max_inflight: int = 64,
        max_request: int = 32 << 20,
        max_inflight_bytes: int = 64 << 20,
        handshake_timeout: float = 10.0,
        max_connections: int = 256,
        max_receiving: int = 64 << 20,
        stall_timeout: float = 30.0,
        latency: LatencyFor | None = None,
    ) -> None:
        if max_inflight < 1 or max_request < 1:
            raise ValueError("max_inflight and max_request must be positive")
        self.registry = registry
        # Per-volume latency histograms (pxcluster.node.metrics.Metrics.nbd_latency), or None.
        self.latency = latency
        self.max_inflight = max_inflight
        self.max_request = max_request
        self.max_inflight_bytes = max_inflight_bytes
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        # Bytes of WRITE payloads allocated but not all received yet, on every connection:
        # past the budget a connection waits before taking a WRITE whose payload is not in.
        self.receiving = 0
        self.max_receiving = max_receiving
        self.stall_timeout = stall_timeout
        self._budget_waiters: set[NbdConnection] = set()
        # Enough for a full queue of 1 MiB writes on a couple of connections.
        self.buffers = BufferPool(min(max_inflight_bytes, 64 << 20))
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[NbdConnection] = set()

    def may_receive(self, conn: NbdConnection, length: int) -> bool:
        """Room in the receive budget for a payload of `length`? (One always fits alone.)"""
        if self.receiving == 0 or self.receiving + length <= self.max_receiving:
            self._budget_waiters.discard(conn)
            return True
        self._budget_waiters.add(conn)
        return False

    def budget_freed(self) -> None:
        waiters, self._budget_waiters = self._budget_waiters, set()
        for conn in waiters:
            conn._resume()

    async def start_tcp(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> int:
        """Listen on host:port; returns the bound port (useful with port 0). With `tls`
        (pxcluster/nbd/tls.py), clients must STARTTLS with a certificate from its CA."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: NbdConnection(self, tls), host, port, reuse_address=True
        )
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def start_unix(self, path: str) -> None:
        """Listen on a unix socket only root may use: the consumer runs on this host."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: NbdConnection(self), path)
        os.chmod(path, 0o600)
        self._servers.append(server)
        self._unix_paths.append(path)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def close(self, *, timeout: float = 5.0) -> None:
        """Stop listening, let every connection answer what it has in flight, then close."""
        for server in self._servers:
            server.close()
        if self._connections:
            await asyncio.gather(*(c.drain_and_close(timeout) for c in list(self._connections)))
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
        self._unix_paths.clear()
