"""`pxcluster verify NAME`: prove on a live cluster that a volume keeps every acknowledged
write, across failovers when asked to cause them.

It OVERWRITES the volume's first blocks with stamped 4 KiB blocks (pxcluster.tools.stamp): use a
scratch volume. Several writers (one NBD connection each, disjoint blocks, so each block's
writes are one writer's order) record issue/ack/fail per write; a failed write makes its
writer reconnect to wherever the volume is served now. Then every block is read twice and
checked against the history (the rules of tests/harness/stamps.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from membership.etcd import Etcd, EtcdSettings, EtcdUnavailable
from pxcluster.cli import output
from pxcluster.errors import PxcError, VolumeBusy
from pxcluster.nbd.client import NbdClient, NbdError
from pxcluster.service.core import Service
from pxcluster.tools import stamp

WRITERS = 4
FOLLOW_TIMEOUT = 60.0  # how long a writer (or the checker) waits for the volume to be served
READ_DEPTH = 32


@dataclass
class History:
    acked: list[tuple[int, int, int]] = field(default_factory=list)  # block, seq, token
    failed: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class Result:
    volume: str
    blocks: int
    seconds: float
    issued: int = 0
    acknowledged: int = 0
    failed: int = 0
    lost: int = 0
    phantom: int = 0
    corrupt: int = 0
    unstable: int = 0
    moves: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    bad_blocks: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.acknowledged > 0 and not (
            self.lost or self.phantom or self.corrupt or self.unstable
        )


class Follower:
    """The volume's current NBD URI, read from etcd; records every move it sees."""

    def __init__(self, svc: Service, name: str, first: str) -> None:
        self.svc, self.name, self.current = svc, name, first
        self.moves: list[str] = []

    async def uri(self, deadline: float) -> str:
        while True:
            try:
                info = await self.svc.inspect(await self.svc.volume(self.name))
                uri = info["nbd_uri"] if info["state"] == "attached" else None
            except (PxcError, EtcdUnavailable):
                uri = None
            if uri:
                if uri != self.current:
                    self.current = uri
                    self.moves.append(uri)
                return str(uri)
            if time.monotonic() > deadline:
                raise VolumeBusy(f"volume {self.name!r} not served anywhere for {FOLLOW_TIMEOUT}s")
            await asyncio.sleep(0.2)


async def _writer(
    idx: int, nblocks: int, follow: Follower, stop: float, seq: list[int], h: History, seed: int
) -> None:
    rng = random.Random(seed * 1000 + idx)
    mine = range(idx, nblocks, WRITERS)
    client: NbdClient | None = None
    try:
        while time.monotonic() < stop:
            if client is None:
                try:
                    uri = await follow.uri(time.monotonic() + FOLLOW_TIMEOUT)
                    client = await NbdClient.connect(uri)
                except (NbdError, OSError, TimeoutError):
                    await asyncio.sleep(0.2)
                    continue
            seq[0] += 1
            block, token = rng.choice(mine), rng.getrandbits(63)
            rec = (block, seq[0], token)
            try:
                await asyncio.wait_for(
                    client.write(block * stamp.BLOCK, stamp.make(*rec)), FOLLOW_TIMEOUT
                )
                h.acked.append(rec)
            except (NbdError, OSError, TimeoutError):
                h.failed.append(rec)
                await client.close()
                client = None
    finally:
        if client is not None:
            await client.close()


async def _zero_all(uri: str, nblocks: int) -> None:
    """Start from zeros: a block this run never wrote then reads as never written."""
    client = await NbdClient.connect(uri)
    try:
        zero = bytes(stamp.BLOCK * 64)
        for start in range(0, nblocks, 64 * READ_DEPTH):
            await asyncio.gather(
                *(
                    client.write(
                        off * stamp.BLOCK, zero[: (min(nblocks, off + 64) - off) * stamp.BLOCK]
                    )
                    for off in range(start, min(nblocks, start + 64 * READ_DEPTH), 64)
                )
            )
        await client.flush()
    finally:
        await client.close()


async def _read_all(uri: str, nblocks: int) -> list[bytes]:
    client = await NbdClient.connect(uri)
    try:
        out: list[bytes] = []
        for start in range(0, nblocks, READ_DEPTH):
            reads = [
                client.read(b * stamp.BLOCK, stamp.BLOCK)
                for b in range(start, min(nblocks, start + READ_DEPTH))
            ]
            out += await asyncio.gather(*reads)
        return out
    finally:
        await client.close()


def check(h: History, first: list[bytes], second: list[bytes], r: Result) -> None:
    """Per block: the last acknowledged write, or a later issued one; nothing never issued;
    no garbage; two reads agree."""
    seq_of = {(b, t): s for b, s, t in h.acked + h.failed}
    last: dict[int, int] = {}
    for b, s, _ in h.acked:
        last[b] = max(s, last.get(b, 0))
    for b, data in enumerate(first):
        bad = True
        if data != second[b]:
            r.unstable += 1
        try:
            got = stamp.parse(data)
        except ValueError:
            r.corrupt += 1
        else:
            if got is None:
                r.lost += b in last
                bad = b in last
            elif got[0] != b or (b, got[2]) not in seq_of:
                r.phantom += 1
            elif seq_of[(b, got[2])] < last.get(b, 0):
                r.lost += 1
            else:
                bad = data != second[b]
        if bad and len(r.bad_blocks) < 20:
            r.bad_blocks.append(b)


async def run_verify(
    etcd_url: str,
    cluster: str,
    name: str,
    seconds: float,
    with_faults: bool,
    seed: int,
    settings: EtcdSettings | None = None,
) -> Result:
    etcd = Etcd(etcd_url, settings=settings)
    await etcd.connect()
    try:
        svc = Service(etcd, cluster)
        info = await svc.inspect(await svc.volume(name))
        if info["state"] != "attached" or not info["nbd_uri"]:
            raise VolumeBusy(f"volume {name!r} is {info['state']}; attach it first")
        nblocks = min(2048, info["size"] // stamp.BLOCK)
        r = Result(name, nblocks, seconds)
        follow = Follower(svc, name, info["nbd_uri"])
        await _zero_all(info["nbd_uri"], nblocks)
        h, seq = History(), [0]
        stop = time.monotonic() + seconds
        writers = [
            asyncio.create_task(_writer(i, nblocks, follow, stop, seq, h, seed))
            for i in range(WRITERS)
        ]
        if with_faults:
            await asyncio.sleep(seconds / 2)
            dest = await svc.failover(name, None)
            r.faults.append(f"failover to {dest.name} at {seconds / 2:.1f}s")
        await asyncio.gather(*writers)
        uri = await follow.uri(time.monotonic() + FOLLOW_TIMEOUT)
        first = await _read_all(uri, nblocks)
        second = await _read_all(uri, nblocks)
        r.issued, r.acknowledged, r.failed = (
            len(h.acked) + len(h.failed),
            len(h.acked),
            len(h.failed),
        )
        check(h, first, second, r)
        r.moves = follow.moves
        return r
    finally:
        await etcd.close()


@click.command("verify")
@click.argument("name")
@click.option("--seconds", type=float, default=30.0, show_default=True)
@click.option("--with-faults", is_flag=True, help="fail the volume over while writing")
@click.option("--seed", type=int, default=0, help="workload seed (default: random)")
@click.option("--json", "as_json", is_flag=True)
def verify(name: str, seconds: float, with_faults: bool, seed: int, as_json: bool) -> None:
    """Write stamped blocks to NAME, follow it when it moves, then check every block.

    Overwrites the volume's first 8 MiB: run it on a scratch volume."""
    ctx: Any = click.get_current_context().obj
    seed = seed or random.randrange(1, 1 << 31)
    try:
        r = asyncio.run(
            run_verify(
                ctx.etcd_url, ctx.cluster, name, seconds, with_faults, seed, ctx.etcd_settings
            )
        )
    except (PxcError, EtcdUnavailable, NbdError, OSError) as e:
        output.fail(str(e))
        return
    if as_json:
        output.emit_json({**asdict(r), "ok": r.ok, "seed": seed})
    else:
        print(
            f"volume {name}: {r.blocks} blocks, {r.seconds:.0f}s, seed {seed}\n"
            f"issued {r.issued}  acknowledged {r.acknowledged}  failed {r.failed}\n"
            f"lost {r.lost}  phantom {r.phantom}  corrupt {r.corrupt}  unstable {r.unstable}"
        )
        for m in r.faults:
            print(f"fault: {m}")
        for u in r.moves:
            print(f"followed the volume to {u}")
    if not r.ok:
        why = "nothing was acknowledged" if not r.acknowledged else f"blocks {r.bad_blocks}"
        output.fail(f"verify of {name} FAILED: {why}")
