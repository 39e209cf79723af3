"""fio invocations and their parsed results, shared by `bench/fio_bench.py`.

One workload = one fio run (or one fio run with several jobs, summed by `group_reporting`).
Latencies are fio's completion latency percentiles (clat), in microseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    rw: str
    bs: str
    qd: int
    fsync: int = 0

    def fio_args(self) -> list[str]:
        args = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.qd}"]
        if self.fsync:
            args.append(f"--fsync={self.fsync}")
        return args


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq_write_1m_qd8", "seq write 1 MiB QD8", "write", "1m", 8),
    Workload("seq_read_1m_qd8", "seq read 1 MiB QD8", "read", "1m", 8),
    Workload("rand_write_4k_qd16", "rand write 4 KiB QD16", "randwrite", "4k", 16),
    Workload("rand_read_4k_qd16", "rand read 4 KiB QD16", "randread", "4k", 16),
    Workload(
        "rand_write_4k_qd16_fsync32", "rand write 4 KiB QD16 fsync/32", "randwrite", "4k", 16, 32
    ),
    Workload("rand_write_4k_qd1", "rand write 4 KiB QD1", "randwrite", "4k", 1),
    # A database commit: one write, then its flush, one at a time.
    Workload("commit_4k_qd1_fsync1", "commit: 4 KiB QD1, fsync each", "randwrite", "4k", 1, 1),
)


@dataclass(frozen=True)
class Result:
    mib_s: float
    iops: float
    p50_us: float
    p99_us: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def load() -> tuple[float, float, float]:
    return os.getloadavg()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds. Counted per
    I/O it is the figure the machine's load moves least: CPU is what 2 shared cores run out of."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICK


def thread_cpu(pid: int, *, main: str | None = None) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed) of one process; with `main`,
    the process's first thread (the event loop) is counted under that name."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            comm = (task / "comm").read_text().strip()
            if main is not None and task.name == str(pid):
                comm = main
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[comm] = out.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _direction(job: dict[str, Any], rw: str) -> dict[str, Any]:
    d: dict[str, Any] = job["read" if "read" in rw else "write"]
    return d


def parse(out: dict[str, Any], rw: str) -> Result:
    """Sum bandwidth and IOPS over jobs; latency percentiles from the first job (the same
    workload runs in each job, so they are alike) unless group reporting merged them."""
    jobs = out["jobs"]
    bw = sum(_direction(j, rw)["bw_bytes"] for j in jobs)
    iops = sum(_direction(j, rw)["iops"] for j in jobs)
    pct = _direction(jobs[0], rw)["clat_ns"].get("percentile", {})
    return Result(
        mib_s=round(bw / (1 << 20), 1),
        iops=round(iops, 0),
        p50_us=round(pct.get("50.000000", 0) / 1000, 1),
        p99_us=round(pct.get("99.000000", 0) / 1000, 1),
    )


def run_fio(
    targets: list[list[str]],
    w: Workload,
    *,
    size: str,
    runtime: float,
    time_based: bool = True,
    timeout: float = 600,
) -> Result:
    """Run `w` once, one job per entry of `targets` (each a list of fio target options,
    e.g. ["--ioengine=nbd", "--uri=nbd://..."])."""
    cmd = [
        "fio",
        "--output-format=json",
        "--group_reporting=0",
        f"--size={size}",
        "--randrepeat=0",
        "--norandommap",
        *w.fio_args(),
    ]
    if time_based:
        cmd += ["--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    for i, t in enumerate(targets):
        cmd += [f"--name=j{i}", *t]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    # fio may print warnings before the JSON document.
    text = res.stdout[res.stdout.index("{") :]
    return parse(json.loads(text), w.rw)


def precondition(target: list[str], size: str) -> None:
    """Write the whole region once so reads hit written data and no measured write pays
    first allocation."""
    w = Workload("pre", "precondition", "write", "1m", 8)
    run_fio([target], w, size=size, runtime=0, time_based=False)
