"""The replica server: serves a ReplicaAPI (normally a ReplicaService) over replica/protocol.py.

Each connection is pipelined: every request runs as its own task, replies go out as they
complete (matched by id, in any order) and are gathered into one write per loop iteration.
Requests in flight per connection are bounded (``MAX_INFLIGHT`` requests, ``MAX_HELD`` payload
bytes): above either the connection stops reading, as it does while the client is not reading
its replies, so a fast client cannot grow the server's memory without bound.

A request's first step runs inline, before any task exists (see ``_Connection._start``): the
served ReplicaAPI must not need ``asyncio.current_task()`` (e.g. ``asyncio.timeout``) before its
first real suspension.

Before any request, a client proves it holds the cluster key and the server proves it back
(replica/auth.py); until then the connection takes one small frame, for a few seconds.

Run standalone (tests, benchmarks): ``python -m replica.server --disk PATH ... --cluster-id X
--node-id N --key-file F [--host H] [--port P] [--format]``; prints ``READY <port>`` once
listening.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from replica import auth, inline
from replica.api import LocalFastPath, ReplicaAPI
from replica.errors import AuthFailed, ProtocolError, ReplicaError, StaleEpoch
from replica.protocol import MAX_FRAME, FramedProtocol, Header, RxBuffer, check_request
from replica.tls import HANDSHAKE_TIMEOUT, TlsConfigError, TlsFiles, server_context

log = logging.getLogger(__name__)

MAX_INFLIGHT = 128
RESUME_INFLIGHT = 64
# Payload bytes held by requests in flight: 128 whole-chunk writes of a large chunk size would
# otherwise pin gigabytes of receive buffers.
MAX_HELD = 64 << 20

Result = tuple[Header | None, bytes | memoryview | None]
Handler = Callable[[ReplicaAPI, Header, memoryview], Awaitable[Result]]


async def _open(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    # The service may ask etcd first (its epoch guard, which needs a task): leave the inline
    # first step at once. Opens are rare; the fast paths are writes and reads.
    await asyncio.sleep(0)
    info = await s.open(
        h["volume"], h["epoch"], h["size"], h["chunk_size"], sync_writes=h["sync_writes"]
    )
    return {
        "size": info.size,
        "chunk_size": info.chunk_size,
        "epoch": info.epoch,
        "dirty": info.dirty,
        "unclean": info.unclean,
        "writes": True,  # takes "writes" frames: a client of an older server sends none
    }, None


async def _write(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await s.write(
        h["volume"], h["epoch"], h["chunk"], h["offset"], p, seq=h["seq"], durable=h["durable"]
    )
    return None, None


async def _writes(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    volume, epoch, items = h["volume"], h["epoch"], h["items"]
    if sum(it[2] for it in items) != len(p):
        raise ProtocolError("writes: item lengths do not add up to the payload")
    durable = h.get("durable") is True
    # The in-process service applies most writes at once (no coroutine when none waits).
    write_now = s.write_now if isinstance(s, LocalFastPath) else None
    pos = 0
    for chunk, offset, length, seq in items:
        with p[pos : pos + length] as data:
            if write_now is None or not write_now(
                volume, epoch, chunk, offset, data, seq=seq, flushed_after=durable
            ):
                await s.write(volume, epoch, chunk, offset, data, seq=seq, durable=False)
        pos += length
    if durable:  # one sync for the frame: each write durable before the one reply
        await s.flush(volume, epoch)
    return None, None


async def _read(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    snapshot = h.get("snapshot") or ""
    return None, await s.read(
        h["volume"], h["epoch"], h["chunk"], h["offset"], h["length"], snapshot=snapshot
    )


async def _trim(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await s.trim(h["volume"], h["epoch"], h["chunk"], h["offset"], h["length"], seq=h["seq"])
    return None, None


async def _flush(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await s.flush(h["volume"], h["epoch"])
    return None, None


def _flat(gens: dict[int, tuple[int, int]]) -> Result:
    flat: list[int] = []
    for c, (e, q) in gens.items():
        flat += (c, e, q)
    return {"gens": flat}, None


async def _generations(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    return _flat(await s.generations(h["volume"], h["epoch"], layer=h.get("layer") or ""))


async def _snapshot_generations(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    return _flat(await s.snapshot_generations(h["volume"], h["snap_id"]))


async def _snapshots(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    snaps = await s.snapshots(h["volume"])
    return {"snaps": [[x.id, x.name, x.created] for x in snaps]}, None


async def _snapshot_create(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await s.snapshot_create(h["volume"], h["epoch"], h["snap_id"], h["name"], h["created"])
    return None, None


async def _snapshot_delete(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await s.snapshot_delete(h["volume"], h["epoch"], h["snap_id"])
    return None, None


async def _chunk_digest(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    digest = await s.chunk_digest(h["volume"], h["epoch"], h["chunk"], layer=h.get("layer") or "")
    return {"digest": digest}, None


async def _revert(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await s.revert(h["volume"], h["epoch"], h["snap_id"])
    return None, None


async def _mark_clean(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await s.mark_clean(h["volume"], h["epoch"], h["chunks"])
    return None, None


async def _read_chunk(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    copy = await s.read_chunk(h["volume"], h["epoch"], h["chunk"], layer=h.get("layer") or "")
    reply = {"present": copy.data is not None, "gen": list(copy.gen), "mask": copy.present}
    return reply, copy.data


async def _write_chunk(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    e, q = h["gen"]
    # The payload stays valid until this request completes (RxBuffer refs), and the store is
    # done with it by then: no copy of a whole chunk.
    data = p if h["present"] else None
    await s.write_chunk(
        h["volume"],
        h["epoch"],
        h["chunk"],
        data,
        (e, q),
        present=h.get("mask"),
        layer=h.get("layer") or "",
    )
    return None, None


async def _delete(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    await asyncio.sleep(0)  # as _open: the epoch guard needs a task
    await s.delete(h["volume"], h["epoch"])
    return None, None


async def _stats(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    st = await s.stats()
    return {"capacity": st.capacity, "used": st.used, "free": st.free, "volumes": st.volumes}, None


async def _ping(s: ReplicaAPI, h: Header, p: memoryview) -> Result:
    return None, None


# Ops that change a volume: once the volume is opened anew on another connection, a connection
# that sent one may send no more for it (ReplicaServer.supersede).
MUTATIONS = frozenset(
    {
        "write",
        "writes",
        "trim",
        "write_chunk",
        "mark_clean",
        "snapshot_create",
        "snapshot_delete",
        "revert",
        "delete",
    }
)

HANDLERS: dict[str, Handler] = {
    "open": _open,
    "write": _write,
    "writes": _writes,
    "read": _read,
    "trim": _trim,
    "flush": _flush,
    "generations": _generations,
    "mark_clean": _mark_clean,
    "read_chunk": _read_chunk,
    "write_chunk": _write_chunk,
    "delete": _delete,
    "stats": _stats,
    "ping": _ping,
    "snapshot_generations": _snapshot_generations,
    "snapshots": _snapshots,
    "snapshot_create": _snapshot_create,
    "snapshot_delete": _snapshot_delete,
    "revert": _revert,
    "chunk_digest": _chunk_digest,
}


class _Connection(FramedProtocol):
    def __init__(self, server: ReplicaServer) -> None:
        super().__init__()
        self._server = server
        self._service = server.service
        self._inflight = 0
        self._held = 0
        self.wrote: set[str] = set()  # volumes this connection changed (see supersede)
        self.superseded: set[str] = set()  # volumes opened anew on another connection since
        # Until the client proves it holds the cluster key, only a small auth frame is read.
        self._nonce = auth.new_nonce()
        self._authenticated = False
        self.max_frame = auth.PREAUTH_MAX_FRAME
        self._auth_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._conns.add(self)
        self.send_frame({"id": 0, "op": "challenge", "v": auth.VERSION, "nonce": self._nonce})
        self._auth_timer = self.loop.call_later(auth.AUTH_TIMEOUT, self._refuse, "auth timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server._conns.discard(self)
        if self._auth_timer is not None:
            self._auth_timer.cancel()

    def _refuse(self, reason: str) -> None:
        if not self.closed:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.warning("replica connection from %s refused: %s", peer, reason)
            self.closed = True
            if self.transport is not None:
                self.transport.close()  # sends what is buffered (the refusal), then closes

    def _authenticate(self, header: Header) -> None:
        """The first frame must be the client's answer to our challenge; anything else ends
        the connection before a single request is looked at."""
        cnonce = header.get("nonce")
        if (
            header.get("op") != "auth"
            or not isinstance(cnonce, bytes)
            or not auth.valid_nonce(cnonce)
            or not auth.verify(
                auth.client_mac(self._server.key, self._nonce, cnonce), header.get("mac")
            )
        ):
            self.send_frame(
                {"id": 0, "ok": False, "code": AuthFailed.code, "msg": "authentication failed"}
            )
            self._flush_out()
            self._refuse("authentication failed")
            return
        self._authenticated = True
        self.max_frame = MAX_FRAME
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        mac = auth.server_mac(self._server.key, self._nonce, cnonce)
        self.send_frame({"id": 0, "ok": True, "code": "", "msg": "", "mac": mac})

    def bad_frame(self, reason: str) -> None:
        if not self._authenticated:
            self._refuse(f"bad frame before authentication: {reason}")
            return
        self.send_frame({"id": 0, "ok": False, "code": ProtocolError.code, "msg": reason})

    def framing_error(self, reason: str) -> None:
        if not self._authenticated:
            self._refuse(f"bad frame before authentication: {reason}")
            return
        super().framing_error(reason)

    def frame_received(self, header: Header, payload: memoryview, rx: RxBuffer) -> None:
        if not self._authenticated:
            self._authenticate(header)
            return
        try:
            rid, op = check_request(header)
        except ProtocolError as e:
            hid = header.get("id")
            self.send_frame(
                {"id": hid if type(hid) is int else 0, "ok": False, "code": e.code, "msg": str(e)}
            )
            return
        if op != "write" and op != "writes" and op != "write_chunk" and len(payload):
            self.send_frame(
                {
                    "id": rid,
                    "ok": False,
                    "code": ProtocolError.code,
                    "msg": f"{op} takes no payload",
                }
            )
            return
        if op in MUTATIONS:
            volume = header["volume"]
            if volume in self.superseded:
                msg = f"volume {volume!r} was opened anew on another connection"
                self.send_frame({"id": rid, "ok": False, "code": StaleEpoch.code, "msg": msg})
                return
            self.wrote.add(volume)
        held: RxBuffer | None = None
        if len(payload):
            rx.refs += 1  # the buffer must not be reused until this request is done with it
            held = rx
        self._inflight += 1
        self._held += len(payload)
        self._start(self._run(rid, HANDLERS[op], header, payload, held))
        if self._inflight >= MAX_INFLIGHT or self._held >= MAX_HELD:
            self.pause_parsing()

    def _may_resume(self) -> bool:
        return (
            self._inflight <= RESUME_INFLIGHT
            and self._held <= MAX_HELD // 2
            and not self.write_paused
        )

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request's first step right here, and make a task only if it has to wait.

        Most writes and reads never wait (a page-cache write to a ready chunk), so they cost
        no task and their reply leaves one loop iteration sooner. The coroutine must not need
        ``asyncio.current_task()`` before its first suspension.
        """
        try:
            first = coro.send(None)
        except StopIteration:
            return
        except Exception:
            log.exception("request failed outside its error handling")
            return
        task = self.loop.create_task(inline.carry_on(coro, first))
        self._server._tasks.add(task)
        task.add_done_callback(self._server._tasks.discard)

    async def _run(
        self, rid: int, handler: Handler, header: Header, payload: memoryview, rx: RxBuffer | None
    ) -> None:
        out: bytes | memoryview | None = None
        size = len(payload)
        try:
            result, out = await handler(self._service, header, payload)
            if handler is _open:
                self._server.supersede(self, header["volume"])
            reply: Header = {"id": rid, "ok": True, "code": "", "msg": ""}
            if result:
                reply.update(result)
        except ReplicaError as e:
            reply = {"id": rid, "ok": False, "code": e.code, "msg": str(e)}
        except Exception as e:
            log.exception("request %s failed", header.get("op"))
            reply = {
                "id": rid,
                "ok": False,
                "code": ReplicaError.code,
                "msg": f"{type(e).__name__}: {e}",
            }
        finally:
            if rx is not None:
                try:
                    # A store that kept the view past its call would see the buffer reused
                    # under it; releasing makes such a bug fail loudly instead.
                    payload.release()
                    rx.release()
                except BufferError:
                    log.warning(
                        "%s payload still in use after the request; not reusing it",
                        header.get("op"),
                    )
            self._inflight -= 1
            self._held -= size
            if self._may_resume():
                self.resume_parsing()
        try:
            self.send_frame(reply, out)
        except ProtocolError as e:  # a result too large for a frame: the caller must know
            self.send_frame({"id": rid, "ok": False, "code": e.code, "msg": str(e)})

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop taking requests until it does.
        super().pause_writing()
        self.pause_parsing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._may_resume():
            self.resume_parsing()


class ReplicaServer:
    def __init__(self, service: ReplicaAPI, key: bytes) -> None:
        self.service = service
        self.key = auth.check_key(key)  # the cluster key every client must prove it holds
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        """Listen; with `tls` (replica.tls.server_context), only clients with a certificate
        from the cluster's replica CA get through the handshake."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            reuse_address=True,
            backlog=128,
            ssl=tls,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls is not None else None,
        )

    def supersede(self, opener: _Connection, volume: str) -> None:
        """An engine opened `volume` on `opener`: any other connection that changed it is from
        an engine that is gone or a connection its client has dropped (one engine serves a
        volume, over one connection per replica). A change of it still on its way over one
        (retransmitted after a partition heals, say) must not land after the opener compared
        and copied the volume's chunks: such connections may no longer change it. They keep
        serving their other volumes (a node's engines share one connection per peer)."""
        for c in self._conns:
            if c is not opener and volume in c.wrote:
                c.wrote.discard(volume)
                c.superseded.add(volume)
                peer = c.transport.get_extra_info("peername") if c.transport else None
                log.warning("volume %s opened anew: %s may no longer change it", volume, peer)

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
        # Let requests already handed to the store finish: cancelling one half-way through a
        # store write would leave the store to sort out a torn request for no reason.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


async def _serve(args: argparse.Namespace) -> int:
    # Imported here so the wire code above does not depend on the store being importable.
    from replica.chunkstore import ChunkStore
    from replica.errors import NotFormatted
    from replica.fileio import OSFile
    from replica.service import ReplicaService

    files: list[OSFile] = []
    stores: list[ChunkStore] = []
    try:
        for path in args.disk:
            f = OSFile.open(path)
            files.append(f)
            if args.format:
                try:
                    ChunkStore.read_superblock(f)
                except NotFormatted:
                    ChunkStore.format(
                        f,
                        cluster_id=args.cluster_id,
                        node_id=args.node_id,
                        disk_id=uuid.uuid4().hex,
                    )
            stores.append(ChunkStore.open(f, cluster_id=args.cluster_id, boot_id=_boot_id()))
        server = ReplicaServer(ReplicaService(stores), auth.read_key_file(args.key_file))
        tls = TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
        await server.start(args.host, args.port, tls=server_context(tls) if tls else None)
        print(f"READY {server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.close()
        return 0
    except (ReplicaError, OSError, TlsConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        # A clean close marks the disks clean: the next start trusts their dirty logs.
        for st in stores:
            await st.close()
        for f in files:
            f.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replica.server", description=__doc__)
    p.add_argument("--disk", action="append", required=True, help="disk path (repeatable)")
    p.add_argument("--cluster-id", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    p.add_argument("--format", action="store_true", help="format disks that are not formatted")
    p.add_argument("--key-file", required=True, help="the cluster key (hex), as clients hold it")
    p.add_argument("--tls-cert", default="", help="TLS: this server's certificate")
    p.add_argument("--tls-key", default="", help="TLS: its key")
    p.add_argument("--tls-ca", default="", help="TLS: CA that signs client certificates")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import uvloop

    rc: int = uvloop.run(_serve(args))
    return rc


if __name__ == "__main__":
    sys.exit(main())
