"""A real `python -m replica.server` process on loopback, via ReplicaClient and raw sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from replica.client import ReplicaClient
from replica.errors import OutOfRange, ProtocolError, ReplicaUnavailable, StaleEpoch
from replica.protocol import encode_frame
from tests.harness.replica_proc import TEST_KEY, ReplicaProc, raw_connect

CHUNK = 4 << 20  # the server formats with the store's default chunk size
SIZE = 64 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReplicaProc]:
    p = ReplicaProc(tmp_path)
    p.start()
    yield p
    p.kill()


@pytest.fixture
async def client(server: ReplicaProc) -> AsyncIterator[ReplicaClient]:
    c = ReplicaClient(server.host, server.port, timeout=5.0, key=TEST_KEY)
    yield c
    await c.close()


async def test_round_trip(client: ReplicaClient, server: ReplicaProc) -> None:
    info = await client.open("v", 1, SIZE, CHUNK)
    assert (info.size, info.chunk_size, info.epoch, info.dirty) == (SIZE, CHUNK, 1, [])
    block = os.urandom(4096)
    big = os.urandom(1 << 20)
    await client.write("v", 1, 0, 8192, block, seq=1)
    await client.write("v", 1, 1, 0, big, seq=2, durable=True)
    await client.flush("v", 1)
    assert await client.read("v", 1, 0, 8192, 4096) == block
    assert await client.read("v", 1, 1, 0, 1 << 20) == big
    assert await client.read("v", 1, 5, 0, 4096) == bytes(4096)
    await client.trim("v", 1, 0, 8192, 4096, seq=3)
    assert await client.read("v", 1, 0, 8192, 4096) == bytes(4096)
    gens = await client.generations("v", 1)
    assert gens[1] == (1, 2) and gens[0] == (1, 3)
    data, gen, _ = await client.read_chunk("v", 1, 1)
    assert data is not None and data[: 1 << 20] == big and gen == (1, 2)
    await client.write_chunk("v", 1, 2, data, (1, 7))
    assert await client.read("v", 1, 2, 0, 1 << 20) == big
    await client.mark_clean("v", 1, [0, 1, 2])
    st = await client.stats()
    assert st.volumes == 1 and st.used > 0 and st.capacity == st.used + st.free

    # A graceful stop is a clean shutdown: the data and the epoch survive it.
    await client.close()
    assert server.stop() == 0
    server.start()
    info = await client.open("v", 2, SIZE, CHUNK)
    assert info.epoch == 2 and info.unclean is False
    assert await client.read("v", 2, 1, 0, 1 << 20) == big
    await client.delete("v", 2)
    assert (await client.stats()).volumes == 0


async def test_pipelining_256_writes_one_connection(client: ReplicaClient) -> None:
    await client.open("v", 1, SIZE, CHUNK)
    blocks = [os.urandom(4096) for _ in range(256)]
    await asyncio.gather(
        *(client.write("v", 1, i % 8, (i // 8) * 4096, b, seq=i + 1) for i, b in enumerate(blocks))
    )
    reads = await asyncio.gather(
        *(client.read("v", 1, i % 8, (i // 8) * 4096, 4096) for i in range(256))
    )
    assert reads == blocks
    assert client._conn is not None and len(client._conn.pending) == 0


async def test_fencing(client: ReplicaClient) -> None:
    await client.open("v", 4, SIZE, CHUNK)
    await client.write("v", 4, 0, 0, b"A" * 4096, seq=1)
    assert (await client.open("v", 5, SIZE, CHUNK)).epoch == 5
    with pytest.raises(StaleEpoch):
        await client.write("v", 4, 0, 0, b"B" * 4096, seq=2)
    with pytest.raises(StaleEpoch):
        await client.read("v", 4, 0, 0, 4096)
    with pytest.raises(StaleEpoch):
        await client.trim("v", 4, 0, 0, 4096, seq=3)
    with pytest.raises(StaleEpoch):
        await client.flush("v", 4)
    with pytest.raises(StaleEpoch):
        await client.write_chunk("v", 4, 0, None, (4, 9))
    with pytest.raises(StaleEpoch):
        await client.open("v", 4, SIZE, CHUNK)
    assert await client.read("v", 5, 0, 0, 4096) == b"A" * 4096
    assert (await client.generations("v", 5))[0] == (4, 1)


async def _raw(server: ReplicaProc) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await raw_connect(server.host, server.port)


async def _reply(r: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    total, hlen = struct.unpack("!II", await asyncio.wait_for(r.readexactly(8), 5))
    body = await asyncio.wait_for(r.readexactly(total - 4), 5)
    return msgpack.unpackb(body[:hlen]), body[hlen:]


def _frame(header: dict[str, Any], payload: bytes | None = None) -> bytes:
    return b"".join(encode_frame(header, payload))


async def test_bad_input_on_the_wire(client: ReplicaClient, server: ReplicaProc) -> None:
    await client.open("v", 1, SIZE, CHUNK)
    await client.write("v", 1, 0, 0, b"keep" * 1024, seq=1)

    # Truncated frame, then the peer goes away: nothing to answer, nothing broken.
    r, w = await _raw(server)
    w.write(
        _frame(
            {
                "id": 1,
                "op": "write",
                "volume": "v",
                "epoch": 1,
                "chunk": 0,
                "offset": 0,
                "seq": 2,
                "durable": False,
            },
            b"X" * 4096,
        )[:2000]
    )
    await w.drain()
    w.close()

    # A length no frame may have: this connection is dropped, the others keep working.
    r, w = await _raw(server)
    w.write(struct.pack("!II", 0xFFFFFFF0, 8) + b"\0" * 64)
    await w.drain()
    try:  # dropped with a reset: nothing more of that stream is sent or read
        assert await asyncio.wait_for(r.read(), 5) == b""
    except ConnectionResetError:
        pass
    w.close()
    other = ReplicaClient(server.host, server.port, key=TEST_KEY)
    assert await other.read("v", 1, 0, 0, 4096) == b"keep" * 1024
    await other.close()

    # Intact frames with bad headers get ProtocolError replies; the connection goes on.
    r, w = await _raw(server)
    w.write(
        _frame(
            {
                "id": 11,
                "op": "read",
                "volume": "v",
                "epoch": "1",
                "chunk": 0,
                "offset": 0,
                "length": 4,
            }
        )
    )
    w.write(_frame({"id": 12, "op": "read", "volume": "v", "epoch": 1}))  # missing args
    w.write(_frame({"id": 13, "op": "frobnicate"}))
    w.write(
        _frame(
            {
                "id": 14,
                "op": "read",
                "volume": "v",
                "epoch": 1,
                "chunk": 0,
                "offset": -4,
                "length": 4,
            }
        )
    )
    w.write(struct.pack("!II", 4 + 3, 3) + b"\xc1\xc1\xc1")  # undecodable header
    w.write(struct.pack("!II", 4 + 1, 2) + b"\x80")  # header longer than its frame
    w.write(
        _frame(
            {
                "id": 15,
                "op": "read",
                "volume": "v",
                "epoch": 1,
                "chunk": 0,
                "offset": CHUNK - 2,
                "length": 4,
            }
        )
    )
    w.write(
        _frame(
            {
                "id": 16,
                "op": "read",
                "volume": "v",
                "epoch": 1,
                "chunk": 999,
                "offset": 0,
                "length": 4,
            }
        )
    )
    w.write(
        _frame(
            {
                "id": 17,
                "op": "read",
                "volume": "v",
                "epoch": 1,
                "chunk": 0,
                "offset": 0,
                "length": 8,
            }
        )
    )
    await w.drain()
    replies = [await _reply(r) for _ in range(9)]
    by_id: dict[int, list[dict[str, Any]]] = {}
    for h, _ in replies:
        by_id.setdefault(h["id"], []).append(h)
    for rid in (11, 12, 13, 14):
        assert by_id[rid][0]["ok"] is False and by_id[rid][0]["code"] == ProtocolError.code
    assert [h["code"] for h in by_id[0]] == [ProtocolError.code] * 2
    assert by_id[15][0]["code"] == OutOfRange.code == "EINVAL"
    assert by_id[16][0]["code"] == "EINVAL"
    ok = [b for h, b in replies if h["id"] == 17]
    assert by_id[17][0]["ok"] is True and ok == [b"keepkeep"]
    w.close()

    with pytest.raises(OutOfRange):
        await client.write("v", 1, 0, CHUNK - 100, b"x" * 4096, seq=3)
    assert await client.read("v", 1, 0, 0, 4096) == b"keep" * 1024


async def test_timeout_when_stopped_then_recovers(server: ReplicaProc) -> None:
    c = ReplicaClient(server.host, server.port, timeout=0.5, connect_timeout=0.5, key=TEST_KEY)
    try:
        await c.open("v", 1, SIZE, CHUNK)
        server.signal(signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.gather(
            *(c.write("v", 1, 0, i * 4096, b"s" * 4096, seq=i + 1) for i in range(8)),
            return_exceptions=True,
        )
        assert all(isinstance(e, ReplicaUnavailable) for e in results)
        assert loop.time() - t0 < 2.0
        with pytest.raises(ReplicaUnavailable):
            await c.read("v", 1, 0, 0, 4096)
        server.signal(signal.SIGCONT)
        await c.write("v", 1, 0, 0, b"t" * 4096, seq=20)
        assert await c.read("v", 1, 0, 0, 4096) == b"t" * 4096
    finally:
        server.signal(signal.SIGCONT)
        await c.close()


async def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        c = ReplicaClient("127.0.0.1", port, connect_timeout=0.5, key=TEST_KEY)
        with pytest.raises(ReplicaUnavailable):
            await c.stats()
        await c.close()


def test_disk_in_use_or_foreign_is_refused(server: ReplicaProc) -> None:
    import subprocess
    import sys

    from tests.harness.replica_proc import REPO

    def run(cluster: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "replica.server",
            "--disk",
            str(server.disks[0]),
            "--cluster-id",
            cluster,
            "--node-id",
            "n1",
            "--port",
            "0",
            "--format",
            "--key-file",
            str(server.key_file),
        ]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)

    busy = run("test")
    assert busy.returncode == 2 and "in use" in busy.stderr
    server.stop()
    foreign = run("another-cluster")
    assert foreign.returncode == 2 and foreign.stdout == ""
    assert foreign.stderr.startswith("error:")
