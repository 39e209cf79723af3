"""More fault scenarios: long cuts under heavy writes, etcd lost in the middle of a
failover, a 3-member etcd losing its leader, a slow (rate-limited) replica, and a bit flip in a
replica's journal. Each runs the stamped workload, the history checker and the chunk-by-chunk
replica comparison (see test_chaos.py), and prints its `CHAOS name: ...` line.

The netns cluster's lease TTL is 2 s (`make_cluster(lease_ttl=2)`, passed as `--lease-ttl`):
that is the failover grace, so "longer than the grace" means a cut of several seconds."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import faults
from tests.chaos.netns import ETCD_PEER_PORT, ETCD_PORT, NetnsCluster, NetnsEtcd, Network
from tests.chaos.scenario import (
    Workload,
    all_in_sync,
    compare_replicas,
    report,
    served,
)
from tests.chaos.test_chaos import (
    NBLOCKS,
    finish,
    moved_off,
    rebuild_of_n3_under_way,
    setup_volume,
)
from tests.harness.etcd import wait_port

LEASE_TTL = 2  # the netns cluster's default (make_cluster(lease_ttl=2))


class Heavy:
    """Bulk writes next to the stamps (MiB 8..24 of the volume, which the stamps never touch),
    following the volume's URI: qemu-io writes of 16 MiB in a loop until stopped. Failures
    (the volume moving, a fenced node) just start the next round."""

    def __init__(self, c: NetnsCluster, volume: str) -> None:
        self.c, self.volume = c, volume
        self.stop_ev = threading.Event()
        self.rounds = self.ok = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                uri = self.c.inspect(self.volume)["nbd_uri"]
            except Exception:
                time.sleep(0.5)
                continue
            if not uri:
                time.sleep(0.5)
                continue
            pattern = 0x30 + self.rounds % 64
            self.rounds += 1
            try:
                res = subprocess.run(
                    ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 8M 16M", uri],
                    capture_output=True,
                    timeout=60,
                )
                ok = res.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            self.ok += ok
            if not ok:
                self.stop_ev.wait(0.5)

    def stop(self) -> None:
        self.stop_ev.set()
        self.thread.join(70)


def probe_write(uri: str, offset: str = "30M", timeout: float = 20) -> bool:
    """Whether one 4 KiB write through `uri` was acknowledged (a hang counts as not)."""
    try:
        res = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -P 0x77 {offset} 4k", uri],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0 and "wrote" in res.stdout and "error" not in res.stdout.lower()


# ----- 1. cuts of 20 s and of longer than the failover grace, under heavy writes -----


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_cut_attach_node_from_replicas_20s_heavy_writes(
    ncluster: NetnsCluster, tmp_path: Path
) -> None:
    """The attach node keeps etcd but loses both replica peers for 20 s, with a stamped writer
    and bulk writes going: it may go on alone (the peers marked stale first) or stall, but
    nothing acknowledged may be lost, and the peers come back identical."""
    c = ncluster
    setup_volume(c, "c20", "n1")
    w = Workload(c, "c20", tmp_path, NBLOCKS, seconds=30, seed=201)
    w.start()
    heavy = Heavy(c, "c20")
    try:
        time.sleep(3)
        heal = faults.partition_attach_from_replicas(c, "n1")
        time.sleep(20)
        heal()
    finally:
        heavy.stop()
    print(f"bulk rounds {heavy.rounds}, ok {heavy.ok}")
    finish(c, w, tmp_path, "cut-attach-from-replicas-20s", in_sync_timeout=180)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_cut_replica_20s_heavy_writes(ncluster: NetnsCluster, tmp_path: Path) -> None:
    """A replica isolated (etcd and peers) for 20 s under heavy writes: it is marked stale,
    writes go on, it is rebuilt incrementally and ends identical."""
    c = ncluster
    setup_volume(c, "r20", "n1")
    w = Workload(c, "r20", tmp_path, NBLOCKS, seconds=30, seed=202)
    w.start()
    heavy = Heavy(c, "r20")
    try:
        time.sleep(3)
        t0 = time.monotonic()
        heal = faults.isolate(c, "n3")
        c.wait_for(lambda: c.replica_states("r20")["n3"] != "in_sync", 45, "n3 marked stale")
        stale_after = time.monotonic() - t0
        time.sleep(max(0.0, 20 - stale_after))
        heal()
    finally:
        heavy.stop()
    print(f"n3 stale after {stale_after:.1f}s; bulk rounds {heavy.rounds}, ok {heavy.ok}")
    finish(c, w, tmp_path, "cut-replica-20s", in_sync_timeout=180)


@pytest.mark.timeout(300)
def test_isolate_attach_node_past_lease_heavy_writes(
    ncluster: NetnsCluster, tmp_path: Path
) -> None:
    """The attach node cut from etcd and from its peers for 4x its lease TTL, under heavy
    writes. The test process still reaches it (a stale client keeps writing to it). The volume
    must fail over, and the old node must acknowledge nothing once it lost its lease: a probe
    write sent to it after the failover must not be acknowledged."""
    c = ncluster
    setup_volume(c, "gi", "n1")
    old_uri = c.inspect("gi")["nbd_uri"]
    w = Workload(c, "gi", tmp_path, NBLOCKS, seconds=22, seed=203)
    w.start()
    heavy = Heavy(c, "gi")
    try:
        time.sleep(3)
        t0 = time.monotonic()
        heal = faults.isolate(c, "n1")
        c.wait_for(lambda: moved_off(c, "gi", "n1"), 60, "failover off the isolated n1")
        moved_after = time.monotonic() - t0
        acked_by_old = probe_write(old_uri)
        remaining = 4 * LEASE_TTL - (time.monotonic() - t0)
        if remaining > 0:
            time.sleep(remaining)
        cut = time.monotonic() - t0
        heal()
    finally:
        heavy.stop()
    print(f"moved after {moved_after:.1f}s, cut {cut:.1f}s, old node acked probe: {acked_by_old}")
    assert not acked_by_old, f"n1 acknowledged a write {moved_after:.1f}s+ after losing its lease"
    finish(c, w, tmp_path, "isolate-attach-past-lease", in_sync_timeout=180)


# ----- 2. etcd restarted in the middle of a failover -----


@pytest.mark.timeout(300)
def test_etcd_restart_mid_failover(ncluster: NetnsCluster, tmp_path: Path) -> None:
    """kill -9 of the attach node; as soon as etcd counts it gone (the leader is starting the
    failover) etcd is killed for 1.5 s and restarted. The failover must still complete, with
    nothing acknowledged lost."""
    c = ncluster
    setup_volume(c, "ef", "n1")
    w = Workload(c, "ef", tmp_path, NBLOCKS, seconds=16, seed=204)
    w.start()
    time.sleep(3)
    faults.kill9(c, "n1")
    c.wait_gone("n1", timeout=30)
    start_etcd = faults.stop_etcd(c)
    time.sleep(1.5)
    start_etcd()
    c.wait_for(lambda: moved_off(c, "ef", "n1"), 90, "failover off n1 after the etcd restart")
    time.sleep(2)
    faults.restart(c, "n1")
    finish(c, w, tmp_path, "etcd-restart-mid-failover", in_sync_timeout=120)


# ----- 3. a 3-member etcd losing its leader -----


class EtcdMember(NetnsEtcd):
    """One member of a 3-member etcd, in its own namespace (roles etcd1..etcd3)."""

    def __init__(self, data_dir: Path, net: Network, index: int, peers: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.net = net
        self.member = f"e{index}"
        self.ns, self.host = net.add(f"etcd{index}", 1 + index)
        peers[self.member] = f"http://{self.host}:{ETCD_PEER_PORT}"
        self.peers = peers  # filled by the other members before start
        self.port, self.peer_port = ETCD_PORT, ETCD_PEER_PORT
        self.tls = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_once = False

    def start(self) -> None:
        etcd = shutil.which("etcd")
        assert etcd is not None
        log = open(self.data_dir.parent / f"etcd-{self.member}.log", "ab")
        peer = self.peers[self.member]
        cmd = ["ip", "netns", "exec", self.ns, etcd, "--name", self.member]
        cmd += ["--data-dir", str(self.data_dir)]
        cmd += ["--listen-client-urls", self.url, "--advertise-client-urls", self.url]
        cmd += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
        cmd += ["--initial-cluster", ",".join(f"{m}={u}" for m, u in sorted(self.peers.items()))]
        cmd += ["--initial-cluster-state", "new", "--initial-cluster-token", "pxch"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.started_once = True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Etcd3:
    """Three etcd members; `url` (for the CLI and the test's own reads) is a live member's."""

    def __init__(self, tmp: Path, net: Network) -> None:
        peers: dict[str, str] = {}
        self.members = [EtcdMember(tmp / f"etcd{i}", net, i, peers) for i in (1, 2, 3)]
        self.host = self.members[0].host
        self.port = ETCD_PORT
        self.tls = None

    @property
    def url(self) -> str:
        for m in self.members:
            if m.running():
                return m.url
        return self.members[0].url

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> None:
        for m in self.members:
            if not m.running():
                m.start()
        for m in self.members:
            wait_port(m.host, m.port, 30)
        self.wait_healthy(60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for m in self.members:
            m.stop(sig)

    def status(self) -> list[dict[str, Any]]:
        live = ",".join(m.url for m in self.members if m.running())
        res = subprocess.run(
            ["etcdctl", "--endpoints", live, "endpoint", "status", "-w", "json"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        try:
            return list(json.loads(res.stdout or "[]"))
        except ValueError:
            return []

    def leader(self) -> EtcdMember | None:
        for s in self.status():
            st = s.get("Status", {})
            if st.get("leader") and st.get("header", {}).get("member_id") == st["leader"]:
                return next(m for m in self.members if m.url == s["Endpoint"])
        return None

    def member_id(self, member: EtcdMember) -> int:
        for s in self.status():
            if s["Endpoint"] == member.url:
                return int(s["Status"]["header"]["member_id"])
        raise LookupError(member.member)

    def move_leader(self, to: EtcdMember) -> None:
        cur = self.leader()
        assert cur is not None
        if cur is to:
            return
        subprocess.run(
            ["etcdctl", "--endpoints", cur.url, "move-leader", format(self.member_id(to), "x")],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.leader() is not None:
                return
            time.sleep(0.2)
        raise AssertionError(f"3-member etcd without a leader after {timeout}s")


class Etcd3Cluster(NetnsCluster):
    """Nodes on a 3-member etcd. pxcluster's `--etcd` takes one endpoint (see
    test_etcd3_nodes_given_every_endpoint), so node nI talks to member eI, as a node colocated
    with its etcd member would."""

    etcd: Etcd3  # type: ignore[assignment]

    def endpoint(self, name: str) -> str:
        i = list(self.nodes).index(name)
        return self.etcd.members[i % 3].url

    def start(self, name: str, *, wait: bool = True) -> None:
        n = self.nodes[name]
        cmd = ["ip", "netns", "exec", self.net.namespaces[name], sys.executable]
        cmd += ["-m", "pxcluster.cli", "--etcd", self.endpoint(name), "--cluster", self.name]
        cmd += ["cluster", "join", "--name", n.name, "--address", n.address, "--disk", str(n.disk)]
        cmd += ["--data-port", str(n.ports["data"]), "--nbd-port", str(n.ports["nbd"])]
        cmd += ["--api-port", str(n.ports["api"]), "--data-dir", str(n.data_dir)]
        cmd += ["--lease-ttl", str(self.lease_ttl), *n.extra]
        log = open(n.log, "ab")
        n.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_up(name)


@pytest.fixture
def etcd3(tmp_path: Path, net: Network) -> Iterator[Etcd3]:
    with ExitStack() as stack:
        e = Etcd3(tmp_path, net)
        stack.callback(e.stop)
        e.start()
        yield e


@pytest.fixture
def cluster3(tmp_path: Path, net: Network, etcd3: Etcd3) -> Iterator[Etcd3Cluster]:
    c = Etcd3Cluster(tmp_path, etcd3, net, lease_ttl=LEASE_TTL)  # type: ignore[arg-type]
    try:
        for i in (1, 2, 3):
            c.add_node(f"n{i}", disk_size=256 << 20)
        yield c
    finally:
        c.close()


def node_of(c: Etcd3Cluster, member: EtcdMember) -> str:
    return next(n for n in c.nodes if c.endpoint(n) == member.url)


def member_of(c: Etcd3Cluster, node: str) -> EtcdMember:
    return next(m for m in c.etcd.members if m.url == c.endpoint(node))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_etcd3_leader_lost_during_writes(cluster3: Etcd3Cluster, tmp_path: Path) -> None:
    """The etcd leader is killed -9 during writes. The volume is attached on a node whose
    member is a follower: raft elects a new leader (leases carry over), the node whose member
    died loses etcd until it comes back. Nothing acknowledged may be lost."""
    c = cluster3
    e = c.etcd
    leader = e.leader()
    assert leader is not None
    victim_node = node_of(c, leader)
    attach = next(n for n in c.nodes if n != victim_node)
    setup_volume(c, "l3", attach)
    w = Workload(c, "l3", tmp_path, NBLOCKS, seconds=16, seed=205)
    w.start()
    time.sleep(3)
    leader.stop(signal.SIGKILL)
    e.wait_healthy(30)
    new = e.leader()
    time.sleep(6)  # past the TTL: the node on the dead member loses its lease
    leader.start()
    e.wait_healthy(30)
    c.wait_up(victim_node, timeout=60)
    print(f"etcd leader {leader.member} killed; new leader {new and new.member}; attach {attach}")
    finish(c, w, tmp_path, "etcd3-leader-lost-during-writes", in_sync_timeout=120)


@pytest.mark.timeout(300)
def test_etcd3_leader_lost_during_failover(cluster3: Etcd3Cluster, tmp_path: Path) -> None:
    """kill -9 of the attach node; etcd leadership is first moved to the member the pxcluster
    leader talks to, and that member is killed as soon as the attach node's lease is gone:
    the controller doing the failover loses etcd in the middle of it. Another node must take
    over the leadership and finish the failover."""
    c = cluster3
    e = c.etcd
    c.wait_for(lambda: c.cli_json("cluster", "status")["leader"] is not None, 30, "a leader")
    px_leader = c.cli_json("cluster", "status")["leader"]
    attach = next(n for n in c.nodes if n != px_leader)
    setup_volume(c, "f3", attach)
    e.move_leader(member_of(c, px_leader))
    e.wait_healthy(30)
    w = Workload(c, "f3", tmp_path, NBLOCKS, seconds=18, seed=206)
    w.start()
    time.sleep(3)
    faults.kill9(c, attach)
    c.wait_gone(attach, timeout=30)
    lost = e.leader()
    assert lost is not None
    lost.stop(signal.SIGKILL)  # the etcd leader, which the pxcluster leader talks to
    e.wait_healthy(30)
    c.wait_for(lambda: moved_off(c, "f3", attach), 90, f"failover off {attach}")
    movers = [
        n for n in c.nodes if "volume f3: node " in c.nodes[n].log.read_text(errors="replace")
    ]
    print(f"pxcluster leader {px_leader} (etcd {lost.member} killed); failover by {movers}")
    lost.start()
    e.wait_healthy(30)
    faults.restart(c, attach)
    c.wait_up(px_leader, timeout=60)
    finish(c, w, tmp_path, "etcd3-leader-lost-during-failover", in_sync_timeout=120)


@pytest.mark.timeout(120)
def test_etcd3_nodes_given_every_endpoint(etcd3: Etcd3, tmp_path: Path) -> None:
    """Given every member (as docker-compose does), a client must still reach etcd with the
    first member down: the other two still have a quorum."""
    endpoints = ",".join(etcd3.urls)
    etcd3.members[0].stop(signal.SIGKILL)
    etcd3.wait_healthy(30)
    cmd = [sys.executable, "-m", "pxcluster.cli", "--etcd", endpoints, "--cluster", "test"]
    res = subprocess.run(
        [*cmd, "node", "list", "--json"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr.strip().splitlines()[-1:]


# ----- 4. a slow replica (Longhorn #6472) -----


@pytest.mark.timeout(300)
def test_slow_replica_keeps_the_good_ones_in_sync(ncluster: NetnsCluster, tmp_path: Path) -> None:
    """n3's link rate-limited (tbf, 2 mbit/s both ways) under heavy writes. The engine may wait
    for it or drop it (stale), but must never drop the good replicas and keep the slow one:
    while it is still slow, n1 and n2 must be in sync and hold every acknowledged write."""
    if shutil.which("tc") is None:
        pytest.skip("tc (iproute2) not installed")
    c = ncluster
    setup_volume(c, "sl", "n1")
    try:
        unlimit = faults.rate_limit(c, "n3")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"tc tbf unavailable: {e.stderr.strip()}")
    w = Workload(c, "sl", tmp_path, NBLOCKS, seconds=15, seed=207)
    w.start()
    heavy = Heavy(c, "sl")
    try:
        history = w.finish()
    finally:
        heavy.stop()
        states = c.replica_states("sl")
    try:
        assert states["n1"] == states["n2"] == "in_sync", f"good replicas dropped: {states}"
        assert c.inspect("sl")["attached_node"] == "n1"
        result = w.check(history)  # reads on n1, while n3 is still slow
        report("slow-replica", history, result, {"n3": states["n3"], "bulk_ok": heavy.ok})
        assert history.acked and result.ok, result
    finally:
        unlimit()
    c.wait_for(lambda: all_in_sync(c, "sl"), 120, "n3 caught up once fast again")
    c.wait_for(lambda: served(c, "sl"), 60, "served")
    assert w.check(history).ok
    compare_replicas(c, "sl", tmp_path)


# ----- 5. a bit flip in one replica's journal -----


@pytest.mark.timeout(300)
def test_journal_bit_flip_on_a_replica(ncluster: NetnsCluster, tmp_path: Path) -> None:
    """n3 is killed -9 right after the writes (its journal holds records past its last
    checkpoint), one bit is flipped in the first chunk-allocation record of its journal, and
    it restarts: it must open (replay stops at the corrupt record, losing it and all after),
    be caught up from the others, and then serve every acknowledged write when the volume is
    attached on it (reads are local on the attach node)."""
    c = ncluster
    setup_volume(c, "jf", "n1")
    vid = c.inspect("jf")["id"]
    w = Workload(c, "jf", tmp_path, NBLOCKS, seconds=6, seed=208)
    w.start()
    history = w.finish()
    faults.kill9(c, "n3")
    flipped = faults.flip_journal_bit(
        c.nodes["n3"].disk,
        lambda body: body[0] == "D" and body[1] == vid and body[3] is not None,
    )
    print(f"flipped journal record {flipped['index']} of {flipped['records']}: {flipped['body']}")
    faults.restart(c, "n3")
    # A write makes the engine meet the restarted replica (stale, then rebuilt).
    uri = c.inspect("jf")["nbd_uri"]
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 20M 4k", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    c.wait_for(lambda: all_in_sync(c, "jf"), 120, "n3 back in sync")
    c.cli("volume", "detach", "jf")
    c.wait_for(lambda: c.inspect("jf")["state"] == "detached", 30, "detached")
    c.attach("jf", "n3")
    result = w.check(history)
    chunks = compare_replicas(c, "jf", tmp_path)
    report(
        "journal-bit-flip",
        history,
        result,
        {"records_lost": flipped["records"] - flipped["index"], "replicas_compared": len(chunks)},
    )
    assert history.acked and result.ok, result


# ----- 6. the rebuild's source dies mid-rebuild -----


@pytest.mark.timeout(300)
def test_rebuild_source_crash_mid_rebuild(make_cluster: Any, tmp_path: Path) -> None:
    """n3 catches up from n1 and n2 (a rebuild reads from every in-sync replica); n2 is killed
    -9 half way, writes going on: the rebuild goes on from n1 alone, nothing is lost, and once
    n2 is back both are rebuilt and every copy is identical."""
    c, w = rebuild_of_n3_under_way(make_cluster, tmp_path, "rs", 121)
    faults.kill9(c, "n2")  # a source of the rebuild dies, writes going on
    time.sleep(2)
    faults.restart(c, "n2")
    finish(c, w, tmp_path, "rebuild-source-crash", in_sync_timeout=150)
