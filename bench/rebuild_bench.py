"""Rebuild throughput against the disk's sequential bandwidth (a benchmark, not a test).

  .venv/bin/python bench/rebuild_bench.py [--size 1G] [--profile DIR] [--floor]

Full rebuild: a repl-2 volume is written while one replica's node is down, so every chunk
must be copied when it returns. Incremental: the same node goes down again, 3 chunks change,
it returns. References: fio writing the same amount sequentially to a file on the same
filesystem, with O_DIRECT in 4 MiB writes (the disk's sequential bandwidth, the median of three
runs: the issue's aim is 70% of it) and buffered in 1 MiB writes with an fsync at the end; the
full rebuild's rate is given as a ratio to each, with the load average (the machine is shared).
With --profile DIR, py-spy records both nodes for the first seconds of the full rebuild (raw
profiles in DIR; bench/pyspy_summary.py folds them). With --floor, the least any two-process
copy of the same bytes can do here (bench/rebuild_floor.py) runs first, and the rebuild is also
given as a ratio to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fiorun import cpu_seconds, thread_cpu
from bench.rebuild_floor import copy_floor_mib_s
from pxcluster.units import parse_size
from tests.harness.cluster import Cluster
from tests.harness.etcd import EtcdServer


def disk_seq_write_mib_s(directory: Path, size: str, *, direct: bool) -> float:
    mode = ["--direct=1", "--bs=4M"] if direct else ["--end_fsync=1", "--bs=1M"]
    out = subprocess.run(
        [
            "fio",
            "--name=seq",
            f"--filename={directory / 'fio.img'}",
            "--rw=write",
            *mode,
            f"--size={size}",
            "--ioengine=psync",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    (directory / "fio.img").unlink()
    job = json.loads(out.stdout)["jobs"][0]["write"]
    return float(job["bw_bytes"]) / (1 << 20)


def pyspy(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [exe, "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-d", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def rebuild_op(c: Cluster, node_id: str) -> dict[str, Any]:
    ops = [o for o in c.etcd_get_prefix(f"/pxc/{c.name}/ops/") if o["node"] == node_id]
    return max(ops, key=lambda o: o["seconds"]) if ops else {}


def wait_rebuilt(c: Cluster, node_id: str, previous: dict[str, Any]) -> dict[str, Any]:
    """The node's rebuild op once it is done: polled with etcdctl (a Go binary), not the CLI,
    whose Python start-up every 0.1 s would take most of a CPU from the rebuild it measures."""
    box: list[dict[str, Any]] = []

    def done() -> bool:
        op = rebuild_op(c, node_id)
        if op.get("state") == "done" and op != previous:
            box.append(op)
            return True
        time.sleep(0.15)
        return False

    c.wait_for(done, 900, "rebuild")
    return box[0]


def wait_in_sync(c: Cluster, name: str) -> None:
    c.wait_for(
        lambda: all(
            r["state"] == "in_sync" for r in c.cli_json("volume", "inspect", name)["replicas"]
        ),
        900,
        "rebuild",
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--profile", type=Path, help="py-spy both nodes during the full rebuild")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also run the least any two-process copy can do (bench/rebuild_floor.py)",
    )
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pxc-rbbench-", dir="/var/tmp") as d:
        tmp = Path(d)
        # The VM's disk swings 1.1-2.1 GB/s from one fio run to the next: the median of three.
        refs = sorted(disk_seq_write_mib_s(tmp, args.size, direct=True) for _ in range(3))
        ref = refs[1]
        buffered = disk_seq_write_mib_s(tmp, args.size, direct=False)
        floor = copy_floor_mib_s(tmp, parse_size(args.size)) if args.floor else None
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        c = Cluster(tmp, etcd, name="bench", lease_ttl=2)
        try:
            for n in ("n1", "n2"):
                c.add_node(n, disk_size=4 << 30)
            n2_id = c.node_state("n2")["id"]
            c.cli("volume", "create", "rb", "--size", args.size, "--repl", "2")
            uri = c.cli("volume", "attach", "rb", "--node", "n1", "--wait").stdout.strip()
            c.kill("n2")
            size = parse_size(args.size)
            piece = 1 << 30  # qemu-io takes at most 2 GiB per request
            writes = [f"write -P 0x5a {o} {min(piece, size - o)}" for o in range(0, size, piece)]
            subprocess.run(
                ["qemu-io", "-f", "raw", *(a for w in writes for a in ("-c", w)), uri],
                check=True,
                capture_output=True,
                timeout=600,
            )
            t = time.monotonic()
            c.start("n2")
            pids = {n: c.nodes[n].proc.pid for n in ("n1", "n2")}  # type: ignore[union-attr]
            cpu0 = {n: cpu_seconds([pid]) for n, pid in pids.items()}
            threads0 = {n: thread_cpu(pid, main="loop") for n, pid in pids.items()}
            spies = []
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                for n in ("n1", "n2"):
                    proc = c.nodes[n].proc
                    assert proc is not None
                    spies.append(pyspy(proc.pid, args.profile / f"rebuild-{n}.txt", 4))
            full = wait_rebuilt(c, n2_id, {})
            wall = time.monotonic() - t
            cpu = {n: round(cpu_seconds([pid]) - cpu0[n], 2) for n, pid in pids.items()}
            threads = {
                n: {
                    name: round(s - threads0[n].get(name, 0.0), 2)
                    for name, s in sorted(thread_cpu(pid, main="loop").items())
                    if s - threads0[n].get(name, 0.0) >= 0.01
                }
                for n, pid in pids.items()
            }
            for spy in spies:
                spy.wait(60)
            wait_in_sync(c, "rb")
            c.wait_for(lambda: c.all_chunks_clean("n1", "rb"), 60, "chunks clean")
            c.kill("n2")
            subprocess.run(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    "write -P 1 0 4k",
                    "-c",
                    "write -P 2 100M 4k",
                    "-c",
                    "write -P 3 500M 4k",
                    uri,
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            c.start("n2")
            inc = wait_rebuilt(c, n2_id, full)
            wait_in_sync(c, "rb")
        finally:
            c.close()
            etcd.stop()
    mib = full["bytes_done"] / (1 << 20)
    rate = mib / full["seconds"]
    print(
        json.dumps(
            {
                "disk_seq_write_direct_4m_mib_s": round(ref, 1),
                "disk_seq_write_direct_4m_runs": [round(r) for r in refs],
                "disk_seq_write_buffered_1m_fsync_mib_s": round(buffered, 1),
                **(
                    {}
                    if floor is None
                    else {
                        "copy_floor_mib_s": round(floor, 1),
                        "copy_floor_ratio_to_disk": round(floor / ref, 2),
                    }
                ),
                "full_rebuild": {
                    "mib": round(mib),
                    "seconds": full["seconds"],
                    "mib_s": round(rate, 1),
                    "ratio_to_disk": round(rate / ref, 2),
                    "ratio_to_buffered_fsync": round(rate / buffered, 2),
                    **({} if floor is None else {"ratio_to_copy_floor": round(rate / floor, 2)}),
                    "restart_to_in_sync_s": round(wall, 2),
                    # from the restart on: n1 attach node and source, n2 the rebuilt target
                    "cpu_s": cpu,
                    "thread_cpu_s": threads,
                },
                "incremental_rebuild": {
                    "copied_chunks": inc["copied_chunks"],
                    "seconds": inc["seconds"],
                },
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
