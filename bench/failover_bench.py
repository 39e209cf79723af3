"""Failover and reconcile timings on this machine (a benchmark, not a test).

Starts etcd and three node processes with the default 5 s lease TTL, then measures:
  1. kill -9 of the attach node -> the volume served again on another node (nbdinfo answers);
  2. the same with 1 GiB of dirty chunks (written just before the kill): the reconcile time
     the new engine spends making every dirty chunk identical on all replicas (invariant 5).
  3. a clean hand-off (`volume failover --drill`).

  .venv/bin/python bench/failover_bench.py [--size 1G] [--ttl 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.cluster import Cluster
from tests.harness.etcd import EtcdServer


def serving(uri: str) -> bool:
    return (
        subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=30).returncode == 0
    )


def kill_and_time(c: Cluster, name: str, attach_on: str) -> dict[str, object]:
    c.kill(attach_on)
    t0 = time.monotonic()
    while True:
        info = c.cli_json("volume", "inspect", name)
        if (
            info["attached_node"] not in (None, attach_on)
            and info["nbd_uri"]
            and serving(info["nbd_uri"])
        ):
            break
        if time.monotonic() - t0 > 120:
            raise SystemExit("no failover within 120 s")
        time.sleep(0.05)
    total = time.monotonic() - t0
    info = c.cli_json("volume", "inspect", name)
    return {"kill_to_serving_s": round(total, 2), **info["last_failover"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--ttl", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="pxc-fobench-") as d:
        tmp = Path(d)
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        c = Cluster(tmp, etcd, name="bench", lease_ttl=args.ttl)
        try:
            for n in ("n1", "n2", "n3"):
                # A long clean-after keeps every chunk written below in the dirty log.
                c.add_node(n, disk_size=4 << 30, extra=("--clean-after", "600"))
            c.cli("volume", "create", "fa", "--size", "256M", "--repl", "3")
            c.cli("volume", "attach", "fa", "--node", "n1", "--wait")
            time.sleep(1)
            results["idle_volume"] = kill_and_time(c, "fa", "n1")
            c.start("n1")

            c.cli("volume", "create", "fb", "--size", args.size, "--repl", "3")
            uri = c.cli("volume", "attach", "fb", "--node", "n2", "--wait").stdout.strip()
            t = time.monotonic()
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {args.size}", uri],
                check=True,
                capture_output=True,
                timeout=600,
            )
            write_s = time.monotonic() - t
            results["dirty_volume"] = {
                "size": args.size,
                "write_s": round(write_s, 2),
                **kill_and_time(c, "fb", "n2"),
            }
            c.start("n2")
            time.sleep(2)
            out = c.cli("volume", "failover", "fa", "--drill", "--json").stdout
            results["drill"] = json.loads(out)["last_failover"]
        finally:
            c.close()
            etcd.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
