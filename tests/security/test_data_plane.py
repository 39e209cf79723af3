"""The data plane attacked from outside, as someone on the storage network would: raw sockets
against the replica port and NBD of real node processes. After every attack the volume's data
reads back exactly, every replica is still in sync, and the node still serves."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pxcluster.nbd import protocol as p
from replica import auth
from replica.auth import PREAUTH_MAX_FRAME
from tests.harness.cluster import Cluster
from tests.harness.replica_proc import raw_connect
from tests.harness.tls import TestCA

pytestmark = pytest.mark.timeout(300)

DATA = 8 << 20


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    h = msgpack.packb(header)
    return struct.pack("!II", 4 + len(h) + len(payload), len(h)) + h + payload


async def read_frame(r: asyncio.StreamReader, timeout: float = 10) -> dict[str, Any]:
    total, hlen = struct.unpack("!II", await asyncio.wait_for(r.readexactly(8), timeout))
    body = await asyncio.wait_for(r.readexactly(total - 4), timeout)
    return dict(msgpack.unpackb(body[:hlen]))


async def dropped(r: asyncio.StreamReader, timeout: float = 10) -> bool:
    """The server closed the connection (EOF, or a reset: it had unread data from us)."""
    try:
        return await asyncio.wait_for(r.read(), timeout) == b""
    except ConnectionResetError:
        return True


def refused(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode != 0


def tool(*cmd: str, timeout: float = 60) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=timeout).stdout


@pytest.fixture
def two(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Cluster, str, bytes]]:
    """Two nodes, a 2-replica volume attached on n1 holding 8 MiB of random data."""
    c = cluster
    c.add_node("n1")
    c.add_node("n2")
    c.cli("volume", "create", "data", "--size", "64M", "--repl", "2")
    uri = c.attach("data", "n1")
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(DATA))
    tool("nbdcopy", str(src), uri)
    yield c, uri, hashlib.sha256(src.read_bytes()).digest()


def assert_intact(c: Cluster, uri: str, digest: bytes) -> None:
    out = tool("nbdcopy", uri, "-")
    assert hashlib.sha256(out[:DATA]).digest() == digest, "the volume's data changed"
    info = c.inspect("data")
    assert {r["state"] for r in info["replicas"]} == {"in_sync"}, info["replicas"]


async def test_frames_without_the_cluster_key_change_nothing(
    two: tuple[Cluster, str, bytes],
) -> None:
    c, uri, digest = two
    info = c.inspect("data")
    vid, epoch = info["id"], info["epoch"]
    attacks = [
        {"id": 1, "op": "delete", "volume": vid},
        {"id": 1, "op": "delete", "volume": vid, "epoch": epoch},
        {
            "id": 1,
            "op": "open",
            "volume": vid,
            "epoch": 2**40,
            "size": 1 << 20,
            "chunk_size": 4 << 20,
            "sync_writes": False,
        },
        {
            "id": 1,
            "op": "read",
            "volume": vid,
            "epoch": epoch,
            "chunk": 0,
            "offset": 0,
            "length": 4096,
        },
        {"id": 1, "op": "stats"},
    ]
    for n in c.nodes.values():
        for header in attacks:
            r, w = await asyncio.open_connection(n.address, n.ports["data"])
            challenge = await read_frame(r)
            assert challenge["op"] == "challenge"
            w.write(frame(header))
            reply = await read_frame(r)
            assert reply["ok"] is False and reply["code"] == "AUTH", reply
            assert await r.read() == b""  # and the connection is closed
            w.close()
        # A 2 MiB name (bricked a store's metadata once) is cut off at its length prefix.
        r, w = await asyncio.open_connection(n.address, n.ports["data"])
        await read_frame(r)
        w.write(
            frame(
                {
                    "id": 1,
                    "op": "open",
                    "volume": "x" * (2 << 20),
                    "epoch": 1,
                    "size": 1 << 20,
                    "chunk_size": 4 << 20,
                    "sync_writes": False,
                }
            )
        )
        assert await dropped(r)
        w.close()
    assert c.inspect("data")["epoch"] == epoch
    assert_intact(c, uri, digest)
    # The stores still open: a node killed now comes back with its data.
    c.kill("n2")
    c.start("n2")
    c.wait_for(
        lambda: {r["state"] for r in c.inspect("data")["replicas"]} == {"in_sync"},
        60,
        "n2's replica in sync again",
    )
    assert_intact(c, uri, digest)


async def test_a_wrong_key_a_silent_client_and_a_huge_first_frame_are_cut_off(
    two: tuple[Cluster, str, bytes],
) -> None:
    c, uri, digest = two
    n = c.nodes["n2"]
    with pytest.raises(AssertionError):  # the server refuses our proof
        await raw_connect(n.address, n.ports["data"], key=b"\x01" * 32)
    # Silence after the challenge: dropped once AUTH_TIMEOUT has passed.
    r, w = await asyncio.open_connection(n.address, n.ports["data"])
    await read_frame(r)
    assert await dropped(r, auth.AUTH_TIMEOUT + 10)
    w.close()
    # A first frame larger than an auth frame can be: dropped at its length prefix, before
    # a byte of it is buffered (it used to pin 80 MiB per connection).
    r, w = await asyncio.open_connection(n.address, n.ports["data"])
    await read_frame(r)
    w.write(struct.pack("!II", 80 << 20, 16) + b"\x00" * 1024)
    assert await dropped(r)
    w.close()
    assert PREAUTH_MAX_FRAME < 4096
    assert_intact(c, uri, digest)


async def test_a_member_can_neither_forge_an_epoch_nor_erase_nor_overflow_a_store(
    two: tuple[Cluster, str, bytes],
) -> None:
    c, uri, digest = two
    info = c.inspect("data")
    vid, epoch = info["id"], info["epoch"]
    key = c.replica_key()
    for n in c.nodes.values():
        r, w = await raw_connect(n.address, n.ports["data"], key=key)
        w.write(
            frame(
                {
                    "id": 2,
                    "op": "open",
                    "volume": vid,
                    "epoch": 2**40,
                    "size": 64 << 20,
                    "chunk_size": 4 << 20,
                    "sync_writes": False,
                }
            )
        )
        reply = await read_frame(r)
        assert reply["code"] == "UNJUSTIFIED_EPOCH", reply
        w.write(frame({"id": 3, "op": "delete", "volume": vid, "epoch": epoch - 1}))
        reply = await read_frame(r)
        assert reply["code"] == "STALE_EPOCH", reply
        w.write(
            frame(
                {
                    "id": 4,
                    "op": "open",
                    "volume": "y" * (2 << 20),
                    "epoch": 1,
                    "size": 1 << 20,
                    "chunk_size": 4 << 20,
                    "sync_writes": False,
                }
            )
        )
        reply = await read_frame(r)
        assert reply["code"] == "PROTOCOL", reply
        # A volume the cluster never created cannot be made on a replica either.
        w.write(
            frame(
                {
                    "id": 5,
                    "op": "open",
                    "volume": "z" * 64,
                    "epoch": 0,
                    "size": 1 << 20,
                    "chunk_size": 4 << 20,
                    "sync_writes": False,
                }
            )
        )
        reply = await read_frame(r)
        assert reply["code"] == "UNJUSTIFIED_EPOCH", reply
        w.close()
    assert c.inspect("data")["epoch"] == epoch
    assert_intact(c, uri, digest)
    # The engine was not fenced: it still takes writes.
    tool("qemu-io", "-f", "raw", "-c", f"write -P 0x5a {DATA} 64k", uri)
    out = tool("qemu-io", "-f", "raw", "-c", f"read -P 0x5a {DATA} 64k", uri)
    assert b"verification failed" not in out.lower()


def _random_value(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randrange(-(2**63), 2**64)
    if kind == 1:
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 2:
        return "".join(rng.choice("abcdefghij-_.\u00e9") for _ in range(rng.randrange(0, 90)))
    if kind == 3:
        return [rng.randrange(0, 1 << 20) for _ in range(rng.randrange(0, 8))]
    if kind == 4:
        return rng.random() * 10 ** rng.randrange(0, 300)
    if kind == 5:
        return None
    if kind == 6:
        return rng.choice([True, False])
    return {"k": rng.randrange(100)}


_FIELDS = [
    "volume",
    "epoch",
    "size",
    "chunk_size",
    "sync_writes",
    "chunk",
    "offset",
    "length",
    "seq",
    "durable",
    "items",
    "chunks",
    "present",
    "gen",
    "mask",
    "layer",
    "snap_id",
    "name",
    "created",
    "snapshot",
]


def _fuzz_header(rng: random.Random, avoid: str) -> dict[str, Any]:
    from replica.protocol import OPS

    op = rng.choice([*OPS, "bogus", ""])
    header: dict[str, Any] = {"id": rng.randrange(0, 2**32), "op": op}
    for f in rng.sample(_FIELDS, rng.randrange(0, 8)):
        header[f] = _random_value(rng)
    if header.get("volume") == avoid:  # random strings never hit it; be certain
        header["volume"] = "not-" + avoid
    return header


async def test_fuzzed_replica_frames_with_and_without_the_key(
    two: tuple[Cluster, str, bytes],
) -> None:
    c, uri, digest = two
    vid = c.inspect("data")["id"]
    rng = random.Random(2126)
    n = c.nodes["n2"]
    # Without the key: random frames and random bytes, each on a fresh connection.
    for i in range(300):
        r, w = await asyncio.open_connection(n.address, n.ports["data"])
        await read_frame(r)
        if i % 2:
            w.write(frame(_fuzz_header(rng, vid), rng.randbytes(rng.randrange(0, 300))))
        else:
            w.write(rng.randbytes(rng.randrange(1, 600)))
        try:
            rest = await asyncio.wait_for(r.read(), auth.AUTH_TIMEOUT + 10)
        except ConnectionError:
            rest = b""
        assert b'"ok": true' not in rest and b"\xa2ok\xc3" not in rest  # never accepted
        w.close()
    # With the key: 2,000 random headers on one connection, answered or refused one by one.
    r, w = await raw_connect(n.address, n.ports["data"], key=c.replica_key())
    answered = 0
    for _ in range(2000):
        header = _fuzz_header(rng, vid)
        payload = rng.randbytes(rng.randrange(0, 64)) if rng.random() < 0.3 else b""
        w.write(frame(header, payload))
        if rng.random() < 0.1:
            await w.drain()
    w.write(frame({"id": 99, "op": "ping"}))
    while True:
        reply = await read_frame(r, timeout=30)
        answered += 1
        if reply.get("id") == 99 and reply.get("ok") is True:
            break
    w.close()
    assert answered >= 1
    assert_intact(c, uri, digest)


def nbd_option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data


async def nbd_go(
    host: str, port: int, export: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection(host, port)
    await r.readexactly(18)
    name = export.encode()
    w.write(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    w.write(nbd_option(p.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)))
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
        await r.readexactly(length)
        assert not rtype & p.REP_FLAG_ERROR, rtype
        if rtype == p.REP_ACK:
            return r, w


async def test_fuzzed_nbd_handshakes_and_requests(
    two: tuple[Cluster, str, bytes], tmp_path: Path
) -> None:
    c, uri, digest = two
    c.cli("volume", "create", "scratch", "--size", "16M", "--repl", "2")
    c.attach("scratch", "n1")
    n = c.nodes["n1"]
    rng = random.Random(2127)
    for _ in range(500):
        r, w = await asyncio.open_connection(n.address, n.nbd_port)
        await r.readexactly(18)
        w.write(struct.pack(">I", rng.choice([0, 1, 3, rng.randrange(2**32)])))
        for _ in range(rng.randrange(1, 4)):
            option = rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, rng.randrange(2**32)])
            data = rng.randbytes(rng.randrange(0, 80))
            if rng.random() < 0.2:  # a length that lies about what follows
                w.write(struct.pack(">QII", p.IHAVEOPT, option, rng.randrange(2**32)) + data)
            else:
                w.write(nbd_option(option, data))
        w.write(rng.randbytes(rng.randrange(0, 40)))
        w.close()
    # Requests on the scratch volume: any command, flags, offsets and lengths (a WRITE's
    # payload sent only when it is small).
    r, w = await nbd_go(n.address, n.nbd_port, "scratch")
    for i in range(2000):
        cmd = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, rng.randrange(2**16)])
        length = rng.choice([0, 1, 512, 4096, 65536, rng.randrange(2**32)])
        offset = rng.choice([0, 4096, (16 << 20) - 4096, rng.randrange(2**64)])
        flags = rng.randrange(2**16)
        if cmd == p.CMD_DISC:
            continue
        if cmd == p.CMD_WRITE and length > 65536:
            length = 4096
        header = struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, i, offset, length)
        w.write(header + (rng.randbytes(length) if cmd == p.CMD_WRITE else b""))
        if i % 50 == 0:
            await w.drain()
    w.close()
    # A garbled request magic ends only that connection.
    r, w = await nbd_go(n.address, n.nbd_port, "scratch")
    w.write(rng.randbytes(28))
    assert await asyncio.wait_for(r.read(), 10) is not None
    w.close()
    assert_intact(c, uri, digest)
    tool("nbdinfo", "--size", c.inspect("scratch")["nbd_uri"])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


async def test_nbd_write_headers_without_their_payload_pin_bounded_memory(
    two: tuple[Cluster, str, bytes],
) -> None:
    c, uri, digest = two
    n = c.nodes["n1"]
    assert n.proc is not None
    before = rss(n.proc.pid)
    conns = []
    for i in range(8):  # 8 x 32 MiB announced, one byte sent: 256 MiB once pinned
        r, w = await nbd_go(n.address, n.nbd_port, "data")
        w.write(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, i, 0, 32 << 20) + b"x")
        await w.drain()
        conns.append((r, w))
    await asyncio.sleep(1.0)  # let the server take what it will (nothing to wait on)
    grown = rss(n.proc.pid) - before
    assert grown < 120 << 20, f"node grew by {grown >> 20} MiB"
    # Reads of other clients go on meanwhile (they need no receive budget).
    assert tool("nbdinfo", "--size", uri).strip() == str(64 << 20).encode()
    for _, w in conns:
        w.close()
    assert_intact(c, uri, digest)


def tls_dir(ca: TestCA, directory: Path, cn: str, ips: tuple[str, ...], server: bool) -> Path:
    """A certificate directory in libnbd's layout."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.path, directory / "ca-cert.pem")
    files = ca.issue(cn, ips=ips)
    role = "server" if server else "client"
    shutil.copy(files.cert, directory / f"{role}-cert.pem")
    shutil.copy(files.key, directory / f"{role}-key.pem")
    if server:  # root on the node's host uses the same directory as a client
        other = ca.issue(cn + "-local", ips=ips)
        shutil.copy(other.cert, directory / "client-cert.pem")
        shutil.copy(other.key, directory / "client-key.pem")
    return directory


async def test_nbd_with_tls_refuses_clients_without_a_certificate(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    ca = TestCA(tmp_path / "ca")
    c.add_node("n1")
    address = c.nodes["n1"].address
    certs = tls_dir(ca, tmp_path / "nbd-tls", "n1", (address,), server=True)
    c.nodes["n1"].extra += ["--nbd-expose", "--nbd-tls-dir", str(certs)]
    c.kill("n1")
    c.start("n1")
    c.cli("volume", "create", "sec", "--size", "16M")
    c.cli("volume", "attach", "sec", "--node", "n1", "--wait")
    uri = c.inspect("sec")["nbd_uri"]
    assert uri.startswith("nbds://") and f"tls-certificates={certs}" in uri, uri
    # libnbd's tools take the URI as it is (qemu's own NBD client knows no nbds:// URI).
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(1 << 20))
    tool("nbdcopy", str(blob), uri)
    assert tool("nbdinfo", "--size", uri).strip() == str(16 << 20).encode()
    n = c.nodes["n1"]
    plain = f"nbd://{address}:{n.nbd_port}/sec"
    assert refused("nbdinfo", "--size", plain)
    # Before TLS, not even the export list: LIST is answered "TLS required".
    r, w = await asyncio.open_connection(address, n.nbd_port)
    await r.readexactly(18)
    w.write(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE) + nbd_option(p.OPT_LIST))
    _magic, _opt, rtype, length = struct.unpack(">QIII", await r.readexactly(20))
    assert rtype == p.REP_ERR_TLS_REQD
    assert b"sec" not in await r.readexactly(length)
    w.close()
    # A certificate from another CA does not get through the TLS handshake.
    other = tls_dir(TestCA(tmp_path / "other-ca", "other"), tmp_path / "other", "x", (), False)
    shutil.copy(certs / "ca-cert.pem", other / "ca-cert.pem")  # trusts the server, not trusted
    stranger = f"nbds://{address}:{n.nbd_port}/sec?tls-certificates={other}"
    assert refused("nbdinfo", "--size", stranger)
    assert tool("nbdcopy", uri, "-")[: 1 << 20] == blob.read_bytes()
