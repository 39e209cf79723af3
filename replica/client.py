"""ReplicaClient: the ReplicaAPI of a remote replica, over replica/protocol.py.

One connection per peer, opened lazily and re-opened on the next call after it is lost; each
new connection first proves the cluster key to the server and checks the server's proof
(replica/auth.py), so no call ever reaches a stranger or comes from one. Many
calls are in flight at once (matched by id); requests made in the same loop iteration leave in
one transport write, and the small writes of one volume among them in one frame ("writes": one
header to encode and decode and one reply for up to 64 writes; durable ones share one sync on
the replica). Every call is bounded by ``timeout``: a call without a reply in time fails
with ReplicaUnavailable and the connection is dropped (a peer that stopped answering may be a
black hole; a fresh connection is the only way to tell), which fails every other call on it too.
Remote typed errors are raised here as the same types.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import TYPE_CHECKING

from replica import auth
from replica.api import ChunkCopy, Generation, ReplicaStats, SnapshotInfo, VolumeInfo
from replica.errors import AuthFailed, ProtocolError, ReplicaUnavailable, error_from_code
from replica.protocol import (
    MAX_FRAME,
    WRITES_MAX_BYTES,
    WRITES_MAX_ITEMS,
    FramedProtocol,
    Header,
    RxBuffer,
    encode_frame_parts,
)

Reply = tuple[Header, bytes]

_BATCH_ITEM_MAX = 64 << 10  # larger writes go in frames of their own: a batch would gain nothing


class _WriteBatch:
    """Small writes of one volume, epoch and durability made in one loop iteration: they leave
    as one frame (one header to encode and decode, one reply) and share its reply."""

    __slots__ = ("durable", "epoch", "fut", "items", "nbytes", "parts", "rid", "volume")

    def __init__(
        self, volume: str, epoch: int, durable: bool, rid: int, fut: asyncio.Future[Reply]
    ) -> None:
        self.volume = volume
        self.epoch = epoch
        self.durable = durable
        self.rid = rid
        self.fut = fut
        self.items: list[list[int]] = []
        self.parts: list[memoryview] = []
        self.nbytes = 0

    def takes(self, volume: str, epoch: int, durable: bool, length: int) -> bool:
        return (
            volume == self.volume
            and epoch == self.epoch
            and durable == self.durable
            and len(self.items) < WRITES_MAX_ITEMS
            and self.nbytes + length <= WRITES_MAX_BYTES
        )

    def frame(self) -> list[bytes | memoryview]:
        if len(self.items) == 1:  # a lone write goes as the plain "write" it is
            chunk, offset, _, seq = self.items[0]
            header = _write_header(self.volume, self.epoch, chunk, offset, seq, self.durable)
            header["id"] = self.rid
        else:
            header = {
                "op": "writes",
                "id": self.rid,
                "volume": self.volume,
                "epoch": self.epoch,
                "items": self.items,
                "durable": self.durable,
            }
        return encode_frame_parts(header, self.parts)


class _ClientConnection(FramedProtocol):
    def __init__(self, where: str, key: bytes) -> None:
        super().__init__()
        self.where = where
        # Done once the server has taken our proof of the cluster key and proved its own
        # (replica/auth.py); no call is sent before.
        self._key = key
        self._nonce = auth.new_nonce()
        self._server_nonce = b""
        self.authenticated: asyncio.Future[None] = self.loop.create_future()
        self.max_frame = auth.PREAUTH_MAX_FRAME
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.batch: _WriteBatch | None = None  # still open: leaves at the next send or flush
        # The server said (in an "open" reply on this connection) it takes "writes" frames; a
        # server from before them would refuse one, and a refused write degrades the replica.
        self.batches = False

    def send_frame(self, header: Header, payload: bytes | memoryview | None = None) -> None:
        self.close_batch()  # frames leave in call order
        super().send_frame(header, payload)

    def _flush_out(self) -> None:
        self.close_batch()
        super()._flush_out()

    def open_batch(self, batch: _WriteBatch) -> None:
        self.close_batch()
        self.batch = batch
        if not self._out_scheduled:
            self._out_scheduled = True
            self.loop.call_soon(self._flush_out)

    def close_batch(self) -> None:
        batch, self.batch = self.batch, None
        if batch is not None and not self.closed:
            self._out.extend(batch.frame())

    def _handshake(self, header: Header) -> None:
        if not self._server_nonce:
            nonce = header.get("nonce")
            if header.get("op") != "challenge" or not auth.valid_nonce(nonce):
                self.fail(f"{self.where} did not open with an authentication challenge")
                return
            assert isinstance(nonce, bytes)
            self._server_nonce = nonce
            mac = auth.client_mac(self._key, nonce, self._nonce)
            super().send_frame({"id": 0, "op": "auth", "nonce": self._nonce, "mac": mac})
            return
        expected = auth.server_mac(self._key, self._server_nonce, self._nonce)
        if header.get("ok") is not True or not auth.verify(expected, header.get("mac")):
            self.fail(f"{self.where}: authentication failed (is it in this cluster?)", AuthFailed)
            return
        self.max_frame = MAX_FRAME
        if not self.authenticated.done():
            self.authenticated.set_result(None)

    def frame_received(self, header: Header, payload: memoryview, rx: RxBuffer) -> None:
        if not self.authenticated.done():
            self._handshake(header)
            return
        rid = header.get("id")
        fut = self.pending.pop(rid, None) if type(rid) is int else None
        if fut is None:
            if rid == 0 and header.get("ok") is False:
                # The server could not read one of our frames: we cannot tell which call it
                # was, so none of them can be trusted to be answered.
                self.fail(f"server rejected a frame: {header.get('msg')}")
            return  # a reply to a call that already timed out
        if not fut.done():
            # Callers get bytes they own; the receive buffer is reused.
            fut.set_result((header, bytes(payload) if len(payload) else b""))

    def bad_frame(self, reason: str) -> None:
        self.fail(f"bad reply frame: {reason}")

    def framing_error(self, reason: str) -> None:
        self.fail(f"broken reply stream: {reason}")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fail_pending(f"connection to {self.where} lost" + (f": {exc}" if exc else ""))

    def fail(self, reason: str, error: type[ReplicaUnavailable] = ReplicaUnavailable) -> None:
        """Drop the connection and fail every call waiting on it."""
        self._fail_pending(reason, error)
        self.reset()

    def _fail_pending(
        self, reason: str, error: type[ReplicaUnavailable] = ReplicaUnavailable
    ) -> None:
        if not self.authenticated.done():
            self.authenticated.set_exception(error(reason))
            self.authenticated.exception()  # retrieved: the connect may have given up already
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error(reason))


class ReplicaClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        tls: ssl.SSLContext | None = None,
        key: bytes,
    ) -> None:
        self.host = host
        self.port = port
        self.key = key  # the cluster key: proved to the server before any call
        self.tls = tls  # replica.tls.client_context: present our cert, verify the server's
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._where = f"replica {host}:{port}"
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Future[_ClientConnection] | None = None
        self._next_id = 1
        # (deadline, id, future, connection), in call order; the timeout is the same for every
        # call, so the oldest deadline is always at the front.
        self._deadlines: deque[tuple[float, int, asyncio.Future[Reply], _ClientConnection]] = (
            deque()
        )
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._tick = max(0.01, min(0.5, timeout / 10))

    # -- connection ------------------------------------------------------------------------
    async def _connect(self) -> _ClientConnection:
        # Callers that arrive while a connect is under way share it: queueing each behind the
        # last one's connect_timeout would let the n-th caller wait n times as long.
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = asyncio.ensure_future(self._open_connection())
            attempt.add_done_callback(self._connect_done)
        return await asyncio.shield(attempt)

    def _connect_done(self, attempt: asyncio.Future[_ClientConnection]) -> None:
        self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here: every waiter may have given up meanwhile

    async def _open_connection(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, c = await loop.create_connection(
                    lambda: _ClientConnection(self._where, self.key),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
                try:
                    await asyncio.shield(c.authenticated)
                except BaseException:
                    c.fail(f"{self._where}: authentication did not complete")
                    raise
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            raise ReplicaUnavailable(f"{self._where}: cannot connect: {e!r}") from None
        self._conn = c
        return c

    def _sweep(self) -> None:
        self._sweep_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        dq = self._deadlines
        while dq:
            deadline, rid, fut, conn = dq[0]
            if fut.done():
                dq.popleft()
                continue
            if deadline > now:
                break
            dq.popleft()
            conn.pending.pop(rid, None)
            fut.set_exception(ReplicaUnavailable(f"{self._where}: no reply in {self.timeout}s"))
            conn.fail(f"{self._where}: a call timed out")
        if dq:
            self._sweep_handle = loop.call_later(self._tick, self._sweep)

    async def _call(self, header: Header, payload: bytes | memoryview | None = None) -> Reply:
        c = self._conn
        if c is None or c.closed:
            c = await self._connect()
        if c.write_paused:
            try:
                # wait_for, not asyncio.timeout: callers may step this call outside any task
                # (replica/inline.py) until it first suspends.
                await asyncio.wait_for(c.drain(), self.timeout)
            except TimeoutError:
                c.fail(f"{self._where}: send blocked for {self.timeout}s")
                raise ReplicaUnavailable(f"{self._where}: send blocked") from None
            if c.closed:
                raise ReplicaUnavailable(f"{self._where}: connection lost")
        reply, data = await self._send(c, header, payload)
        _raise_for(reply)
        return reply, data

    def _send(
        self, c: _ClientConnection, header: Header, payload: bytes | memoryview | None
    ) -> asyncio.Future[Reply]:
        """Send one call's frame now; the future of its reply, bounded by the timeout."""
        rid, fut = self._register(c)
        header["id"] = rid
        c.send_frame(header, payload)
        return fut

    def _register(self, c: _ClientConnection) -> tuple[int, asyncio.Future[Reply]]:
        """A new call's id and the future of its reply, failed if none comes in time."""
        loop = c.loop
        rid = self._next_id
        self._next_id = rid + 1
        fut: asyncio.Future[Reply] = loop.create_future()
        c.pending[rid] = fut
        self._deadlines.append((loop.time() + self.timeout, rid, fut, c))
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_later(self._tick, self._sweep)
        return rid, fut

    # -- a write without a coroutine (the engine's fast path: write_begin, engine/fastpath.py) --
    def ready_to_send(self) -> bool:
        """A frame can leave now: connected, and the transport takes more."""
        c = self._conn
        return c is not None and not c.closed and not c.write_paused

    def write_nowait(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: memoryview,
        *,
        seq: int,
        durable: bool = False,
    ) -> asyncio.Future[Reply]:
        """`write` on a client `ready_to_send`: the frame leaves at the end of this loop
        iteration, with the other writes of the volume and durability made in it (one
        "writes" frame, one reply: they share the future, and so its outcome). Once the
        future is done, `write_outcome` says how the write went."""
        c = self._conn
        assert c is not None
        if not c.batches:
            return self._send(c, _write_header(volume, epoch, chunk, offset, seq, durable), data)
        return self._batched(c, volume, epoch, chunk, offset, memoryview(data), seq, durable)

    def _batched(
        self,
        c: _ClientConnection,
        volume: str,
        epoch: int,
        chunk: int,
        offset: int,
        data: memoryview,
        seq: int,
        durable: bool,
    ) -> asyncio.Future[Reply]:
        """Add a write to the connection's open batch (or open one): the future of its reply."""
        batch = c.batch
        if batch is None or not batch.takes(volume, epoch, durable, len(data)):
            rid, fut = self._register(c)
            batch = _WriteBatch(volume, epoch, durable, rid, fut)
            c.open_batch(batch)
        batch.items.append([chunk, offset, len(data), seq])
        batch.parts.append(data)
        batch.nbytes += len(data)
        return batch.fut

    @staticmethod
    def write_outcome(fut: asyncio.Future[Reply]) -> None:
        """Raise what `write` would have raised for this reply (the same typed errors)."""
        reply, _ = fut.result()
        _raise_for(reply)

    # -- ReplicaAPI ------------------------------------------------------------------------
    async def open(
        self, volume: str, epoch: int, size: int, chunk_size: int, *, sync_writes: bool = False
    ) -> VolumeInfo:
        r, _ = await self._call(
            {
                "op": "open",
                "volume": volume,
                "epoch": epoch,
                "size": size,
                "chunk_size": chunk_size,
                "sync_writes": sync_writes,
            }
        )
        if r.get("writes") is True and self._conn is not None:
            self._conn.batches = True
        try:
            return VolumeInfo(
                volume=volume,
                size=r["size"],
                chunk_size=r["chunk_size"],
                epoch=r["epoch"],
                dirty=list(r["dirty"]),
                unclean=r["unclean"],
            )
        except KeyError as e:
            raise ProtocolError(f"open reply lacks {e}") from None

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
        c = self._conn
        if (
            c is not None
            and c.batches
            and not c.closed
            and not c.write_paused
            and len(data) <= _BATCH_ITEM_MAX
        ):
            # With the other small writes of this loop iteration: durable ones then share one
            # sync on the replica. Shielded: the future is theirs too.
            fut = self._batched(c, volume, epoch, chunk, offset, memoryview(data), seq, durable)
            reply, _ = await asyncio.shield(fut)
            _raise_for(reply)
            return
        await self._call(_write_header(volume, epoch, chunk, offset, seq, durable), data)

    async def read(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, snapshot: str = ""
    ) -> bytes:
        header = {
            "op": "read",
            "volume": volume,
            "epoch": epoch,
            "chunk": chunk,
            "offset": offset,
            "length": length,
        }
        if snapshot:
            header["snapshot"] = snapshot
        _, data = await self._call(header)
        return data

    async def trim(
        self, volume: str, epoch: int, chunk: int, offset: int, length: int, *, seq: int
    ) -> None:
        await self._call(
            {
                "op": "trim",
                "volume": volume,
                "epoch": epoch,
                "chunk": chunk,
                "offset": offset,
                "length": length,
                "seq": seq,
            }
        )

    async def flush(self, volume: str, epoch: int) -> None:
        await self._call({"op": "flush", "volume": volume, "epoch": epoch})

    async def generations(
        self, volume: str, epoch: int, *, layer: str = ""
    ) -> dict[int, Generation]:
        header: Header = {"op": "generations", "volume": volume, "epoch": epoch}
        if layer:
            header["layer"] = layer
        r, _ = await self._call(header)
        return _gens(r)

    async def snapshot_generations(self, volume: str, snap_id: str) -> dict[int, Generation]:
        r, _ = await self._call(
            {"op": "snapshot_generations", "volume": volume, "snap_id": snap_id}
        )
        return _gens(r)

    async def snapshots(self, volume: str) -> list[SnapshotInfo]:
        r, _ = await self._call({"op": "snapshots", "volume": volume})
        return [SnapshotInfo(i, n, t) for i, n, t in r.get("snaps", [])]

    async def snapshot_create(
        self, volume: str, epoch: int, snap_id: str, name: str, created: float
    ) -> None:
        await self._call(
            {
                "op": "snapshot_create",
                "volume": volume,
                "epoch": epoch,
                "snap_id": snap_id,
                "name": name,
                "created": float(created),
            }
        )

    async def snapshot_delete(self, volume: str, epoch: int, snap_id: str) -> None:
        await self._call(
            {"op": "snapshot_delete", "volume": volume, "epoch": epoch, "snap_id": snap_id}
        )

    async def revert(self, volume: str, epoch: int, snap_id: str) -> None:
        await self._call({"op": "revert", "volume": volume, "epoch": epoch, "snap_id": snap_id})

    async def mark_clean(self, volume: str, epoch: int, chunks: list[int]) -> None:
        await self._call(
            {"op": "mark_clean", "volume": volume, "epoch": epoch, "chunks": list(chunks)}
        )

    async def read_chunk(
        self, volume: str, epoch: int, chunk: int, *, layer: str = ""
    ) -> ChunkCopy:
        header: Header = {"op": "read_chunk", "volume": volume, "epoch": epoch, "chunk": chunk}
        if layer:
            header["layer"] = layer
        r, data = await self._call(header)
        e, q = r["gen"]
        return ChunkCopy(data if r["present"] else None, (e, q), r.get("mask"))

    async def write_chunk(
        self,
        volume: str,
        epoch: int,
        chunk: int,
        data: bytes | memoryview | None,
        generation: Generation,
        *,
        present: bytes | None = None,
        layer: str = "",
    ) -> None:
        header: Header = {
            "op": "write_chunk",
            "volume": volume,
            "epoch": epoch,
            "chunk": chunk,
            "present": data is not None,
            "gen": list(generation),
        }
        if present is not None:
            header["mask"] = present
        if layer:
            header["layer"] = layer
        await self._call(header, data)

    async def chunk_digest(self, volume: str, epoch: int, chunk: int, *, layer: str = "") -> bytes:
        header: Header = {"op": "chunk_digest", "volume": volume, "epoch": epoch, "chunk": chunk}
        if layer:
            header["layer"] = layer
        r, _ = await self._call(header)
        return bytes(r["digest"])

    async def delete(self, volume: str, epoch: int) -> None:
        await self._call({"op": "delete", "volume": volume, "epoch": epoch})

    async def stats(self) -> ReplicaStats:
        r, _ = await self._call({"op": "stats"})
        return ReplicaStats(
            capacity=r["capacity"], used=r["used"], free=r["free"], volumes=r["volumes"]
        )

    async def ping(self) -> None:
        await self._call({"op": "ping"})

    async def close(self) -> None:
        c, self._conn = self._conn, None
        if c is not None:
            c.fail(f"{self._where}: client closed")
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        self._deadlines.clear()


if TYPE_CHECKING:
    from replica.api import RemoteFastPath, ReplicaAPI

    # mypy proves the client satisfies the interface, and its fast path
    _api: ReplicaAPI = ReplicaClient("", 0, key=b"")
    _fast: RemoteFastPath = ReplicaClient("", 0, key=b"")


def _gens(reply: Header) -> dict[int, Generation]:
    flat: list[int] = reply.get("gens", [])
    return {flat[i]: (flat[i + 1], flat[i + 2]) for i in range(0, len(flat) - 2, 3)}


def _write_header(
    volume: str, epoch: int, chunk: int, offset: int, seq: int, durable: bool
) -> Header:
    return {
        "op": "write",
        "volume": volume,
        "epoch": epoch,
        "chunk": chunk,
        "offset": offset,
        "seq": seq,
        "durable": durable,
    }


def _raise_for(reply: Header) -> None:
    if not reply.get("ok"):
        raise error_from_code(str(reply.get("code")), str(reply.get("msg")))
