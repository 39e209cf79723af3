"""What the replica port's key exchange costs, against the same server in the same run.

The exchange (replica/auth.py) runs once per connection and adds nothing to a frame, so the
data path is the same with it as without it; what it adds is to opening a connection. Against
one `python -m replica.server` on loopback, this measures:

- a connection opened from scratch: TCP connect, the key exchange, one ping answered;
- a bare TCP connect that reads the server's challenge (what a connection costs before any
  authentication: the floor the exchange adds to);
- one ping on a connection already open (the per-request round trip, untouched by the
  exchange), and 4 KiB writes at QD16 on it.

    .venv/bin/python bench/auth_bench.py [--connects 300] [--pings 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.client import ReplicaClient
from tests.harness.replica_proc import TEST_KEY, ReplicaProc


async def _connect_and_ping(proc: ReplicaProc) -> float:
    t0 = time.perf_counter()
    c = ReplicaClient(proc.host, proc.port, key=TEST_KEY)
    await c.ping()
    elapsed = time.perf_counter() - t0
    await c.close()
    return elapsed


async def _bare_connect(proc: ReplicaProc) -> float:
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection(proc.host, proc.port)
    total, _ = struct.unpack("!II", await r.readexactly(8))
    await r.readexactly(total - 4)
    elapsed = time.perf_counter() - t0
    w.close()
    return elapsed


async def _run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        proc = ReplicaProc(Path(d), disk_size=256 << 20)
        proc.start()
        try:
            auth_us = [await _connect_and_ping(proc) * 1e6 for _ in range(args.connects)]
            bare_us = [await _bare_connect(proc) * 1e6 for _ in range(args.connects)]
            c = ReplicaClient(proc.host, proc.port, key=TEST_KEY)
            await c.open("v", 1, 64 << 20, 4 << 20)
            ping_us = []
            for _ in range(args.pings):
                t0 = time.perf_counter()
                await c.ping()
                ping_us.append((time.perf_counter() - t0) * 1e6)
            data = memoryview(bytes(4096))
            n = 0
            t0 = time.perf_counter()

            async def writer(k: int) -> None:
                nonlocal n
                while time.perf_counter() - t0 < args.seconds:
                    await c.write("v", 1, k % 16, (n % 1024) * 4096, data, seq=n + 1)
                    n += 1

            await asyncio.gather(*(writer(k) for k in range(16)))
            iops = n / (time.perf_counter() - t0)
            await c.close()
        finally:
            proc.stop()
    auth_p50, bare_p50 = statistics.median(auth_us), statistics.median(bare_us)
    ping_p50 = statistics.median(ping_us)
    print(f"connect + key exchange + ping  p50 {auth_p50:8.0f} us")
    print(f"bare connect + challenge       p50 {bare_p50:8.0f} us")
    print(f"ping on an open connection     p50 {ping_p50:8.0f} us")
    print(f"exchange adds per connection       {auth_p50 - bare_p50 - ping_p50:8.0f} us")
    print(f"4 KiB writes QD16 on one connection {iops:8.0f} IOPS (frames carry nothing extra)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connects", type=int, default=300)
    ap.add_argument("--pings", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=3.0)
    asyncio.run(_run(ap.parse_args()))


if __name__ == "__main__":
    main()
