"""Control-plane scale, by simulation: many node agents against one real etcd.

Runs `--nodes` simulated storage nodes (bench/scale_node.py: the real membership, lease,
election, controllers and node agent; only the volume engine and NBD are replaced, and there
are no disks) as asyncio tasks in `--procs` worker processes, against an etcd this bench starts
(`--etcd-members 1` or 3 on loopback; the nodes get every endpoint, comma-separated, as the real
`--etcd` option does). Then:

  1. creates `--volumes` volumes (repl 3) with the real `Service.create_volume` and attaches
     them round-robin over the nodes with the real `Service.attach`, and waits until every one
     is served (attachment `serving`, exported);
  2. steady state: etcd's own /metrics counters over `--window` seconds, per node and second:
     writes (raft proposals committed; and client write calls: Put, Txn, DeleteRange,
     LeaseGrant/Revoke, LeaseKeepAlive messages), reads (Range), watch events sent;
  3. failover: stops `--kill` nodes (not the leader) at once without revoking their leases (as
     SIGKILL looks to etcd), and times until every volume attached on them is served again on a
     live node, from a watch of `volumes/`; checks that no volume was ever attached or served
     on two nodes at once. `--kill-leader` repeats it with the leader among the victims.

Results: printed, and written to bench/results/scale-<time>.json.

  .venv/bin/python bench/scale.py                     # 200 nodes, 2000 volumes, kill 10
  .venv/bin/python bench/scale.py --quick             # 20 nodes, 100 volumes (the test)
  .venv/bin/python bench/scale.py --etcd-members 3 --nodes 100 --volumes 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from membership.election import current_leader
from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import Attachment, NodeRecord
from pxcluster.controllers.runner import leader_controllers, run_pass
from pxcluster.node.daemon import ensure_cluster
from pxcluster.service.core import Service
from tests.harness.etcd import CountingEtcd, free_port, wait_port

RESULTS = Path(__file__).resolve().parent / "results"
VOLUME_SIZE = 10 << 30
DEFAULT_TTL = 5  # NodeConfig.lease_ttl, `cluster join --lease-ttl`'s default


# --- etcd, one member or three


class EtcdCluster:
    def __init__(self, base: Path, members: int) -> None:
        self.base = base
        self.members = members
        self.client_ports = [free_port() for _ in range(members)]
        self.peer_ports = [free_port() for _ in range(members)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def start(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise SystemExit("etcd not installed (run scripts/install.sh)")
        names = [f"m{i}" for i in range(self.members)]
        initial = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, self.peer_ports, strict=True)
        )
        for i, name in enumerate(names):
            client = self.urls[i]
            peer = f"http://127.0.0.1:{self.peer_ports[i]}"
            with open(self.base / f"etcd-{name}.log", "ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        [
                            etcd,
                            "--name",
                            name,
                            "--data-dir",
                            str(self.base / f"etcd-{name}"),
                            "--listen-client-urls",
                            client,
                            "--advertise-client-urls",
                            client,
                            "--listen-peer-urls",
                            peer,
                            "--initial-advertise-peer-urls",
                            peer,
                            "--initial-cluster",
                            initial,
                            "--initial-cluster-state",
                            "new",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for p in self.client_ports:
            wait_port("127.0.0.1", p, 30)

    def cpu_seconds(self) -> float:
        """utime + stime of every member, from /proc."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for p in self.procs:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def etcd_version() -> str:
    out = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.split("\n")[0]


# --- etcd's /metrics

Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Sample:
    out: Sample = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, frozenset[tuple[str, str]]()
        if "{" in head:
            name, rest = head.split("{", 1)
            pairs = []
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, v = part.split("=", 1)
                    pairs.append((k.strip(), v.strip().strip('"')))
            labels = frozenset(pairs)
        with contextlib.suppress(ValueError):
            out[(name, labels)] = float(value)
    return out


def scrape(urls: list[str]) -> list[Sample]:
    samples = []
    for u in urls:
        with urllib.request.urlopen(f"{u}/metrics", timeout=10) as r:
            samples.append(parse_metrics(r.read().decode()))
    return samples


def total(s: Sample, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in s.items() if n == name and want <= ls)


WRITE_METHODS = ("Put", "Txn", "DeleteRange", "LeaseGrant", "LeaseRevoke")


def counts(samples: list[Sample]) -> dict[str, float]:
    """Cumulative counters of the whole etcd cluster: request counts summed over members (each
    client talks to one member), raft proposals from the member with the most (all commit the
    same entries)."""
    c: dict[str, float] = {}
    for m in ("Range", *WRITE_METHODS, "Watch", "LeaseKeepAlive"):
        c[f"grpc_{m}"] = sum(total(s, "grpc_server_handled_total", grpc_method=m) for s in samples)
    c["keepalive_msgs"] = sum(
        total(s, "grpc_server_msg_received_total", grpc_method="LeaseKeepAlive") for s in samples
    )
    c["watch_msgs_sent"] = sum(
        total(s, "grpc_server_msg_sent_total", grpc_method="Watch") for s in samples
    )
    c["watch_events_sent"] = sum(total(s, "etcd_debugging_mvcc_events_total") for s in samples)
    c["proposals_committed"] = max(
        total(s, "etcd_server_proposals_committed_total") for s in samples
    )
    c["wal_fsyncs"] = sum(total(s, "etcd_disk_wal_fsync_duration_seconds_count") for s in samples)
    c["sent_bytes"] = sum(total(s, "etcd_network_client_grpc_sent_bytes_total") for s in samples)
    c["received_bytes"] = sum(
        total(s, "etcd_network_client_grpc_received_bytes_total") for s in samples
    )
    c["cpu_s"] = sum(total(s, "process_cpu_seconds_total") for s in samples)
    c["watchers"] = sum(total(s, "etcd_debugging_mvcc_watcher_total") for s in samples)
    c["slow_watchers"] = sum(total(s, "etcd_debugging_mvcc_slow_watcher_total") for s in samples)
    c["db_bytes"] = max(total(s, "etcd_mvcc_db_total_size_in_bytes") for s in samples)
    return c


def rates(
    before: dict[str, float], after: dict[str, float], seconds: float, nodes: int
) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in before}
    client_writes = sum(d[f"grpc_{m}"] for m in WRITE_METHODS) + d["keepalive_msgs"]
    per_s = {k: round(v / seconds, 2) for k, v in d.items() if k not in ("watchers", "db_bytes")}
    return {
        "seconds": round(seconds, 1),
        "raft_writes_per_s": round(d["proposals_committed"] / seconds, 1),
        "raft_writes_per_node_s": round(d["proposals_committed"] / seconds / nodes, 3),
        "client_writes_per_s": round(client_writes / seconds, 1),
        "client_writes_per_node_s": round(client_writes / seconds / nodes, 3),
        "keepalives_per_node_s": round(d["keepalive_msgs"] / seconds / nodes, 3),
        "reads_per_s": round(d["grpc_Range"] / seconds, 1),
        "reads_per_node_s": round(d["grpc_Range"] / seconds / nodes, 3),
        "watch_events_per_s": round(d["watch_events_sent"] / seconds, 1),
        "sent_mb_per_s": round(d["sent_bytes"] / seconds / 1e6, 2),
        "etcd_cpu": round(d["cpu_s"] / seconds, 2),
        "watchers": after["watchers"],
        "slow_watchers": after["slow_watchers"],
        "db_mb": round(after["db_bytes"] / 1e6, 1),
        "per_s": per_s,
    }


# --- the worker processes


class Workers:
    def __init__(self, cfg: dict[str, Any], nodes: list[dict[str, str]], procs: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        from scale_node import worker_main

        for i in range(procs):
            mine = nodes[i::procs]
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(child, {**cfg, "index": i, "nodes": mine}), daemon=True
            )
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    async def ask(self, cmd: str, arg: Any = None, timeout: float = 60.0) -> list[Any]:
        for c in self.conns:
            c.send((cmd, arg))

        def wait(c: Connection) -> Any:
            if not c.poll(timeout):
                raise TimeoutError(f"worker did not answer {cmd!r} within {timeout} s")
            _what, data = c.recv()
            return data

        return list(await asyncio.gather(*(asyncio.to_thread(wait, c) for c in self.conns)))

    def close(self) -> None:
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


# --- an observer: every attachment change, as a watch of volumes/ sees it


@dataclasses.dataclass
class Holder:
    node: str
    epoch: int
    exported: bool
    since: float


class Observer:
    def __init__(self, etcd: Etcd, keys: Keys) -> None:
        self.etcd = etcd
        self.keys = keys
        self.current: dict[str, Holder] = {}
        self.history: dict[str, list[tuple[float, str, int, str, bool]]] = {}
        self.violations: list[str] = []
        self.changed = asyncio.Event()
        self.events = 0

    async def run(self) -> None:
        prefix = self.keys.volumes_prefix()
        watch = await self.etcd._call(lambda: self.etcd._client.watch_prefix(prefix))
        try:
            async for ev in watch:
                self.events += 1
                parts = self.keys.split(ev.kv.key)
                if len(parts) == 3 and parts[2] == "attachment":
                    self._on_attachment(parts[1], ev)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await watch.cancel()

    def _on_attachment(self, vid: str, ev: Any) -> None:
        now = time.time()
        old = self.current.get(vid)
        if ev.kind == "PUT":
            a = Attachment.decode(ev.kv.value)
            exported = bool(a.exported) and a.state == "serving"
            self.history.setdefault(vid, []).append((now, a.node, a.epoch, a.state, exported))
            if old is not None and old.node != a.node:
                self.violations.append(
                    f"volume {vid}: attached on {a.node} (epoch {a.epoch}) while still attached "
                    f"on {old.node} (epoch {old.epoch})"
                )
            if old is not None and a.epoch < old.epoch:
                self.violations.append(f"volume {vid}: epoch went back {old.epoch} -> {a.epoch}")
            since = old.since if old is not None and old.exported and exported else now
            self.current[vid] = Holder(a.node, a.epoch, exported, since)
        else:
            self.history.setdefault(vid, []).append((now, "", 0, "deleted", False))
            self.current.pop(vid, None)
        self.changed.set()

    def served_elsewhere(self, vid: str, dead: set[str]) -> float | None:
        h = self.current.get(vid)
        if h is None or not h.exported or h.node in dead:
            return None
        return h.since

    async def wait_for(self, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self.changed.wait()
        return True


def overlaps(served: list[dict[str, Any]], end_of_run: float) -> list[str]:
    """Stretches of time two nodes exported the same volume."""
    by_vol: dict[str, list[dict[str, Any]]] = {}
    for s in served:
        by_vol.setdefault(s["volume"], []).append(s)
    bad = []
    for vid, spans in by_vol.items():
        spans.sort(key=lambda s: s["start"])
        for a, b in itertools.pairwise(spans):
            a_end = a["end"] or end_of_run
            if a["node"] != b["node"] and b["start"] < a_end:
                bad.append(
                    f"volume {vid}: served on {a['node']} (epoch {a['epoch']}) until {a_end:.3f} "
                    f"and on {b['node']} (epoch {b['epoch']}) from {b['start']:.3f}"
                )
    return bad


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(len(s) * q))], 2) if s else 0.0


# --- the run


class BenchService(Service):
    """`Service` whose node list reports the space the volumes created so far would take, so
    the real `place()` (most free space first) spreads replicas as it would on real disks: a
    simulated node has no disk whose use would grow."""

    def __init__(self, etcd: Etcd, cluster: str) -> None:
        super().__init__(etcd, cluster)
        self.used: dict[str, int] = {}

    async def nodes(self) -> list[NodeRecord]:
        return [dataclasses.replace(n, used=self.used.get(n.id, 0)) for n in await super().nodes()]


async def setup_volumes(
    svc: BenchService, names: list[str], node_names: list[str], log: Any
) -> dict[str, Any]:
    t0 = time.monotonic()
    sem = asyncio.Semaphore(8)

    async def create(name: str) -> None:
        async with sem:
            view = await svc.create_volume(name, VOLUME_SIZE, 3)
            for n in view.record.replica_nodes:
                svc.used[n] = svc.used.get(n, 0) + VOLUME_SIZE

    await asyncio.gather(*(create(n) for n in names))
    created = time.monotonic() - t0
    log(f"created {len(names)} volumes in {created:.1f} s")

    t1 = time.monotonic()

    async def attach(i: int, name: str) -> None:
        async with sem:
            await svc.attach(name, node_names[i % len(node_names)])

    await asyncio.gather(*(attach(i, n) for i, n in enumerate(names)))
    log(f"attach targets written in {time.monotonic() - t1:.1f} s")
    return {"create_s": round(created, 1), "targets_s": round(time.monotonic() - t1, 1)}


async def time_leader_pass(url: str, cluster: str, rounds: int = 5) -> dict[str, Any]:
    """What one pass of the leader's controllers costs at this size (the runner runs one on
    every change under the cluster prefix, and at least once a second), timed in this process
    on a quiet loop. The pass runs as the runner runs it (`run_pass`: the four in order on one
    `PassView`, which reads `volumes/` once, in the first controller that asks); the median of
    `rounds`, the per-controller times of that pass, and the range requests a pass sends. For
    comparison, alternating with it: the same controllers each reading for itself (how every
    pass ran before), and one bare read of `volumes/`."""
    etcd = CountingEtcd(url, Keys(cluster).root, timeout=10.0)
    await etcd.connect()
    try:
        svc = Service(etcd, cluster)
        out: dict[str, Any] = {}
        t = time.perf_counter()
        raw = await etcd.get_prefix(svc.keys.volumes_prefix())
        out["read_volumes_prefix_s"] = round(time.perf_counter() - t, 3)
        out["volumes_prefix_keys"] = len(raw)
        out["volumes_prefix_mb"] = round(sum(len(kv.key) + len(kv.value) for kv in raw) / 1e6, 2)
        t = time.perf_counter()
        await svc.volumes()
        out["service_volumes_s"] = round(time.perf_counter() - t, 3)

        shared: list[tuple[float, dict[str, float]]] = []
        unshared: list[float] = []
        for _ in range(rounds):
            etcd.ranges.clear()
            t = time.perf_counter()
            took = await run_pass(leader_controllers(svc, replace_after=300.0))
            shared.append((time.perf_counter() - t, took))
            out["pass_range_requests"] = sum(etcd.ranges.values())
            out["pass_range_requests_by_prefix"] = dict(etcd.ranges)
            etcd.ranges.clear()
            t = time.perf_counter()
            for c in leader_controllers(svc, replace_after=300.0):
                await c.run_pass()  # no view given: each reads for itself
            unshared.append(time.perf_counter() - t)
            out["unshared_range_requests"] = sum(etcd.ranges.values())
        total, took = sorted(shared, key=lambda p: p[0])[len(shared) // 2]
        out["pass_total_s"] = round(total, 3)
        out.update({name: round(s, 3) for name, s in took.items()})
        out["pass_runs_s"] = [round(p[0], 3) for p in shared]
        out["unshared_pass_s"] = round(sorted(unshared)[len(unshared) // 2], 3)
        out["unshared_runs_s"] = [round(x, 3) for x in unshared]
        out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        return out
    finally:
        await etcd.close()


async def failover_round(
    *,
    label: str,
    etcd: Etcd,
    keys: Keys,
    cluster: EtcdCluster,
    workers: Workers,
    obs: Observer,
    victims: list[str],
    vids: dict[str, str],
    names: dict[str, str],
    timeout: float,
    log: Any,
) -> dict[str, Any]:
    dead = set(victims)
    moving = {vid for vid, h in obs.current.items() if h.node in dead}
    before = counts(await asyncio.to_thread(scrape, cluster.urls))
    killed: dict[str, float] = {}
    for part in await workers.ask("kill", victims, timeout=30):
        killed.update(part)
    t_kill = min(killed.values())
    t_kill_end = max(killed.values())
    log(
        f"[{label}] killed {len(victims)} nodes ({', '.join(names[v] for v in victims)}) "
        f"holding {len(moving)} attachments"
    )
    ok = await obs.wait_for(
        lambda: all(obs.served_elsewhere(v, dead) is not None for v in moving), timeout
    )
    t_done = time.time()
    after = counts(await asyncio.to_thread(scrape, cluster.urls))
    times = {}
    for v in moving:
        since = obs.served_elsewhere(v, dead)
        if since is not None:
            times[v] = since - t_kill
    missing = sorted(v for v in moving if v not in times)
    # The failover records say where the time went: detection (the leader moved the target)
    # and the new node's work until it served.
    detect, serve = [], []
    for v in moving:
        kv = await etcd.get(keys.failover(v))
        if kv is None:
            continue
        rec = json.loads(kv.value)
        if rec.get("detected", 0) >= t_kill:
            detect.append(rec["detected"] - t_kill)
            if rec.get("serving"):
                serve.append(rec["serving"] - rec["detected"])
    leader = await current_leader(etcd, keys)
    result = {
        "killed": [names[v] for v in victims],
        "leader_killed": any(v in dead for v in [leader or ""]) or label.endswith("leader"),
        "kill_spread_s": round(t_kill_end - t_kill, 3),
        "volumes_moved": len(moving),
        "all_served": ok and not missing,
        "missing": [vids.get(v, v) for v in missing],
        "p50_s": pct(list(times.values()), 0.5),
        "p90_s": pct(list(times.values()), 0.9),
        "max_s": round(max(times.values()), 2) if times else None,
        "min_s": round(min(times.values()), 2) if times else None,
        "total_s": round(max(times.values()), 2) if times else None,
        "detect_p50_s": pct(detect, 0.5),
        "detect_max_s": round(max(detect), 2) if detect else None,
        "dest_work_p50_s": pct(serve, 0.5),
        "dest_work_max_s": round(max(serve), 2) if serve else None,
        "etcd_during": rates(before, after, max(0.1, t_done - t_kill), 1),
        "new_leader": names.get(leader or "", leader),
    }
    log(
        f"[{label}] {len(times)}/{len(moving)} served again elsewhere: "
        f"p50 {result['p50_s']} s, max {result['max_s']} s "
        f"(detected p50 {result['detect_p50_s']} s after the kill)"
    )
    return result


async def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    result: dict[str, Any] = {
        "config": {
            k: getattr(args, k)
            for k in (
                "nodes",
                "volumes",
                "kill",
                "procs",
                "ttl",
                "window",
                "etcd_members",
                "agent",
                "quick",
            )
        },
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "etcd": etcd_version(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    cluster = EtcdCluster(base, args.etcd_members)
    cluster.start()
    log(f"etcd: {args.etcd_members} member(s) at {cluster.url}")
    cluster_name = "scale"
    keys = Keys(cluster_name)
    etcd = Etcd(cluster.url, timeout=10.0)
    await etcd.connect()
    await ensure_cluster(etcd, keys)
    nodes = [
        {"id": uuid.uuid4().hex[:12], "name": f"node-{i:04d}", "zone": f"z{i % 3}"}
        for i in range(args.nodes)
    ]
    names = {n["id"]: n["name"] for n in nodes}
    cfg = {
        "etcd": cluster.url,
        "cluster": cluster_name,
        "ttl": args.ttl,
        "agent": args.agent,
        "quiet": not args.verbose,
    }
    workers = Workers(cfg, nodes, args.procs)
    obs = Observer(etcd, keys)
    obs_task = asyncio.create_task(obs.run())
    try:
        t = time.monotonic()
        await workers.ask("start", timeout=60 + args.nodes)
        result["nodes_start_s"] = round(time.monotonic() - t, 1)
        log(f"{args.nodes} nodes up in {result['nodes_start_s']} s ({args.procs} processes)")
        svc = BenchService(etcd, cluster_name)
        vnames = [f"vol-{i:05d}" for i in range(args.volumes)]
        t = time.monotonic()
        result["setup"] = await setup_volumes(svc, vnames, [n["name"] for n in nodes], log)
        vids = {v.record.id: v.record.name for v in await svc.volumes()}
        ok = False
        deadline = time.monotonic() + args.setup_timeout
        while not ok and time.monotonic() < deadline:
            ok = await obs.wait_for(
                lambda: sum(1 for h in obs.current.values() if h.exported) >= args.volumes,
                min(15.0, max(0.1, deadline - time.monotonic())),
            )
            w = await workers.ask("stats")
            log(
                f"  {sum(1 for h in obs.current.values() if h.exported)} served; workers: "
                f"cpu {[round(x['cpu_s']) for x in w]} s, loop lag max "
                f"{[x['lag']['max_ms'] for x in w]} ms, leases lost "
                f"{sum(sum(x['lease_lost'].values()) for x in w)}, etcd cpu "
                f"{round(cluster.cpu_seconds())} s"
            )
        result["setup"]["all_served_s"] = round(time.monotonic() - t, 1)
        served = sum(1 for h in obs.current.values() if h.exported)
        log(
            f"{served}/{args.volumes} volumes served "
            f"{result['setup']['all_served_s']} s after the first create"
        )
        if not ok:
            raise SystemExit("not every volume got served; see the worker logs (--verbose)")

        await asyncio.sleep(args.settle)
        await workers.ask("reset")
        cpu0 = cluster.cpu_seconds()
        before = counts(await asyncio.to_thread(scrape, cluster.urls))
        t0 = time.monotonic()
        await asyncio.sleep(args.window)
        after = counts(await asyncio.to_thread(scrape, cluster.urls))
        seconds = time.monotonic() - t0
        cpu1 = cluster.cpu_seconds()
        wstats = await workers.ask("stats")
        steady = rates(before, after, seconds, args.nodes)
        steady["etcd_cpu"] = round((cpu1 - cpu0) / seconds, 2)
        steady["workers"] = [
            {"lag": w["lag"], "max_rss_mb": w["max_rss_mb"], "attached": w["attached"]}
            for w in wstats
        ]
        steady["lease_lost"] = sum(sum(w["lease_lost"].values()) for w in wstats)
        result["steady"] = steady
        log(
            f"steady state over {steady['seconds']} s: raft writes {steady['raft_writes_per_s']}/s "
            f"= {steady['raft_writes_per_node_s']}/s per node; client writes "
            f"{steady['client_writes_per_node_s']}/s per node (keep-alives "
            f"{steady['keepalives_per_node_s']}); reads {steady['reads_per_s']}/s, "
            f"{steady['sent_mb_per_s']} MB/s out; etcd CPU {steady['etcd_cpu']} cores; "
            f"worker loop lag p99 {[w['lag']['p99_ms'] for w in wstats]} ms"
        )

        result["leader_pass"] = await time_leader_pass(cluster.url, cluster_name)
        log(f"one leader pass, timed here: {result['leader_pass']}")

        leader = await current_leader(etcd, keys)
        result["leader"] = names.get(leader or "", leader)
        rounds = []
        alive = [n["id"] for n in nodes]
        # Victims spread over the node list (and so over zones and processes), never the leader.
        candidates = [i for i in alive if i != leader]
        step = max(1, len(candidates) // max(1, args.kill))
        victims = candidates[::step][: args.kill]

        async def one_round(label: str, killed: list[str]) -> None:
            rounds.append(
                await failover_round(
                    label=label,
                    etcd=etcd,
                    keys=keys,
                    cluster=cluster,
                    workers=workers,
                    obs=obs,
                    victims=killed,
                    vids=vids,
                    names=names,
                    timeout=args.failover_timeout,
                    log=log,
                )
            )

        await one_round("kill", victims)
        if args.kill_leader:
            await asyncio.sleep(args.settle)
            leader = await current_leader(etcd, keys)
            dead = set(victims)
            rest = [i for i in alive if i not in dead and i != leader]
            step = max(1, len(rest) // max(1, args.kill))
            await one_round("kill-with-leader", [leader or "", *rest[1::step][: args.kill - 1]])
        result["failover"] = rounds
        await asyncio.sleep(1.0)
        wstats = await workers.ask("stats")
        served_log: list[dict[str, Any]] = []
        for part in await workers.ask("served"):
            served_log.extend(part)
        double = overlaps(served_log, time.time())
        result["checks"] = {
            "etcd_double_attachments": obs.violations[:20],
            "served_twice": double[:20],
            "no_double_attachment": not obs.violations and not double,
            "lease_lost": sum(sum(w["lease_lost"].values()) for w in wstats),
            "worker_cpu_s": [round(w["cpu_s"], 1) for w in wstats],
            "observer_events": obs.events,
        }
        log(
            f"double attachments: {len(obs.violations)} in etcd, {len(double)} served twice; "
            f"leases lost by live nodes: {result['checks']['lease_lost']}"
        )
        result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        with contextlib.suppress(Exception):
            await workers.ask("stop", timeout=30)
    finally:
        obs_task.cancel()
        await asyncio.gather(obs_task, return_exceptions=True)
        workers.close()
        await etcd.close()
        cluster.stop()
    return result


def summary(r: dict[str, Any]) -> dict[str, Any]:
    s = r["steady"]
    out = {
        "nodes": r["config"]["nodes"],
        "volumes": r["config"]["volumes"],
        "etcd_members": r["config"]["etcd_members"],
        "raft_writes_per_node_s": s["raft_writes_per_node_s"],
        "client_writes_per_node_s": s["client_writes_per_node_s"],
        "reads_per_node_s": s["reads_per_node_s"],
        "aim_under_1_write_per_node_s": s["raft_writes_per_node_s"] < 1.0,
    }
    out["failover_moved"] = [f["volumes_moved"] for f in r["failover"]]
    out["failover_max_s"] = [f["max_s"] for f in r["failover"]]
    out["failover_p50_s"] = [f["p50_s"] for f in r["failover"]]
    out["aim_failover_under_15_s"] = all(
        f["all_served"] and (f["max_s"] or 0) < 15 for f in r["failover"]
    )
    out["no_double_attachment"] = r["checks"]["no_double_attachment"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--volumes", type=int, default=2000)
    ap.add_argument("--kill", type=int, default=10, help="nodes stopped at once (default 10)")
    ap.add_argument("--kill-leader", action="store_true", help="a second round, leader included")
    ap.add_argument("--procs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--ttl", type=int, default=DEFAULT_TTL, help="node lease TTL, s (default 5)")
    ap.add_argument("--window", type=float, default=30.0, help="steady-state window, s")
    ap.add_argument("--settle", type=float, default=5.0, help="s to wait before measuring")
    ap.add_argument("--etcd-members", type=int, choices=(1, 3), default=1)
    ap.add_argument(
        "--agent",
        choices=("lite", "real"),
        default="lite",
        help="lite: acts on the targets naming the node (default); real: NodeAgent.run as is",
    )
    ap.add_argument("--setup-timeout", type=float, default=900.0)
    ap.add_argument("--failover-timeout", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="20 nodes, 100 volumes, kill 4, 5 s")
    ap.add_argument("--dir", default="/var/tmp", help="where etcd's data directory goes")
    ap.add_argument("--out", default="", help="result JSON (default bench/results/scale-*.json)")
    ap.add_argument("--verbose", action="store_true", help="the workers' warnings on stderr")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.volumes, args.kill = 20, 100, 4
        args.window, args.settle = 5.0, 2.0
    if args.kill >= args.nodes - 3:
        raise SystemExit("--kill must leave at least 4 nodes (repl 3 and a leader)")
    import uvloop

    with tempfile.TemporaryDirectory(prefix="pxc-scale-", dir=args.dir) as d:
        result = uvloop.run(run(args, Path(d)))
    result["summary"] = summary(result)
    out = Path(args.out) if args.out else RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
