"""Whole-volume I/O for integration tests: write bytes at an offset (pxcluster's NBD client,
flushed), read a whole volume back or hash it (nbdcopy, a real NBD client)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess

from pxcluster.nbd.client import NbdClient

MiB = 1 << 20


def nbd_write(uri: str, offset: int, data: bytes) -> None:
    async def run() -> None:
        client = await NbdClient.connect(uri)
        try:
            for i in range(0, len(data), MiB):
                await client.write(offset + i, data[i : i + MiB])
            await client.flush()
        finally:
            await client.close()

    asyncio.run(run())


def nbd_bytes(uri: str) -> bytes:
    return subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True, timeout=60).stdout


def nbd_sha(uri: str) -> str:
    return hashlib.sha256(nbd_bytes(uri)).hexdigest()
