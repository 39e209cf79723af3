"""First-write-after-snapshot cost (aim: under 2x a normal write), two levels.

(a) Chunk store, in process: replica.chunkstore.ChunkStore over a sparse file (OSFile) under
    /var/tmp, no network. Per-write latency (mean, p99) of
      - 4 KiB writes into chunks that exist and are in the dirty-chunk log (normal: a pwrite),
      - the same into chunks that left the log (the engine cleans idle chunks after 2 s: the
        next write journals a dirty record and syncs it first),
      - the first 4 KiB write into a chunk with a snapshot below and no head entry (allocates
        a head entry: a zeroed slot, a journaled dirty record synced, no chunk copy),
      - 4 KiB into a new block of a chunk whose head entry exists, and the same block again,
      - 512-byte writes, normal and after a snapshot (read-modify-write of one block from the
        layers below), first in the chunk and with the head entry there,
    each without and with a flush after every write. Every round takes a new snapshot (so
    the stack grows by one layer a round and the pool of zeroed slots runs dry, as in a storm
    of first writes), then writes one block into each chunk.
(b) Cluster: etcd + 3 node processes (tests.harness, as bench/failover_bench.py), one repl-3
    volume written full (fio), then:
      - per-write latency through NBD (pxcluster.nbd.client, QD1, 4 KiB, one write per chunk,
        random block): chunks in the dirty log, idle chunks, first write after a snapshot,
        the same offsets again;
      - fio 4 KiB random writes QD1 for N seconds: before any snapshot, right after a
        snapshot, and again over the same offsets (same seed, same number of I/Os).

    .venv/bin/python bench/snapshot_bench.py [--quick] [--dir /var/tmp] [--json FILE]
    .venv/bin/python bench/snapshot_bench.py --only store|cluster
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fiorun import load, precondition  # noqa: E402
from pxcluster.nbd.client import NbdClient  # noqa: E402
from replica.chunkstore import ChunkStore  # noqa: E402
from replica.fileio import OSFile  # noqa: E402
from tests.harness.cluster import Cluster  # noqa: E402
from tests.harness.etcd import EtcdServer  # noqa: E402

MiB = 1 << 20
CHUNK = 4 * MiB
BLOCK = 4096
BLOCKS = CHUNK // BLOCK


def log(msg: str) -> None:
    la = ", ".join(f"{x:.2f}" for x in load())
    print(f"[{time.strftime('%H:%M:%S')} load {la}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    level: str
    label: str
    flush: bool
    lat_us: list[float] = field(default_factory=list)
    ref: str = ""  # label of the row this one is compared with (same level and flush mode)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.lat_us) if self.lat_us else float("nan")

    @property
    def p99(self) -> float:
        if not self.lat_us:
            return float("nan")
        s = sorted(self.lat_us)
        return s[min(len(s) - 1, int(len(s) * 0.99))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "label": self.label,
            "flush": self.flush,
            "n": len(self.lat_us),
            "mean_us": round(self.mean, 1),
            "p99_us": round(self.p99, 1),
            "ref": self.ref,
            **self.extra,
        }


# ----- (a) chunk store, in process


def make_disk(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)


async def store_level(workdir: Path, chunks: int, rounds: int) -> list[Row]:
    disk = workdir / "store.img"
    # base volume + two snapshotted volumes + one head entry per chunk, round and mode; sparse.
    slots = chunks * (3 + 4 * rounds) + 64
    await asyncio.to_thread(make_disk, disk, slots * CHUNK + 256 * MiB)
    f = OSFile.open(str(disk))
    ChunkStore.format(f, cluster_id="bench", node_id="n", disk_id="d", chunk_size=CHUNK)
    store = ChunkStore.open(f, cluster_id="bench")
    size = chunks * CHUNK
    rng = random.Random(7)
    seq = 0
    rows: list[Row] = []
    try:
        fill = bytes(MiB)
        for vol in ("base", "snap4k", "snap512"):
            await store.open_volume(vol, 1, size)
            for off in range(0, size, MiB):
                seq += 1
                await store.write(vol, 1, off // CHUNK, off % CHUNK, fill, seq=seq)
        await store.flush()

        async def timed(vol: str, chunk: int, offset: int, data: bytes, flush: bool) -> float:
            nonlocal seq
            seq += 1
            t = time.perf_counter()
            await store.write(vol, 1, chunk, offset, data, seq=seq)
            if flush:
                await store.flush()
            return (time.perf_counter() - t) * 1e6

        data4k, data512 = os.urandom(BLOCK), os.urandom(512)
        snaps = 0

        async def snapshot(vol: str) -> None:
            nonlocal snaps
            snaps += 1
            await store.snapshot_create(vol, 1, f"s{snaps}", f"s{snaps}", time.time())

        async def normal(row: Row, data: bytes, flush: bool) -> None:
            # As many writes as a pass over every chunk, at random blocks of the base volume.
            for _ in range(chunks):
                b = rng.randrange(chunks * BLOCKS)
                off = b % BLOCKS * BLOCK + (rng.randrange(8) * 512 if len(data) < BLOCK else 0)
                row.lat_us.append(await timed("base", b // BLOCKS, off, data, flush))

        for flush in (False, True):
            log(f"store: {'flush after every write' if flush else 'no flush'}")
            n4 = Row("store", "4 KiB normal (chunk in the dirty log)", flush)
            n512 = Row("store", "512 B normal (chunk in the dirty log)", flush)
            r4, r512 = n4.label, n512.label
            idle = Row("store", "4 KiB into an idle chunk (dirty record first)", flush, ref=r4)
            first4 = Row("store", "4 KiB first after snapshot (new head entry)", flush, ref=r4)
            newblk4 = Row("store", "4 KiB after snapshot, head entry there, new block", flush)
            newblk4.ref = r4
            again4 = Row("store", "4 KiB after snapshot, same block again", flush, ref=r4)
            first512 = Row("store", "512 B first after snapshot (new head entry + RMW)", flush)
            first512.ref = r512
            newblk512 = Row("store", "512 B after snapshot, head entry there, new block", flush)
            newblk512.ref = r512
            await normal(Row("", "", flush), data4k, flush)  # warm-up, not counted
            # Every round measures the references too: all rows see the same conditions.
            for _ in range(rounds):
                await normal(n4, data4k, flush)
                await normal(n512, data512, flush)
                await store.mark_clean("base", 1, list(range(chunks)))
                for ch in rng.sample(range(chunks), chunks):
                    off = rng.randrange(BLOCKS) * BLOCK
                    idle.lat_us.append(await timed("base", ch, off, data4k, flush))
                await snapshot("snap4k")
                picks = {ch: rng.sample(range(BLOCKS), 2) for ch in range(chunks)}
                for row, which in ((first4, 0), (newblk4, 1), (again4, 0)):
                    for ch in rng.sample(range(chunks), chunks):
                        off = picks[ch][which] * BLOCK
                        row.lat_us.append(await timed("snap4k", ch, off, data4k, flush))
                await snapshot("snap512")
                for row, which in ((first512, 0), (newblk512, 1)):
                    for ch in rng.sample(range(chunks), chunks):
                        off = picks[ch][which] * BLOCK + rng.randrange(8) * 512
                        row.lat_us.append(await timed("snap512", ch, off, data512, flush))
            rows += [n4, idle, first4, newblk4, again4, n512, first512, newblk512]
        # Sanity: the oldest snapshot still reads as the fill (zeros); the layers are all there.
        assert store.read("snap4k", 1, 0, 0, CHUNK, snapshot="s1") == bytes(CHUNK)
        assert len(store.snapshots("snap4k")) == 2 * rounds
    finally:
        await store.close()
        f.close()
        disk.unlink()
    return rows


# ----- (b) cluster


def nbd_target(uri: str) -> list[str]:
    return ["--ioengine=nbd", f"--uri={uri}"]


def fio_randwrite(
    uri: str, size: int, seed: int, *, seconds: float = 0, number_ios: int = 0
) -> dict[str, Any]:
    """4 KiB random writes QD1 with a fixed seed (the same seed writes the same offsets)."""
    cmd = [
        "fio",
        "--output-format=json",
        "--name=snap",
        *nbd_target(uri),
        f"--size={size}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=1",
        "--norandommap",
        "--randrepeat=1",
        f"--randseed={seed}",
    ]
    cmd += ["--time_based=1", f"--runtime={seconds}"] if seconds else [f"--number_ios={number_ios}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    w = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {
        "ios": int(w["total_ios"]),
        "iops": round(float(w["iops"])),
        "mean_us": round(w["lat_ns"]["mean"] / 1000, 1),
        "p50_us": round(pct.get("50.000000", 0) / 1000, 1),
        "p99_us": round(pct.get("99.000000", 0) / 1000, 1),
        "max_us": round(w["lat_ns"]["max"] / 1000, 1),
    }


async def nbd_pass(uri: str, offsets: list[int], data: bytes) -> list[float]:
    client = await NbdClient.connect(uri)
    out = []
    try:
        for off in offsets:
            t = time.perf_counter()
            await client.write(off, data)
            out.append((time.perf_counter() - t) * 1e6)
    finally:
        await client.close()
    return out


def cluster_level(
    tmp: Path, size: int, seconds: float, reps: int
) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    etcd = EtcdServer(tmp / "etcd")
    etcd.start()
    c = Cluster(tmp, etcd, name="snapbench", lease_ttl=5)
    rng = random.Random(11)
    chunks = size // CHUNK
    data = os.urandom(BLOCK)
    try:
        for n in ("n1", "n2", "n3"):
            c.add_node(n, disk_size=4 * size + (1 << 30))
        c.cli("volume", "create", "sb", "--size", f"{size // MiB}M", "--repl", "3")
        uri = c.cli("volume", "attach", "sb", "--node", "n1", "--wait").stdout.strip()
        log(f"cluster: filling {size // MiB} MiB (repl 3)")
        precondition(nbd_target(uri), f"{size // MiB}m")
        log(f"cluster: fio before any snapshot ({seconds:.0f} s)")
        fio: dict[str, dict[str, Any]] = {}
        fio["before any snapshot"] = fio_randwrite(uri, size, 1, seconds=seconds)
        normal = Row("cluster", "NBD 4 KiB, chunks in the dirty log", False)
        idle = Row("cluster", "NBD 4 KiB into idle chunks (dirty record first)", False)
        idle.ref = normal.label
        first = Row("cluster", "NBD 4 KiB first after snapshot (new head entries)", False)
        first.ref = normal.label
        again = Row("cluster", "NBD 4 KiB same offsets again", False, ref=normal.label)
        for r in range(reps):
            offs = [ch * CHUNK + rng.randrange(BLOCKS) * BLOCK for ch in range(chunks)]
            rng.shuffle(offs)
            # Warm: every chunk written just now, so all of them are in the dirty log.
            asyncio.run(nbd_pass(uri, offs, data))
            normal.lat_us += asyncio.run(nbd_pass(uri, offs, data))
            time.sleep(3.5)  # the engine's cleaner (--clean-after 2 s) empties the dirty log
            offs = [ch * CHUNK + rng.randrange(BLOCKS) * BLOCK for ch in range(chunks)]
            rng.shuffle(offs)
            idle.lat_us += asyncio.run(nbd_pass(uri, offs, data))
            t = time.monotonic()
            c.cli("volume", "snapshot", "create", "sb", "--name", f"p{r}")
            log(f"cluster: snapshot p{r} took {time.monotonic() - t:.2f} s (CLI round trip)")
            offs = [ch * CHUNK + rng.randrange(BLOCKS) * BLOCK for ch in range(chunks)]
            rng.shuffle(offs)
            first.lat_us += asyncio.run(nbd_pass(uri, offs, data))
            again.lat_us += asyncio.run(nbd_pass(uri, offs, data))
        c.cli("volume", "snapshot", "create", "sb", "--name", "fio")
        log(f"cluster: fio right after a snapshot ({seconds:.0f} s)")
        after = fio_randwrite(uri, size, 7, seconds=seconds)
        fio["right after a snapshot"] = after
        log(f"cluster: fio over the same offsets again ({after['ios']} I/Os)")
        fio["same offsets again"] = fio_randwrite(uri, size, 7, number_ios=after["ios"])
        # How many of the right-after run's writes were first writes into a chunk.
        fio["right after a snapshot"]["chunks"] = chunks
        return [normal, idle, first, again], fio
    finally:
        c.close()
        etcd.stop()


# ----- report


def table(rows: list[Row]) -> None:
    by = {(r.level, r.label, r.flush): r for r in rows}
    print("| level | write | flush | n | mean µs | p99 µs | ratio mean | ratio p99 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = by.get((r.level, r.ref, r.flush)) if r.ref else None
        rm = f"{r.mean / ref.mean:.2f}" if ref else "1 (ref)"
        rp = f"{r.p99 / ref.p99:.2f}" if ref else "1 (ref)"
        fl = "yes" if r.flush else "no"
        print(
            f"| {r.level} | {r.label} | {fl} | {len(r.lat_us)} | {r.mean:,.0f} | {r.p99:,.0f} "
            f"| {rm} | {rp} |"
        )


def fio_table(fio: dict[str, dict[str, Any]]) -> None:
    base = fio["before any snapshot"]
    print()
    print(
        "| fio 4 KiB randwrite QD1 | I/Os | IOPS | mean µs | p50 µs | p99 µs | max µs "
        "| IOPS ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, v in fio.items():
        print(
            f"| {k} | {v['ios']:,} | {v['iops']:,} | {v['mean_us']:,.0f} | {v['p50_us']:,.0f} "
            f"| {v['p99_us']:,.0f} | {v['max_us']:,.0f} | {v['iops'] / base['iops']:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~30 s smoke run")
    ap.add_argument("--only", choices=("store", "cluster"), default="")
    ap.add_argument("--dir", default="/var/tmp", help="where the disks go (not a tmpfs)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        st_chunks, st_rounds = 32, 2
        cl_size, cl_seconds, cl_reps = 128 * MiB, 3.0, 1
    else:
        st_chunks, st_rounds = 64, 6
        cl_size, cl_seconds, cl_reps = 512 * MiB, 10.0, 2
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "load_start": [round(x, 2) for x in load()],
    }
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="pxc-snapbench-", dir=args.dir))
    try:
        if args.only != "cluster":
            import uvloop

            t = time.monotonic()
            rows += uvloop.run(store_level(tmp, st_chunks, st_rounds))
            result["store_seconds"] = round(time.monotonic() - t, 1)
        if args.only != "store":
            t = time.monotonic()
            cl_rows, fio = cluster_level(tmp, cl_size, cl_seconds, cl_reps)
            rows += cl_rows
            result["fio"] = fio
            result["cluster_seconds"] = round(time.monotonic() - t, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["rows"] = [r.to_dict() for r in rows]
    result["load_end"] = [round(x, 2) for x in load()]
    result["seconds"] = round(time.monotonic() - t0, 1)
    table(rows)
    if "fio" in result:
        fio_table(result["fio"])
    print(f"\n{result['seconds']} s; load {result['load_start']} -> {result['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
