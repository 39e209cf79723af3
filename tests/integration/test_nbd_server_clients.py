"""The NBD server driven by real clients: libnbd tools, qemu, fio.

The server runs in the test's event loop with a MemoryExport; each tool runs as a
subprocess, so the loop keeps serving while the test awaits it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pxcluster.nbd import ExportRegistry, MemoryExport, NbdServer
from tests.harness.nbd_tools import nbdsh_argv, require_tool, run_tool

SIZE = 64 << 20


class Served:
    def __init__(self, port: int, sock: str, export: MemoryExport, registry: ExportRegistry):
        self.port = port
        self.sock = sock
        self.export = export
        self.registry = registry

    @property
    def tcp_uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/vol"

    @property
    def unix_uri(self) -> str:
        return f"nbd+unix:///vol?socket={self.sock}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    registry = ExportRegistry()
    export = MemoryExport("vol", SIZE)
    registry.add(export)
    registry.add(MemoryExport("spare", 1 << 20))
    server = NbdServer(registry)
    port = await server.start_tcp("127.0.0.1", 0)
    sock = str(tmp_path / "nbd.sock")
    await server.start_unix(sock)
    yield Served(port, sock, export, registry)
    await server.close()


async def test_nbdinfo_size_and_list(served: Served) -> None:
    nbdinfo = require_tool("nbdinfo")
    assert (await run_tool(nbdinfo, "--size", served.tcp_uri)).strip() == str(SIZE)
    assert (await run_tool(nbdinfo, "--size", served.unix_uri)).strip() == str(SIZE)
    info = json.loads(await run_tool(nbdinfo, "--json", served.tcp_uri))
    (vol,) = info["exports"]
    assert vol["export-size"] == SIZE
    assert vol["can_flush"] and vol["can_fua"] and vol["can_trim"] and vol["can_zero"]
    assert vol["can_multi_conn"] and not vol["is_read_only"]
    listing = json.loads(
        await run_tool(nbdinfo, "--list", "--json", f"nbd://127.0.0.1:{served.port}")
    )
    assert sorted(e["export-name"] for e in listing["exports"]) == ["spare", "vol"]


async def test_nbdcopy_roundtrip_tcp_in_unix_out(served: Served, tmp_path: Path) -> None:
    nbdcopy = require_tool("nbdcopy")
    src = tmp_path / "in.bin"
    data = os.urandom(SIZE)
    src.write_bytes(data)
    # Several connections in parallel (nbdcopy uses multi-conn when offered).
    await run_tool(nbdcopy, "--connections=4", str(src), served.tcp_uri)
    assert served.export.contents() == data
    dst = tmp_path / "out.bin"
    await run_tool(nbdcopy, served.unix_uri, str(dst))
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_qemu_img_info(served: Served) -> None:
    qemu_img = require_tool("qemu-img")
    out = json.loads(await run_tool(qemu_img, "info", "--output=json", served.tcp_uri))
    assert out["virtual-size"] == SIZE


async def test_qemu_io_pattern_discard_zero(served: Served) -> None:
    qemu_io = require_tool("qemu-io")
    mib = 1 << 20
    commands = [
        "write -P 0xab 0 4M",
        "write -f -P 0xcd 4M 1M",  # -f: FUA
        "read -P 0xab 0 4M",
        "read -P 0xcd 4M 1M",
        "aio_write -P 0x11 8M 64k",
        "aio_write -P 0x22 9M 64k",
        "aio_flush",
        "read -P 0x11 8M 64k",
        "discard 0 1M",
        "write -z 1M 1M",
        "read -P 0 1M 1M",
        "flush",
    ]
    argv = [qemu_io, "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    await run_tool(*argv, served.tcp_uri)
    export = served.export
    assert export.contents(1 * mib, mib) == bytes(mib)
    assert export.contents(2 * mib, 2 * mib) == b"\xab" * 2 * mib
    assert export.contents(4 * mib, mib) == b"\xcd" * mib
    assert export.contents(9 * mib, 65536) == b"\x22" * 65536
    assert export.fua_writes >= 1 and export.flushes >= 1
    assert export.trims >= 1 and export.zero_requests >= 1


async def test_fio_randwrite_verify(served: Served) -> None:
    fio = require_tool("fio")
    out = await run_tool(
        fio,
        "--name=nbdverify",
        "--ioengine=nbd",
        f"--uri={served.tcp_uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--verify=crc32c",
        "--size=16m",
        "--output-format=json",
    )
    result = json.loads(out[out.index("{") :])
    (job,) = result["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 << 20
    assert job["read"]["io_bytes"] == 16 << 20  # the verify pass read everything back


NBDSH_SCRIPT = """
import nbd
assert h.get_size() == {size}
assert h.get_structured_replies_negotiated()
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
h.pwrite(b"\\x5a" * 8192, 4096, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(8192, 4096) == b"\\x5a" * 8192
h.trim(4096, 4096)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 4096) == bytes(8192)
# Errors come back as structured error chunks and the connection survives them.
try:
    h.pread(4096, {size} - 100)
except nbd.Error as e:
    assert e.errno == "EINVAL", e.errno
else:
    raise AssertionError("read past the end succeeded")
# Many requests in flight, answered in any order.
bufs = [nbd.Buffer(4096) for _ in range(32)]
cookies = [h.aio_pread(bufs[i], i * 4096) for i in range(32)]
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
h.pwrite(b"ok", 0)
assert h.pread(2, 0) == b"ok"
print("NBDSH_OK")
"""


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_nbdsh_structured_flush_fua_trim_zero(served: Served, transport: str) -> None:
    nbdsh = nbdsh_argv()
    uri = served.tcp_uri if transport == "tcp" else served.unix_uri
    out = await run_tool(*nbdsh, "-u", uri, "-c", NBDSH_SCRIPT.format(size=SIZE))
    assert "NBDSH_OK" in out
    export = served.export
    assert export.fua_writes == 1 and export.flushes == 1
    assert export.trims == 1 and export.no_hole_zeroes == 1


async def test_nbdsh_simple_replies(served: Served) -> None:
    nbdsh = nbdsh_argv()
    script = (
        "h.set_request_structured_replies(False)\n"
        f"h.connect_uri({served.tcp_uri!r})\n"
        "assert not h.get_structured_replies_negotiated()\n"
        "h.pwrite(b'abc', 10)\n"
        "assert h.pread(3, 10) == b'abc'\n"
        "try:\n"
        f"    h.pread(2, {SIZE - 1})\n"
        "except nbd.Error as e:\n"
        "    assert e.errno == 'EINVAL', e.errno\n"
        "print('NBDSH_OK')\n"
    )
    out = await run_tool(*nbdsh, "-c", script)
    assert "NBDSH_OK" in out


class TaskRecordingExport(MemoryExport):
    """Records, per write length, whether the write started inside a task."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__(name, size)
        self.in_task: dict[int, bool] = {}

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.in_task[data.nbytes] = asyncio.current_task() is not None
        await super().write(offset, data, fua)


async def test_small_writes_run_inline_and_large_ones_in_a_task(tmp_path: Path) -> None:
    qemu_io = require_tool("qemu-io")
    registry = ExportRegistry()
    export = TaskRecordingExport("vol", SIZE)
    registry.add(export)
    server = NbdServer(registry)
    port = await server.start_tcp("127.0.0.1", 0)
    try:
        await run_tool(
            qemu_io,
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4k",
            "-c",
            "write -P 0x5b 1M 1M",
            f"nbd://127.0.0.1:{port}/vol",
        )
    finally:
        await server.close()
    # 4 KiB: completed inside the protocol callback, no task; 1 MiB: a task, so receiving the
    # requests behind it does not wait for its copy.
    assert export.in_task == {4096: False, 1 << 20: True}
    assert export.contents(0, 4096) == b"\x5a" * 4096
    assert export.contents(1 << 20, 1 << 20) == b"\x5b" * (1 << 20)
