"""What every chaos scenario does around its fault: a stamped workload that follows the volume,
the history checker, and a chunk-by-chunk comparison of the in-sync replicas' disks."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replica.chunkstore import ChunkStore
from replica.errors import ChecksumMismatch
from replica.fileio import OSFile
from tests.chaos.netns import NetnsCluster
from tests.harness.stamps import MIN_ACKED, Check, History, UriFollower, Writer, check

# How long after the last fault every writer may take to see MIN_ACKED writes acknowledged.
SERVE_AGAIN_TIMEOUT = 60


@dataclass
class Workload:
    """Several stamped writers (NBD clients, each its own share of the blocks, so per-block
    order is one client's order) following the volume's URI. They write for at least
    `seconds`; with a fault marked (`fault()`), `finish` also waits until each writer had
    writes acknowledged after it, so a slow recovery cannot leave the checker without any."""

    c: NetnsCluster
    volume: str
    tmp: Path
    nblocks: int
    seconds: float
    seed: int
    writers: int = 2

    def start(self) -> None:
        urifile = self.tmp / f"{self.volume}.uri"
        urifile.write_text(self.c.inspect(self.volume)["nbd_uri"])
        self.follower = UriFollower(self.c, self.volume, urifile)
        self.started = time.monotonic()
        # The writers run until stopped (the cap only bounds a test that forgets them).
        cap = self.seconds + SERVE_AGAIN_TIMEOUT + 120
        self.procs = [
            Writer(urifile, self.nblocks, cap, self.seed + i, self.writers, i)
            for i in range(self.writers)
        ]

    def fault(self) -> None:
        """The fault is in effect from now on: the checker wants writes acknowledged on both
        sides of it (tests.harness.stamps.require_acked)."""
        now = time.monotonic()
        for w in self.procs:
            w.fault(now)

    def faulted(self) -> bool:
        return any(w.history.faults for w in self.procs)

    def wait_acked(self, n: int = MIN_ACKED, timeout: float = SERVE_AGAIN_TIMEOUT) -> None:
        """Until every writer had `n` writes acknowledged after the last fault (one deadline
        for all); AssertionError if that does not come."""
        deadline = time.monotonic() + timeout
        for w in self.procs:
            w.wait_acked(n, max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        for w in self.procs:
            w.stop()

    def finish(self) -> History:
        try:
            left = self.started + self.seconds - time.monotonic()
            if left > 0:
                time.sleep(left)  # the workload's length: the writers go on meanwhile
            if self.faulted():
                self.wait_acked()
            self.stop()
            whole = History()
            for w in self.procs:
                whole.extend(w.finish(timeout=60))
            return whole
        finally:
            self.stop()
            self.follower.close()

    def check(self, history: History) -> Check:
        return check(history, self.c.inspect(self.volume)["nbd_uri"], self.nblocks)


def counts(history: History, result: Check) -> dict[str, int]:
    return {
        "issued": len(history.acked) + len(history.failed),
        "acknowledged": len(history.acked),
        "failed": len(history.failed),
        "lost": len(result.lost),
        "phantom": len(result.phantom),
        "corrupt": len(result.garbage),
        "unstable": len(result.unstable),
    }


def report(name: str, history: History, result: Check, extra: dict[str, Any] | None = None) -> str:
    line = " ".join(f"{k}={v}" for k, v in {**counts(history, result), **(extra or {})}.items())
    text = f"CHAOS {name}: {line}"
    print(text)
    return text


def all_in_sync(c: NetnsCluster, volume: str) -> bool:
    info = c.inspect(volume)
    return info["state"] == "attached" and all(r["state"] == "in_sync" for r in info["replicas"])


def served(c: NetnsCluster, volume: str) -> bool:
    """The volume's URI (per etcd) answers an NBD handshake."""
    uri = c.inspect(volume)["nbd_uri"]
    if not uri:
        return False
    res = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=30)
    return res.returncode == 0


def _chunk_sums(disk: Path, volume_id: str) -> dict[int, str]:
    async def body() -> dict[int, str]:
        f = OSFile.open(str(disk))
        try:
            store = ChunkStore.open(f)
            meta = store.volumes()[volume_id]
            nchunks = (meta.size + meta.chunk_size - 1) // meta.chunk_size
            out = {}
            for i in range(nchunks):
                try:
                    data = store.read_chunk(volume_id, meta.epoch, i).data
                except ChecksumMismatch:
                    out[i] = "corrupt (checksum mismatch)"  # diverges from every good copy
                    continue
                if data is not None and any(data):
                    out[i] = hashlib.sha256(data).hexdigest()
            await store.close()
            return out
        finally:
            f.close()

    return asyncio.run(body())


def compare_replicas(c: NetnsCluster, volume: str, tmp: Path) -> dict[str, int]:
    """Stop every node, then compare the in-sync replicas chunk by chunk on copies of their
    disks. Returns {node: chunks written}; raises AssertionError naming divergent chunks."""
    info = c.inspect(volume)
    in_sync = sorted(r["node"] for r in info["replicas"] if r["state"] == "in_sync")
    for n in c.nodes:
        c.kill(n)  # SIGKILL: the page cache keeps every applied write in the file
    sums: dict[str, dict[int, str]] = {}
    for n in in_sync:
        copy = tmp / f"{n}-copy.img"
        subprocess.run(
            ["cp", "--sparse=always", str(c.nodes[n].disk), str(copy)], check=True, timeout=120
        )
        sums[n] = _chunk_sums(copy, info["id"])
        copy.unlink()
    ref_node = in_sync[0]
    diverged = {
        n: sorted(i for i in set(s) | set(sums[ref_node]) if s.get(i) != sums[ref_node].get(i))
        for n, s in sums.items()
    }
    bad = {n: d for n, d in diverged.items() if d}
    assert not bad, f"in-sync replicas diverge from {ref_node}: {bad}"
    return {n: len(s) for n, s in sums.items()}
