"""Replica server write benchmark, side by side with a plain file in the same run.

One `python -m replica.server` process on loopback, driven through ReplicaClient, against the
same pattern done directly to a plain file (os.pwrite and os.fdatasync in worker threads, one
fdatasync per durable write, the same queue depth through asyncio). Patterns:
4 KiB random and 1 MiB sequential writes at QD1 and QD16, each (a) plain, (b) with a flush
after every 32nd write, (c) durable (every write on stable storage before its ack).

    .venv/bin/python bench/replica_bench.py [--seconds 3] [--dir DIR]
    .venv/bin/python bench/replica_bench.py --tls   # plain replica port vs TLS with client certs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.replica_floor import FloorClient, FloorServer
from replica.client import ReplicaClient
from tests.harness.replica_proc import TEST_KEY, ReplicaProc, free_port

CHUNK = 4 << 20
SIZE = 256 << 20
MODES = ("plain", "flush/32", "durable")

WriteFn = Callable[[int, memoryview, bool], Awaitable[None]]
FlushFn = Callable[[], Awaitable[None]]


async def run(
    write: WriteFn, flush: FlushFn, bs: int, qd: int, mode: str, seconds: float
) -> tuple[float, float]:
    """Returns (ops/s, MiB/s)."""
    buf = memoryview(os.urandom(bs))
    blocks = SIZE // bs
    rng = random.Random(1)
    done = 0
    seq_next = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, seq_next
        while time.perf_counter() < stop:
            if bs >= 1 << 20:
                off = (seq_next % blocks) * bs
                seq_next += 1
            else:
                off = rng.randrange(blocks) * bs
            await write(off, buf, mode == "durable")
            done += 1
            if mode == "flush/32" and done % 32 == 0:
                await flush()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(qd)))
    dt = time.perf_counter() - t0
    return done / dt, done * bs / dt / (1 << 20)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--dir", default=None, help="where the disk and the plain file go")
    ap.add_argument(
        "--tls",
        action="store_true",
        help="compare the replica port in plain TCP against TLS with client certificates "
        "(instead of against a plain file)",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run the least a socket-fed server can do (bench/replica_floor.py) per cell",
    )
    args = ap.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="replica-bench-"))
    try:
        await bench(args, workdir)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    if args.tls:
        print("| write | QD | mode | plain ops/s | plain MiB/s | TLS ops/s | TLS MiB/s | ratio |")
    elif args.floor:
        print(
            "| write | QD | mode | file ops/s | floor ops/s | replica ops/s | replica MiB/s "
            "| floor / file | replica / file | replica / floor |"
        )
    else:
        print(
            "| write | QD | mode | file ops/s | file MiB/s | replica ops/s | replica MiB/s "
            "| ratio |"
        )
    print("| --- " * (10 if args.floor else 8) + "|")

    proc = ReplicaProc(workdir, disk_size=SIZE + (256 << 20))
    proc.start()
    client = ReplicaClient(proc.host, proc.port, timeout=30, key=TEST_KEY)
    await client.open("bench", 1, SIZE, CHUNK)
    seq = 0

    async def r_write(off: int, data: memoryview, durable: bool) -> None:
        nonlocal seq
        seq += 1
        chunk, inner = divmod(off, CHUNK)
        await client.write("bench", 1, chunk, inner, data, seq=seq, durable=durable)

    async def r_flush() -> None:
        await client.flush("bench", 1)

    tls_proc: ReplicaProc | None = None
    if args.tls:
        from replica.tls import TlsFiles, client_context
        from tests.harness.tls import TestCA

        ca = TestCA(workdir / "pki", "bench-ca")
        srv, cl = ca.issue("server", ips=(proc.host,)), ca.issue("client")
        (workdir / "tls").mkdir(exist_ok=True)
        tls_proc = ReplicaProc(
            workdir / "tls",
            disk_size=SIZE + (256 << 20),
            extra_args=(
                "--tls-cert",
                str(srv.cert),
                "--tls-key",
                str(srv.key),
                "--tls-ca",
                str(ca.path),
            ),
        )
        tls_proc.start()
        ctx = client_context(TlsFiles(str(cl.cert), str(cl.key), str(ca.path)))
        tls_client = ReplicaClient(tls_proc.host, tls_proc.port, timeout=30, tls=ctx, key=TEST_KEY)
        await tls_client.open("bench", 1, SIZE, CHUNK)

        async def t_write(off: int, data: memoryview, durable: bool) -> None:
            nonlocal seq
            seq += 1
            chunk, inner = divmod(off, CHUNK)
            await tls_client.write("bench", 1, chunk, inner, data, seq=seq, durable=durable)

        async def t_flush() -> None:
            await tls_client.flush("bench", 1)

    floor: FloorClient | None = None
    if args.floor:
        floor_server = FloorServer(workdir / "floor.img", SIZE, free_port())
        floor = FloorClient()
        await floor.connect(floor_server.port)

    path = workdir / "plain.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SIZE)
    loop = asyncio.get_running_loop()

    # Every file write goes through a thread, as a file-backed server's would: a 4 KiB pwrite
    # straight on the loop would measure one syscall, not a serving path.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=16))

    def pwrite_sync(off: int, data: memoryview) -> None:
        os.pwrite(fd, data, off)
        os.fdatasync(fd)

    async def f_write(off: int, data: memoryview, durable: bool) -> None:
        if durable:
            await loop.run_in_executor(None, pwrite_sync, off, data)
        else:
            await loop.run_in_executor(None, os.pwrite, fd, data, off)

    async def f_flush() -> None:
        await loop.run_in_executor(None, os.fdatasync, fd)

    if args.tls:
        # The plain replica port is the reference; the TLS one is measured against it.
        f_write, f_flush, r_write, r_flush = r_write, r_flush, t_write, t_flush

    # Warm up both: every chunk allocated / every file block present, as in steady state.
    fill = memoryview(bytes(1 << 20))
    for off in range(0, SIZE, 1 << 20):
        await r_write(off, fill, False)
        await f_write(off, fill, False)
        if floor is not None:
            await floor.write(off, fill, False)
    await r_flush()
    await f_flush()

    rows = []
    for bs in (4096, 1 << 20):
        for qd in (1, 16):
            for mode in MODES:
                f_ops, f_mib = await run(f_write, f_flush, bs, qd, mode, args.seconds)
                r_ops, r_mib = await run(r_write, r_flush, bs, qd, mode, args.seconds)
                rows.append((bs, qd, mode, f_ops, f_mib, r_ops, r_mib))
                label = f"{bs >> 10} KiB" if bs < 1 << 20 else f"{bs >> 20} MiB"
                if floor is not None:
                    l_ops, _ = await run(floor.write, floor.flush, bs, qd, mode, args.seconds)
                    print(
                        f"| {label} | QD{qd} | {mode} | {f_ops:,.0f} | {l_ops:,.0f} | "
                        f"{r_ops:,.0f} | {r_mib:,.1f} | {l_ops / f_ops:.2f} | "
                        f"{r_ops / f_ops:.2f} | {r_ops / l_ops:.2f} |",
                        flush=True,
                    )
                    continue
                print(
                    f"| {label} | QD{qd} | {mode} | {f_ops:,.0f} | {f_mib:,.1f} | "
                    f"{r_ops:,.0f} | {r_mib:,.1f} | {r_ops / f_ops:.2f} |",
                    flush=True,
                )
    await client.close()
    proc.stop()
    if floor is not None:
        await floor.close()
        floor_server.stop()
    if tls_proc is not None:
        await tls_client.close()
        tls_proc.stop()
    os.close(fd)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
