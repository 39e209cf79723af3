#!/usr/bin/env python3
"""I/O limits, checked from outside: fio against a volume with an IOPS limit and against one
with a bandwidth limit must stay within 10% of the limit. A benchmark, not a test:
its verdict depends on the machine having the headroom to exceed the limit in the first place,
so it also runs each workload unlimited and reports that rate.

    .venv/bin/python bench/limits_bench.py [--seconds 10] [--iops 300] [--bw 16M] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pxcluster.units import parse_size
from tests.harness.cluster import Cluster
from tests.harness.etcd import EtcdServer


def fio(uri: str, rw: str, bs: str, qd: int, seconds: float) -> dict[str, float]:
    cmd = [
        "fio",
        "--output-format=json",
        "--name=limits",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--size=64m",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={qd}",
        "--time_based=1",
        f"--runtime={seconds}",
        "--ramp_time=1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed: {res.stderr.strip()[-400:]}")
    job = json.loads(res.stdout[res.stdout.index("{") :])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"iops": float(side["iops"]), "bw": float(side["bw_bytes"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--iops", type=int, default=300)
    ap.add_argument("--bw", default="16M")
    ap.add_argument("--json", dest="json_out", default="")
    args = ap.parse_args()
    bw = parse_size(args.bw)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pxc-limits-") as d:
        tmp = Path(d)
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        c = Cluster(tmp, etcd, name="limits", lease_ttl=5)
        try:
            for n in ("n1", "n2"):
                c.add_node(n)
            c.cli("volume", "create", "lim", "--size", "64M", "--repl", "2")
            uri = c.cli("volume", "attach", "lim", "--node", "n1", "--wait").stdout.strip()
            fio(uri, "write", "1m", 4, 2)  # allocate every chunk first
            cases = [
                ("iops", "randwrite", "4k", 16, ("--iops-limit", str(args.iops)), args.iops),
                ("iops", "randread", "4k", 16, ("--iops-limit", str(args.iops)), args.iops),
                ("bw", "write", "256k", 8, ("--bw-limit", args.bw), bw),
                ("bw", "read", "256k", 8, ("--bw-limit", args.bw), bw),
            ]
            for kind, rw, bs, qd, flags, limit in cases:
                c.cli("volume", "update", "lim", "--iops-limit", "0", "--bw-limit", "0")
                free = fio(uri, rw, bs, qd, args.seconds / 2)[kind]
                c.cli("volume", "update", "lim", *flags)
                got = fio(uri, rw, bs, qd, args.seconds)[kind]
                ratio = got / limit
                rows.append(
                    {
                        "limit": kind,
                        "workload": f"{rw} {bs} QD{qd}",
                        "limit_value": limit,
                        "unlimited": round(free),
                        "limited": round(got),
                        "ratio": round(ratio, 3),
                        "within_10pct": abs(ratio - 1) <= 0.10,
                        "headroom": free > limit * 1.1,
                    }
                )
        finally:
            c.close()
            etcd.stop()
    print("| limit | workload | limit value | unlimited | limited | limited/limit | within 10% |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        unit = "IOPS" if r["limit"] == "iops" else "B/s"
        verdict = "yes" if r["within_10pct"] else ("no" if r["headroom"] else "no headroom")
        print(
            f"| {r['limit']} | {r['workload']} | {r['limit_value']} {unit} | {r['unlimited']} | "
            f"{r['limited']} | {r['ratio']} | {verdict} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    sys.exit(0 if all(r["within_10pct"] or not r["headroom"] for r in rows) else 1)


if __name__ == "__main__":
    main()
