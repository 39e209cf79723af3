"""NBD front end alone: our server over a MemoryExport vs nbdkit's memory plugin.

Both serve RAM, so the difference is the protocol handling (Python + uvloop vs C).
Runs fio's nbd engine against each, same workloads, and prints IOPS and the ratio.

    .venv/bin/python bench/nbd_memory_bench.py [--runtime 6] [--size 256M]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time

WORKLOADS: list[tuple[str, list[str]]] = [
    ("randwrite 4k QD16", ["--rw=randwrite", "--bs=4k", "--iodepth=16"]),
    ("randread 4k QD16", ["--rw=randread", "--bs=4k", "--iodepth=16"]),
    ("randwrite 4k QD1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("write 1M QD8", ["--rw=write", "--bs=1M", "--iodepth=8"]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def _serve(port: int, size: int) -> None:
    import uvloop

    from pxcluster.nbd import ExportRegistry, MemoryExport, NbdServer

    async def main() -> None:
        registry = ExportRegistry()
        registry.add(MemoryExport("bench", size))
        server = NbdServer(registry)
        await server.start_tcp("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def _fio(uri: str, args: list[str], runtime: int, size: str) -> tuple[float, float]:
    out = subprocess.run(
        [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--size={size}",
            "--time_based",
            f"--runtime={runtime}",
            "--output-format=json",
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=runtime + 60,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    return float(side["iops"]), float(side["bw_bytes"]) / (1 << 20)


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runtime", type=int, default=6)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, _parse_size(args.size))
        return 0
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1

    ours_port, ref_port = _free_port(), _free_port()
    ours = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(ours_port), "--size", args.size]
    )
    ref = subprocess.Popen(
        ["nbdkit", "-f", "-p", str(ref_port), "-i", "127.0.0.1", "memory", args.size]
    )
    try:
        _wait_port(ours_port)
        _wait_port(ref_port)
        print(f"{'workload':<20} {'nbdkit memory':>16} {'pxcluster nbd':>16} {'ratio':>7}")
        for name, fio_args in WORKLOADS:
            ref_iops, ref_bw = _fio(
                f"nbd://127.0.0.1:{ref_port}/", fio_args, args.runtime, args.size
            )
            our_iops, our_bw = _fio(
                f"nbd://127.0.0.1:{ours_port}/bench", fio_args, args.runtime, args.size
            )
            print(
                f"{name:<20} {ref_iops:>9.0f} IOPS  {our_iops:>9.0f} IOPS  "
                f"{our_iops / ref_iops:>6.2f}   ({ref_bw:.0f} vs {our_bw:.0f} MiB/s)",
                flush=True,
            )
    finally:
        for proc in (ours, ref):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
