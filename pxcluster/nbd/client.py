"""A small NBD client in pure asyncio: fixed newstyle handshake with NBD_OPT_GO, simple replies,
READ / WRITE (optionally FUA) / FLUSH / DISC, many requests in flight on one connection.

Enough for `pxcluster verify`, which must run where libnbd is not installed. Numbers come from
pxcluster/nbd/protocol.py (NetworkBlockDevice/nbd doc/proto.md); all integers big-endian.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from urllib.parse import parse_qs, unquote, urlparse

from pxcluster.nbd import protocol as p

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_OPT = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_CMD_FLAG_FUA = 1 << 0


class NbdError(Exception):
    """The server refused (an option or a command) or broke the protocol."""


class NbdCommandError(NbdError):
    def __init__(self, command: str, errno: int) -> None:
        super().__init__(f"NBD {command} failed: error {errno}")
        self.errno = errno


def parse_uri(uri: str) -> tuple[str, int, str]:
    """nbd://HOST[:PORT]/EXPORT -> (host, port, export);
    nbd+unix:///EXPORT?socket=PATH -> (PATH, 0, export): port 0 means a unix socket."""
    u = urlparse(uri)
    export = unquote(u.path.lstrip("/"))
    if u.scheme == "nbd+unix":
        sockets = parse_qs(u.query).get("socket")
        if not sockets:
            raise ValueError(f"nbd+unix URI without ?socket=: {uri!r}")
        return sockets[0], 0, export
    if u.scheme != "nbd" or not u.hostname:
        raise ValueError(f"not an nbd:// or nbd+unix:// URI: {uri!r}")
    return u.hostname, u.port or 10809, export


class NbdClient:
    """One connection to one export. `await NbdClient.connect(uri)`; then read/write/flush."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._cookies = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[bytes], int]] = {}
        self._receiver: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None
        self.size = 0
        self.flags = 0

    @classmethod
    async def connect(cls, uri: str, *, timeout: float = 10.0) -> NbdClient:
        host, port, export = parse_uri(uri)
        opening = (
            asyncio.open_connection(host, port) if port else asyncio.open_unix_connection(host)
        )
        reader, writer = await asyncio.wait_for(opening, timeout)
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._handshake(export), timeout)
        except BaseException:
            writer.close()
            raise
        client._receiver = asyncio.get_running_loop().create_task(client._receive())
        return client

    async def _handshake(self, export: str) -> None:
        r, w = self._reader, self._writer
        magic, opt_magic = struct.unpack(">QQ", await r.readexactly(16))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NbdError("not a fixed newstyle NBD server")
        (server_flags,) = _U16.unpack(await r.readexactly(2))
        if not server_flags & p.FLAG_FIXED_NEWSTYLE:
            raise NbdError("server does not speak fixed newstyle")
        client_flags = p.FLAG_C_FIXED_NEWSTYLE
        if server_flags & p.FLAG_NO_ZEROES:
            client_flags |= p.FLAG_C_NO_ZEROES
        name = export.encode()
        data = _U32.pack(len(name)) + name + _U16.pack(0)  # no info requests: EXPORT comes anyway
        w.write(_U32.pack(client_flags) + _OPT.pack(p.IHAVEOPT, p.OPT_GO, len(data)) + data)
        await w.drain()
        while True:
            magic, _opt, rtype, length = _OPT_REPLY.unpack(await r.readexactly(_OPT_REPLY.size))
            payload = await r.readexactly(length) if length else b""
            if magic != p.OPT_REPLY_MAGIC:
                raise NbdError("bad option reply magic")
            if rtype & p.REP_FLAG_ERROR:
                why = payload.decode(errors="replace")
                raise NbdError(
                    f"export {export!r} refused (reply {rtype & 0xFF}){': ' + why if why else ''}"
                )
            if rtype == p.REP_INFO and len(payload) >= 12:
                (info,) = _U16.unpack_from(payload)
                if info == p.INFO_EXPORT:
                    self.size, self.flags = struct.unpack_from(">QH", payload, 2)
            elif rtype == p.REP_ACK:
                return

    async def _receive(self) -> None:
        try:
            while True:
                magic, error, cookie = _SIMPLE_REPLY.unpack(
                    await self._reader.readexactly(_SIMPLE_REPLY.size)
                )
                if magic != p.SIMPLE_REPLY_MAGIC:
                    raise NbdError(f"unexpected reply magic {magic:#x}")
                fut, read_len = self._pending.pop(cookie, (None, 0))
                if fut is None:
                    raise NbdError(f"reply for unknown cookie {cookie}")
                data = await self._reader.readexactly(read_len) if read_len and not error else b""
                if not fut.done():
                    if error:
                        fut.set_exception(NbdCommandError("request", error))
                    else:
                        fut.set_result(data)
        except (asyncio.IncompleteReadError, ConnectionError, NbdError, OSError) as e:
            self._fail_all(e if isinstance(e, NbdError) else NbdError(f"connection lost: {e}"))

    def _fail_all(self, exc: BaseException) -> None:
        self._broken = exc
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _request(
        self, cmd: int, offset: int, length: int, data: bytes = b"", *, flags: int = 0
    ) -> bytes:
        if self._broken is not None:
            raise NbdError(f"connection unusable: {self._broken}")
        cookie = next(self._cookies)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[cookie] = (fut, length if cmd == p.CMD_READ else 0)
        self._writer.write(
            _REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data
        )
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            self._fail_all(NbdError(f"connection lost: {e}"))
        return await fut

    async def read(self, offset: int, length: int) -> bytes:
        return await self._request(p.CMD_READ, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self._request(p.CMD_WRITE, offset, len(data), data, flags=_CMD_FLAG_FUA if fua else 0)

    async def flush(self) -> None:
        await self._request(p.CMD_FLUSH, 0, 0)

    async def close(self) -> None:
        """NBD_CMD_DISC when the connection still works, then close the socket."""
        if self._broken is None:
            try:
                self._writer.write(_REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
                await asyncio.wait_for(self._writer.drain(), 5)
            except (ConnectionError, OSError, TimeoutError):
                pass
        self._fail_all(NbdError("closed"))
        if self._receiver is not None:
            self._receiver.cancel()
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 5)
        except (ConnectionError, OSError, TimeoutError):
            pass
