"""SIGKILL a replica server under concurrent write load, restart it, and check every block.

A killed process leaves the page cache behind, so every write whose ack arrived must read back
exactly; a write in flight at the kill may or may not have landed; nothing else may appear.
"""

from __future__ import annotations

import asyncio
import random
import struct
from pathlib import Path

from replica.client import ReplicaClient
from replica.errors import ReplicaUnavailable
from tests.harness.replica_proc import TEST_KEY, ReplicaProc

CHUNK = 4 << 20
CHUNKS = 4
SIZE = CHUNK * CHUNKS
BLOCKS = 512  # spread over every chunk
WORKERS = 16
ROUNDS = 4
_STAMP = struct.Struct("!QQ")


def where(block: int) -> tuple[int, int]:
    return block % CHUNKS, (block // CHUNKS) * 4096


def content(block: int, version: int) -> bytes:
    return _STAMP.pack(block, version) * (4096 // _STAMP.size)


class Model:
    def __init__(self) -> None:
        self.acked: dict[int, int] = {}  # block -> last acknowledged version
        self.inflight: dict[int, int] = {}  # block -> version sent, no ack (yet)
        self.version = 0
        self.acks = 0
        self.acked_one = asyncio.Event()  # set at every ack: the test waits on progress

    async def wait_acks(self, n: int, timeout: float = 30) -> None:
        """Until `n` acks in all; TimeoutError if the load never gets going."""
        async with asyncio.timeout(timeout):
            while self.acks < n:
                self.acked_one.clear()
                await self.acked_one.wait()

    async def writer(self, c: ReplicaClient, epoch: int, rng: random.Random) -> None:
        n = 0
        while True:
            block = rng.randrange(BLOCKS)
            if block in self.inflight:
                continue  # one write per block at a time: its outcome stays unambiguous
            self.version += 1
            v = self.version
            self.inflight[block] = v
            chunk, off = where(block)
            try:
                await c.write("v", epoch, chunk, off, content(block, v), seq=v)
                del self.inflight[block]
                self.acked[block] = v
                self.acks += 1
                self.acked_one.set()
                n += 1
                if n % 32 == 0:
                    await c.flush("v", epoch)
            except ReplicaUnavailable:
                return  # the kill; this block's write stays in flight, outcome unknown

    def check(self, block: int, data: bytes) -> None:
        if data == bytes(4096):
            assert block not in self.acked, f"block {block}: acked v{self.acked[block]} lost"
            self.inflight.pop(block, None)
            return
        b, v = _STAMP.unpack_from(data)
        assert b == block and data == content(b, v), f"block {block}: foreign or torn data"
        allowed = {self.acked.get(block), self.inflight.get(block)}
        assert v in allowed, f"block {block}: v{v}, acked {self.acked.get(block)}"
        # Whatever is there now is the block's state from here on.
        self.inflight.pop(block, None)
        self.acked[block] = v


async def test_sigkill_under_write_load_keeps_every_acked_write(tmp_path: Path) -> None:
    proc = ReplicaProc(tmp_path, disk_size=256 << 20)
    proc.start()
    model = Model()
    rng = random.Random(1234)
    try:
        for epoch in range(1, ROUNDS + 1):
            c = ReplicaClient(proc.host, proc.port, timeout=2.0, key=TEST_KEY)
            info = await c.open("v", epoch, SIZE, CHUNK)
            assert info.epoch == epoch
            if epoch > 1:
                # Same boot: the page cache survived, so nothing is suspect.
                assert info.unclean is False
                reads = await asyncio.gather(
                    *(c.read("v", epoch, *where(b), 4096) for b in range(BLOCKS))
                )
                for b, data in enumerate(reads):
                    model.check(b, data)
            before = model.acks
            workers = [
                asyncio.create_task(model.writer(c, epoch, random.Random(rng.random())))
                for _ in range(WORKERS)
            ]
            # The load gets going (bounded), then runs on for a moment picked by the seed.
            await model.wait_acks(before + 100)
            await asyncio.sleep(rng.uniform(0, 0.5))
            proc.kill()  # SIGKILL, mid-load
            await asyncio.wait_for(asyncio.gather(*workers), 10)
            await c.close()
            proc.start()
        c = ReplicaClient(proc.host, proc.port, key=TEST_KEY)
        await c.open("v", ROUNDS + 1, SIZE, CHUNK)
        reads = await asyncio.gather(
            *(c.read("v", ROUNDS + 1, *where(b), 4096) for b in range(BLOCKS))
        )
        for b, data in enumerate(reads):
            model.check(b, data)
        await c.close()
    finally:
        proc.kill()
