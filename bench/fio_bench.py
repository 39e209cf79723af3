"""Our volumes beside two references and native, in one run (a benchmark, not a test).

  bench/run [--quick] [--runtime 6] [--rounds 1] [--size 256m] [--no-extras] [--profile]

Sets up etcd + 3 node processes on loopback (disks: sparse files under /var/tmp), then runs
fio against (each workload against every target in turn, so a target and its reference
run under the same load):
  native      fio libaio O_DIRECT on a plain file on the same filesystem
  nbdkit      `nbdkit file` on a plain file (honours FLUSH and FUA), fio nbd engine
  nbdkit_fua  the same with `--filter=fua fuamode=force` (every write durable)
  quorum      the C replication peer: qemu-nbd exporting QEMU's quorum driver (vote threshold
              2) over three `nbdkit file` servers, each on its own file: repl-3's topology
  quorum_fua  the same over nbdkit servers with fuamode=force (against repl3_sync)
  repl1/3     default volumes, fio nbd engine
  repl1/3_sync volumes created with --sync-writes
  repl1/3_enc volumes created with --encrypted --key-file (ratios against repl1/3: the cost
              of AES-XTS in the engine alone)
Each target is preconditioned (its whole region written once) before the workloads; with
--rounds N each workload's targets run N times over and each cell is its median-IOPS round
(the JSON keeps every round's IOPS). Then the
scaling curve (repl-3 4 KiB random-write IOPS for 1, 2, 4, 8 volumes, one fio job per volume),
then `bench/failover_bench.py` and `bench/rebuild_bench.py` (own clusters). Prints the table and
the issue's targets; writes JSON and a PNG under bench/results/.
With --profile: py-spy on the attach node and on a replica node under the repl-3 4 KiB QD16 and
1 MiB sequential write workloads (raw folded stacks under bench/results/profile-*/);
--profile-repl and --profile-workloads choose another volume and other workloads.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.fiorun import (  # noqa: E402
    WORKLOADS,
    Workload,
    cpu_seconds,
    load,
    precondition,
    run_fio,
    thread_cpu,
)
from tests.harness.cluster import Cluster  # noqa: E402
from tests.harness.etcd import EtcdServer, free_port, wait_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PY = sys.executable


def log(msg: str) -> None:
    la = ", ".join(f"{x:.2f}" for x in load())
    print(f"[{time.strftime('%H:%M:%S')} load {la}] {msg}", file=sys.stderr, flush=True)


class Nbdkit:
    def __init__(self, img: Path, size: int, *, fua: bool) -> None:
        with open(img, "wb") as f:
            f.truncate(size)
        self.port = free_port()
        cmd = ["nbdkit", "-f", "-p", str(self.port), "-i", "127.0.0.1"]
        if fua:
            cmd += ["--filter=fua"]
        cmd += ["file", str(img)]
        if fua:
            cmd += ["fuamode=force"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, 20)

    @property
    def target(self) -> list[str]:
        return ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{self.port}/"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Quorum:
    """qemu-nbd serving QEMU's quorum block driver over three nbdkit file servers."""

    def __init__(self, tmp: Path, name: str, size: int, *, fua: bool) -> None:
        self.kits = [Nbdkit(tmp / f"{name}-{i}.img", size, fua=fua) for i in range(3)]
        self.port = free_port()
        opts = "driver=quorum,vote-threshold=2,read-pattern=fifo"
        for i, k in enumerate(self.kits):
            opts += (
                f",children.{i}.driver=nbd,children.{i}.server.type=inet"
                f",children.{i}.server.host=127.0.0.1,children.{i}.server.port={k.port}"
            )
        cmd = ["qemu-nbd", "-t", "-e", "16", "-p", str(self.port), "-b", "127.0.0.1"]
        cmd += ["-x", "q3", "--image-opts", opts]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, 20)

    @property
    def target(self) -> list[str]:
        return ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{self.port}/q3"]

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *(k.proc.pid for k in self.kits)]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for k in self.kits:
            k.close()


def nbd_target(uri: str) -> list[str]:
    return ["--ioengine=nbd", f"--uri={uri}"]


def measure_all(
    up: dict[str, tuple[list[str], list[int]]], args: argparse.Namespace, cells: report.Cells
) -> dict[str, dict[str, list[float]]]:
    """Each workload against every target in turn (workload-major), so a target and its
    reference run minutes apart at most, under the same load; with `--rounds N` that sequence
    N times over, each cell then the round with the median IOPS (this VM's cells swing by
    tens of percent between minutes, the references too). With pids, also the CPU those
    processes (our node processes, or nbdkit) spent per I/O. Returns every round's IOPS."""
    every: dict[str, dict[str, list[float]]] = {name: {} for name in up}
    for name, (target, _) in up.items():
        precondition(target, args.size)
        cells[name] = {}
    for w in WORKLOADS:
        if args.workloads and w.key not in args.workloads:
            continue
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in up}
        for _ in range(args.rounds):
            for name, (target, pids) in up.items():
                rounds[name].append(measure_one(target, pids, w, args, name))
        for name, got in rounds.items():
            got.sort(key=lambda cell: cell["iops"])
            cells[name][w.key] = got[len(got) // 2]
            every[name][w.key] = [cell["iops"] for cell in got]
    return every


def measure_one(
    target: list[str], pids: list[int], w: Workload, args: argparse.Namespace, name: str
) -> dict[str, float]:
    # The page cache the cells before left dirty is written back now, not by the kernel's
    # flusher (30 s on) in the middle of whichever cell runs then.
    os.sync()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    r = run_fio([target], w, size=args.size, runtime=args.runtime)
    cpu, wall = cpu_seconds(pids) - cpu0, time.monotonic() - t0
    cell = {**r.to_dict()}
    if pids:
        # fio's ramp time and start-up are inside `wall`: scale the I/O count to it.
        cell["cpu_us_per_io"] = round(1e6 * cpu / max(1.0, r.iops * wall), 1)
    cell["load1"] = round(load()[0], 2)
    log(
        f"{name:11} {w.label:32} {r.mib_s:9.1f} MiB/s {r.iops:8.0f} IOPS p50 "
        f"{r.p50_us:7.0f} us p99 {r.p99_us:7.0f} us cpu/io {cell.get('cpu_us_per_io', '-')}"
    )
    return cell


def create_attached(
    c: Cluster,
    name: str,
    size: str,
    repl: int,
    *,
    sync: bool = False,
    node: str | None = None,
    key_file: Path | None = None,
) -> str:
    extra = ["--sync-writes"] if sync else []
    if key_file is not None:
        extra += ["--encrypted", "--key-file", str(key_file)]
    c.cli("volume", "create", name, "--size", size, "--repl", str(repl), *extra)
    if node is None:
        # Attach where a replica lives (as `pick_attach_node` would): repl-1 reads stay local.
        reps = c.inspect(name)["replicas"]
        node = str(reps[0]["node"])
        if node not in c.nodes:
            by_id = {x["id"]: x["name"] for x in c.cli_json("node", "list")}
            node = by_id.get(node, "n1")
    return c.cli("volume", "attach", name, "--node", node, "--wait").stdout.strip()


def scaling(c: Cluster, args: argparse.Namespace) -> dict[str, float]:
    w = next(x for x in WORKLOADS if x.key == "rand_write_4k_qd16")
    out: dict[str, float] = {}
    uris: list[str] = []
    for n in args.scale:
        while len(uris) < n:
            i = len(uris)
            uri = create_attached(c, f"s{i}", args.size, 3, node=f"n{i % 3 + 1}")
            precondition(nbd_target(uri), args.size)
            uris.append(uri)
        r = run_fio([nbd_target(u) for u in uris[:n]], w, size=args.size, runtime=args.runtime)
        out[str(n)] = r.iops
        log(f"scaling {n} volumes: {r.iops:.0f} IOPS total")
    return out


def pyspy(pid: int, out: Path, seconds: int, native: bool = False) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    extra = ["--native", "--idle"] if native else []
    return subprocess.Popen(
        [exe, "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-d", str(seconds), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile(c: Cluster, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    d = RESULTS / f"profile-{stamp}-repl{args.profile_repl}{'-sync' if args.profile_sync else ''}"
    d.mkdir(parents=True, exist_ok=True)
    uri = create_attached(
        c, "prof", args.size, args.profile_repl, node="n1", sync=args.profile_sync
    )
    precondition(nbd_target(uri), args.size)
    info: dict[str, Any] = {}
    for key in args.profile_workloads.split(","):
        w = next(x for x in WORKLOADS if x.key == key)
        procs = [
            pyspy(p.proc.pid, d / f"{key}-{n}.txt", 5, args.profile_native)
            for n, p in c.nodes.items()
            if n in ("n1", "n2") and p.proc is not None
        ]
        pids = {n: p.proc.pid for n, p in c.nodes.items() if p.proc is not None}
        before = {n: thread_cpu(pid) for n, pid in pids.items()}
        r = run_fio([nbd_target(uri)], w, size=args.size, runtime=7)
        after = {n: thread_cpu(pid) for n, pid in pids.items()}
        for p in procs:
            p.wait(60)
        info[key] = r.to_dict()
        # CPU seconds per thread name over the run: what py-spy cannot tell apart (a thread
        # blocked in C, or running there).
        info[key]["thread_cpu_s"] = {
            n: {t: round(v - before[n].get(t, 0.0), 2) for t, v in after[n].items()} for n in pids
        }
        log(f"profiled {key}: {r.iops:.0f} IOPS")
    info["dir"] = str(d)
    return info


def sub_bench(script: str, size: str, *extra: str) -> Any:
    res = subprocess.run(
        [PY, str(ROOT / "bench" / script), "--size", size, *extra],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-400:]}
    return json.loads(res.stdout[res.stdout.index("{") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s, 64 MiB, no extras")
    ap.add_argument("--runtime", type=float, default=6)
    ap.add_argument(
        "--rounds", type=int, default=1, help="run every workload's targets N times; medians"
    )
    ap.add_argument("--size", default="256m")
    ap.add_argument("--targets", default=",".join(report.ORDER))
    ap.add_argument("--scale", default="1,2,4,8", help="volume counts; '' skips the curve")
    ap.add_argument("--workloads", default="", help="only these workload keys (comma list)")
    ap.add_argument("--no-extras", action="store_true", help="skip failover and rebuild")
    ap.add_argument("--profile", action="store_true", help="only the py-spy profile")
    ap.add_argument("--profile-sync", action="store_true", help="profile a --sync-writes volume")
    ap.add_argument(
        "--profile-native",
        action="store_true",
        help="profile C frames too (uvloop, syscalls), idle time included",
    )
    ap.add_argument("--profile-repl", type=int, default=3, help="replicas of the profiled volume")
    ap.add_argument(
        "--profile-workloads",
        default="rand_write_4k_qd16,seq_write_1m_qd8",
        help="workload keys to profile (comma list)",
    )
    args = ap.parse_args()
    if args.quick:
        args.runtime, args.size, args.no_extras, args.scale = 2, "64m", True, "1,2"
    args.scale = [int(x) for x in args.scale.split(",") if x]
    targets = set(args.targets.split(","))
    args.workloads = {w for w in args.workloads.split(",") if w}
    size_b = int(args.size[:-1]) << {"k": 10, "m": 20, "g": 30}[args.size[-1].lower()]
    vol_size = f"{size_b >> 20}M"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "started": stamp,
        "load_start": [round(x, 2) for x in load()],
        "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    cells: report.Cells = {}
    tmp = Path(tempfile.mkdtemp(prefix="pxc-bench-", dir="/var/tmp"))
    etcd = EtcdServer(tmp / "etcd")
    c: Cluster | None = None
    try:
        if args.profile:
            etcd.start()
            c = Cluster(tmp, etcd, name="bench", lease_ttl=5)
            for n in ("n1", "n2", "n3"):
                c.add_node(n, disk_size=8 << 30)
            result["profile"] = profile(c, args, stamp)
            print(json.dumps(result["profile"], indent=2))
            return
        up: dict[str, tuple[list[str], list[int]]] = {}
        kits: list[Nbdkit | Quorum] = []
        if "native" in targets:
            up["native"] = (["--ioengine=libaio", "--direct=1", f"--filename={tmp / 'n.img'}"], [])
        for name, fua in (("nbdkit", False), ("nbdkit_fua", True)):
            if name in targets:
                kits.append(Nbdkit(tmp / f"{name}.img", size_b, fua=fua))
                up[name] = (kits[-1].target, [kits[-1].proc.pid])
        for name, fua in (("quorum", False), ("quorum_fua", True)):
            if name in targets and shutil.which("qemu-nbd"):
                quorum = Quorum(tmp, name, size_b, fua=fua)
                kits.append(quorum)
                up[name] = (quorum.target, quorum.pids)
        etcd.start()
        c = Cluster(tmp, etcd, name="bench", lease_ttl=5)
        for n in ("n1", "n2", "n3"):
            c.add_node(n, disk_size=16 << 30)
        pids = [n.proc.pid for n in c.nodes.values() if n.proc is not None]
        key = tmp / "bench.key"
        key.write_bytes(os.urandom(64))
        for name, repl, sync in (
            ("repl1", 1, False),
            ("repl3", 3, False),
            ("repl1_sync", 1, True),
            ("repl3_sync", 3, True),
            ("repl1_enc", 1, False),
            ("repl3_enc", 3, False),
        ):
            if name in targets:
                uri = create_attached(
                    c,
                    name.replace("_", "-"),
                    vol_size,
                    repl,
                    sync=sync,
                    key_file=key if name.endswith("_enc") else None,
                )
                up[name] = (nbd_target(uri), pids)
        try:
            result["rounds_iops"] = measure_all(up, args, cells)
        finally:
            for k in kits:
                k.close()
        for name in ("repl1", "repl3", "repl1_sync", "repl3_sync", "repl1_enc", "repl3_enc"):
            if name in up:
                c.cli("volume", "detach", name.replace("_", "-"))
        result["scaling_repl3_rand_write_4k_qd16_iops"] = scaling(c, args) if args.scale else {}
    finally:
        if c is not None:
            c.close()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_extras:
        log("failover bench")
        result["failover"] = sub_bench("failover_bench.py", "256M")
        log("rebuild bench")
        result["rebuild"] = sub_bench("rebuild_bench.py", "1G", "--floor")
    rat = report.ratios(cells)
    peer = report.peer_ratios(cells)
    result["cells"] = cells
    result["ratios"] = rat
    result["peer_ratios"] = peer
    result["targets"] = report.check_targets(rat)
    result["load_end"] = [round(x, 2) for x in load()]
    out = RESULTS / f"fio-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=2))
    png = RESULTS / f"fio-{stamp}.png"
    if not report.chart(cells, result.get("scaling_repl3_rand_write_4k_qd16_iops", {}), png):
        log("no chart: matplotlib missing (.venv/bin/pip install -e '.[bench]')")
    print(report.table(cells, rat))
    print()
    print(report.targets_table(result["targets"]))
    print()
    if peer:
        print("repl-3 against the C replication peer (QEMU quorum over three nbdkit servers):")
        print(report.peer_table(cells, peer))
        print()
    print(
        "scaling (repl-3 rand write 4 KiB QD16, IOPS total):",
        result.get("scaling_repl3_rand_write_4k_qd16_iops"),
    )
    for extra in ("failover", "rebuild"):
        if extra in result:
            print(extra, json.dumps(result[extra]))
    print(f"load {result['load_start']} -> {result['load_end']}; json {out}; chart {png}")


if __name__ == "__main__":
    main()
