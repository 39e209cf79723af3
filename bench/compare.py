"""Two `bench/run` results side by side: IOPS and server CPU per I/O, before and after.

  .venv/bin/python bench/compare.py BEFORE.json AFTER.json [--targets repl1,repl3]

IOPS moves with the machine's load (other suites share the 2 cores); CPU per I/O much less,
so it is the figure to judge a data-path change by.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fiorun import WORKLOADS


def compare(before: dict[str, Any], after: dict[str, Any], targets: list[str]) -> str:
    lines = [
        "| workload | target | IOPS before | IOPS after | CPU us/IO before | CPU us/IO after "
        "| load1 before / after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in WORKLOADS:
        for t in targets:
            b = before["cells"].get(t, {}).get(w.key)
            a = after["cells"].get(t, {}).get(w.key)
            if not a or not b:
                continue
            lines.append(
                f"| {w.label} | {t} | {b['iops']:,.0f} | {a['iops']:,.0f} | "
                f"{b.get('cpu_us_per_io', '-')} | {a.get('cpu_us_per_io', '-')} | "
                f"{b.get('load1', '-')} / {a.get('load1', '-')} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--targets", default="repl1,repl3,repl1_sync,repl3_sync")
    args = ap.parse_args()
    before = json.loads(args.before.read_text())
    after = json.loads(args.after.read_text())
    print(compare(before, after, args.targets.split(",")))


if __name__ == "__main__":
    main()
