"""Helpers for NBD tests: a raw protocol client and a runner for external NBD tools."""

from __future__ import annotations

import asyncio
import functools
import shutil
import struct
import subprocess

import pytest

from pxcluster.nbd import protocol as p

_DEFAULT_CLIENT_FLAGS = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES


class RawNbdClient:
    """Speaks the NBD wire format byte by byte, so tests can also speak it wrong."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect_tcp(cls, port: int, host: str = "127.0.0.1") -> RawNbdClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @classmethod
    async def connect_unix(cls, path: str) -> RawNbdClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def read(self, n: int, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def greeting(self, client_flags: int = _DEFAULT_CLIENT_FLAGS) -> int:
        magic, opt_magic, flags = p.GREETING.unpack(await self.read(p.GREETING.size))
        assert magic == p.NBDMAGIC and opt_magic == p.IHAVEOPT
        self.send(p.CLIENT_FLAGS.pack(client_flags))
        return int(flags)

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(p.OPTION_HEADER.pack(p.IHAVEOPT, option, len(data)) + data)

    async def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply_type, length = p.OPTION_REPLY.unpack(
            await self.read(p.OPTION_REPLY.size)
        )
        assert magic == p.OPT_REPLY_MAGIC
        return option, reply_type, await self.read(length)

    @staticmethod
    def info_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
        raw = name.encode()
        return (
            p.U32.pack(len(raw))
            + raw
            + p.U16.pack(len(requests))
            + b"".join(p.U16.pack(r) for r in requests)
        )

    async def go(
        self, name: str, *, structured: bool = False, greet: bool = True
    ) -> tuple[int, int]:
        """Negotiate, enter transmission; returns (size, transmission flags)."""
        if greet:
            await self.greeting()
        if structured:
            self.option(p.OPT_STRUCTURED_REPLY)
            assert (await self.option_reply())[1] == p.REP_ACK
        self.option(p.OPT_GO, self.info_data(name, (p.INFO_BLOCK_SIZE,)))
        size = flags = -1
        while True:
            _, reply_type, data = await self.option_reply()
            if reply_type == p.REP_ACK:
                return size, flags
            assert reply_type == p.REP_INFO, hex(reply_type)
            (info,) = p.U16.unpack_from(data)
            if info == p.INFO_EXPORT:
                _, size, flags = p.INFO_EXPORT_REPLY.unpack(data)

    def request(
        self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0
    ) -> None:
        self.send(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length))

    async def simple_reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data); data is read only on success."""
        magic, error, cookie = p.SIMPLE_REPLY.unpack(await self.read(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC, hex(magic)
        data = await self.read(data_length) if error == 0 and data_length else b""
        return error, cookie, data

    async def structured_chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload)."""
        magic, flags, rtype, cookie, length = p.STRUCTURED_REPLY.unpack(
            await self.read(p.STRUCTURED_REPLY.size)
        )
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, rtype, cookie, await self.read(length)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True if the server closed the connection (EOF or reset) within `timeout`."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionError, OSError):
            return True
        except TimeoutError:
            return False
        if data:
            return await self.closed(timeout)
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def error_chunk(payload: bytes) -> tuple[int, str]:
    error, length = struct.unpack_from(">IH", payload)
    return int(error), payload[6 : 6 + length].decode()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install libnbd-bin qemu-utils fio)")
    return path


@functools.cache
def _python_with_libnbd() -> str | None:
    # nbdsh runs `python3 -m nbd`; the python3 first on PATH may not see Debian's
    # python3-libnbd (ENVIRONMENT.md), so find the interpreter that does.
    for python in ("/usr/bin/python3", shutil.which("python3")):
        if python is None:
            continue
        probe = subprocess.run([python, "-c", "import nbd"], capture_output=True, check=False)
        if probe.returncode == 0:
            return python
    return None


def nbdsh_argv() -> list[str]:
    """argv prefix that runs nbdsh (libnbd's python shell), or skip the test."""
    python = _python_with_libnbd()
    if python is None:
        pytest.skip("python3-libnbd is not installed (apt-get install python3-libnbd)")
    return [python, "-m", "nbd"]


async def run_tool(*argv: str, timeout: float = 60.0, stdin: bytes | None = None) -> str:
    """Run an external client to completion; fail the test with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv[0]} timed out after {timeout}s") from None
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{text}"
    return text
