"""Rebuild throughput against the disk's sequential bandwidth (a benchmark, not a test).

  .venv/bin/python bench/rebuild_bench.py [--size 1G]

Full rebuild: a repl-2 volume is written while one replica's node is down, so every chunk
must be copied when it returns. Incremental: the same node goes down again, 3 chunks change,
it returns. References: fio writing the same amount sequentially to a file on the same
filesystem, with O_DIRECT in 4 MiB writes (the disk's sequential bandwidth; the ratio is
against this one) and buffered in 1 MiB writes with an fsync at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def rebuild_op(c: Cluster, node: str) -> dict[str, Any]:
    node_id = c.node_state(node)["id"]
    ops = [o for o in c.etcd_get_prefix(f"/pxc/{c.name}/ops/") if o["node"] == node_id]
    return max(ops, key=lambda o: o["seconds"]) if ops else {}


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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pxc-rbbench-", dir="/var/tmp") as d:
        tmp = Path(d)
        ref = disk_seq_write_mib_s(tmp, args.size, direct=True)
        buffered = disk_seq_write_mib_s(tmp, args.size, direct=False)
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        c = Cluster(tmp, etcd, name="bench", lease_ttl=2)
        try:
            for n in ("n1", "n2"):
                c.add_node(n, disk_size=4 << 30)
            c.cli("volume", "create", "rb", "--size", args.size, "--repl", "2")
            uri = c.cli("volume", "attach", "rb", "--node", "n1", "--wait").stdout.strip()
            c.kill("n2")
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {args.size}", uri],
                check=True,
                capture_output=True,
                timeout=600,
            )
            t = time.monotonic()
            c.start("n2")
            wait_in_sync(c, "rb")
            wall = time.monotonic() - t
            full = rebuild_op(c, "n2")
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
            wait_in_sync(c, "rb")
            inc = rebuild_op(c, "n2")
        finally:
            c.close()
            etcd.stop()
    mib = full["bytes_done"] / (1 << 20)
    rate = mib / full["seconds"]
    print(
        json.dumps(
            {
                "disk_seq_write_direct_4m_mib_s": round(ref, 1),
                "disk_seq_write_buffered_1m_fsync_mib_s": round(buffered, 1),
                "full_rebuild": {
                    "mib": round(mib),
                    "seconds": full["seconds"],
                    "mib_s": round(rate, 1),
                    "ratio_to_disk": round(rate / ref, 2),
                    "restart_to_in_sync_s": round(wall, 2),
                },
                "incremental_rebuild": {
                    "copied_chunks": inc["copied_chunks"],
                    "seconds": inc["seconds"],
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
