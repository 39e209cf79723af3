"""Where NBD is served and how a client is told: the URI forms, TLS-first negotiation, and a
WRITE whose payload stops arriving."""

from __future__ import annotations

import asyncio
import struct

from membership.records import NodeRecord
from pxcluster.nbd import ExportRegistry, MemoryExport, NbdServer
from pxcluster.nbd import protocol as p
from pxcluster.nbd.handshake import Negotiation, Next
from pxcluster.service.core import nbd_uri


def node(address: str, **kw: str) -> NodeRecord:
    return NodeRecord(
        id="a1", name="n1", address=address, data_port=9002, nbd_port=10809, api_port=9001, **kw
    )


def test_the_uri_names_what_works_on_the_host() -> None:
    assert nbd_uri(node("127.0.10.1"), "db") == "nbd://127.0.10.1:10809/db"
    # A node on a network address serves NBD on loopback and its unix socket only.
    n = node("10.0.0.11", nbd_address="127.0.0.1", data_dir="/var/lib/pxc")
    assert nbd_uri(n, "db") == "nbd+unix:///db?socket=/var/lib/pxc/nbd.sock"
    assert nbd_uri(node("10.0.0.11", nbd_address="127.0.0.1"), "db") == "nbd://127.0.0.1:10809/db"
    tls = node("10.0.0.11", nbd_address="10.0.0.11", nbd_tls_dir="/etc/pxc/nbd", data_dir="/d")
    assert nbd_uri(tls, "db") == "nbds://10.0.0.11:10809/db?tls-certificates=/etc/pxc/nbd"
    assert nbd_uri(node("::1"), "db") == "nbd://[::1]:10809/db"


def test_with_tls_required_nothing_but_starttls_is_answered() -> None:
    registry = ExportRegistry()
    registry.add(MemoryExport("vol", 1 << 20))
    n = Negotiation(registry, 32 << 20, tls_required=True)
    for option in (p.OPT_LIST, p.OPT_GO, p.OPT_INFO, p.OPT_STRUCTURED_REPLY):
        out = n.option(option, b"")
        assert out.next is Next.CONTINUE
        assert struct.unpack_from(">QII", out.send[0])[2] == p.REP_ERR_TLS_REQD
        assert b"vol" not in b"".join(out.send)
    assert n.option(p.OPT_EXPORT_NAME, b"vol").next is Next.CLOSE
    assert n.option(p.OPT_STARTTLS, b"").next is Next.STARTTLS
    n.tls_started()
    go = struct.pack(">I", 3) + b"vol" + struct.pack(">H", 0)
    assert n.option(p.OPT_GO, go).next is Next.TRANSMIT
    # Without TLS configured, STARTTLS is simply not supported.
    plain = Negotiation(registry, 32 << 20)
    out = plain.option(p.OPT_STARTTLS, b"")
    assert struct.unpack_from(">QII", out.send[0])[2] == p.REP_ERR_UNSUP


async def test_a_write_whose_payload_stops_arriving_closes_its_connection() -> None:
    registry = ExportRegistry()
    registry.add(MemoryExport("vol", 1 << 20))
    server = NbdServer(registry, stall_timeout=0.3, max_receiving=1 << 20)
    port = await server.start_tcp("127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readexactly(18)
        go = struct.pack(">I", 3) + b"vol" + struct.pack(">H", 0)
        w.write(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        w.write(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, len(go)) + go)
        while True:
            _m, _o, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
            await r.readexactly(length)
            if rtype == p.REP_ACK:
                break
        w.write(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 1 << 20) + b"x")
        await w.drain()
        assert await asyncio.wait_for(r.read(), 10) == b""  # dropped after the stall
        assert server.receiving == 0  # and its budget given back
        w.close()
    finally:
        await server.close()
