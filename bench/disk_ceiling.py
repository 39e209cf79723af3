"""What this machine's disk allows replicated flushes, with no server in the way.

Every replica of a `bench/run` volume lives on the same disk, so a repl-3 flush asks that disk
for three times the writeback of nbdkit's one. This measures the ceiling that puts on the
flush-bound cells: P writer processes (1, then 3, as the replicas of a volume), each with its
own preallocated file on the disk under test, each repeating "N random 4 KiB pwrites, then one
fdatasync" (N=32: the fsync/32 workload; N=16: a group commit of a QD16 `--sync-writes`
volume), and each with 16 threads that every one pwrite a block and fdatasync it (nbdkit's
file plugin under `fuamode=force` at QD16). The rate of the slowest of the 3 against the lone
writer's is the most a repl-3 volume could reach against a one-copy reference on this disk, if
the servers cost no CPU.

    .venv/bin/python bench/disk_ceiling.py [--dir /var/tmp] [--seconds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import multiprocessing.synchronize
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZE = 256 << 20
BLOCK = 4096
PATTERNS = (  # name, writes per fdatasync, threads per writer
    ("32 writes, 1 fdatasync", 32, 1),
    ("16 writes, 1 fdatasync", 16, 1),
    ("16 threads: write + fdatasync each", 1, 16),
)


def prepare(path: Path) -> None:
    """A file whose every block is allocated and written: overwrites, as a replica's slots."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, SIZE)
        block = os.urandom(1 << 20)
        for off in range(0, SIZE, len(block)):
            os.pwrite(fd, block, off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def writer(
    path: Path,
    batch: int,
    threads: int,
    seconds: float,
    start: mp.synchronize.Event,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    """`threads` threads, each repeating `batch` random block writes and one fdatasync."""
    fd = os.open(path, os.O_RDWR)
    data = os.urandom(BLOCK)
    blocks = SIZE // BLOCK
    done = [0] * threads
    start.wait()
    t0 = time.monotonic()

    def loop(k: int) -> None:
        while time.monotonic() - t0 < seconds:
            for _ in range(batch):
                os.pwrite(fd, data, random.randrange(blocks) * BLOCK)
            os.fdatasync(fd)
            done[k] += batch

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(sum(done) / (time.monotonic() - t0))
    os.close(fd)


def measure(files: list[Path], batch: int, threads: int, seconds: float) -> list[float]:
    start = mp.Event()
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [
        mp.Process(target=writer, args=(f, batch, threads, seconds, start, out)) for f in files
    ]
    for p in procs:
        p.start()
    start.set()
    rates = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(60)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="a directory on the disk under test")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="disk-ceiling-", dir=args.dir) as d:
        files = [Path(d) / f"replica{i}" for i in range(3)]
        for f in files:
            prepare(f)
        for name, batch, threads in PATTERNS:
            alone = measure(files[:1], batch, threads, args.seconds)[0]
            three = min(measure(files, batch, threads, args.seconds))
            result[name] = {
                "one_writer": round(alone),
                "slowest_of_three": round(three),
                "ceiling_ratio": round(three / alone, 2),
            }
            if not args.json:
                print(
                    f"{name:34s} one writer {alone:8,.0f} writes/s, "
                    f"slowest of three {three:8,.0f} writes/s: ceiling {three / alone:.2f}",
                    flush=True,
                )
    if args.json:
        json.dump(result, sys.stdout)
        print()


if __name__ == "__main__":
    main()
