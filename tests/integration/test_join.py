"""Membership through a real etcd, node processes joining, identity, refusals."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from membership.etcd import Etcd, EtcdUnavailable
from replica.chunkstore import ChunkStore
from replica.fileio import OSFile
from replica.ondisk import Superblock
from tests.harness.cluster import Cluster, pxcluster
from tests.harness.etcd import EtcdServer, free_port


def leader(c: Cluster) -> str | None:
    st = c.cli_json("cluster", "status")
    return st["leader"]  # type: ignore[no-any-return]


def test_three_nodes_join_with_distinct_ids_and_one_leader(cluster3: Cluster) -> None:
    nodes = cluster3.cli_json("node", "list")
    assert sorted(n["name"] for n in nodes) == ["n1", "n2", "n3"]
    assert all(n["up"] and n["state"] == "active" for n in nodes)
    assert len({n["id"] for n in nodes}) == 3
    assert all(n["capacity"] > 0 and n["used"] == 0 for n in nodes)
    cluster3.wait_for(lambda: leader(cluster3) in {"n1", "n2", "n3"}, 10, "a leader")
    st = cluster3.cli_json("cluster", "status")
    assert st["nodes_up"] == 3 and st["nodes_total"] == 3 and st["id"]


def test_killed_node_goes_down_and_comes_back_with_same_identity(cluster3: Cluster) -> None:
    before = cluster3.node_state("n2")
    cluster3.kill("n2")
    # Down once its lease is gone: the wait is bounded by the TTL plus slack, not timed.
    cluster3.wait_for(
        lambda: not cluster3.node_state("n2")["up"], cluster3.lease_ttl + 2 + 1, "n2 down"
    )
    cluster3.start("n2")
    after = cluster3.node_state("n2")
    assert after["id"] == before["id"] and after["up"]
    assert len(cluster3.cli_json("node", "list")) == 3


def test_leader_killed_new_leader_within_ttl(cluster3: Cluster) -> None:
    cluster3.wait_for(lambda: leader(cluster3) is not None, 10, "a leader")
    old = leader(cluster3)
    assert old is not None
    cluster3.kill(old)
    cluster3.wait_for(
        lambda: leader(cluster3) not in (None, old), cluster3.lease_ttl + 2 + 1, "a new leader"
    )


def test_graceful_stop_revokes_the_lease_at_once(cluster3: Cluster) -> None:
    cluster3.kill("n3", signal.SIGTERM)
    assert cluster3.nodes["n3"].proc is not None
    assert cluster3.nodes["n3"].proc.returncode == 0
    assert not cluster3.node_state("n3")["up"]


def join_cmd(c: Cluster, name: str, disk: Path, address: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pxcluster.cli",
        "--etcd",
        c.etcd.url,
        "--cluster",
        c.name,
        "cluster",
        "join",
        "--name",
        name,
        "--address",
        address,
        "--disk",
        str(disk),
        # Ports are 1..65535 (0 is refused): ones free a moment ago on this address.
        "--data-port",
        str(free_port(address)),
        "--nbd-port",
        str(free_port(address)),
        "--api-port",
        str(free_port(address)),
        *extra,
    ]


def run_join(
    c: Cluster, name: str, disk: Path, address: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        join_cmd(c, name, disk, address, *extra), capture_output=True, text=True, timeout=30
    )


def one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_refusals(cluster: Cluster, tmp_path: Path, etcd: EtcdServer) -> None:
    n1 = cluster.add_node("n1")
    # Duplicate live name with another disk.
    other = tmp_path / "other.img"
    other.write_bytes(b"")
    with open(other, "wb") as f:
        f.truncate(256 << 20)
    one_line_error(run_join(cluster, "n1", other, "127.0.9.9"), "n1")
    # Disk in use by a live node.
    one_line_error(run_join(cluster, "nx", n1.disk, "127.0.9.9"), "in use")
    # A disk formatted by another cluster is refused, and accepted with --wipe.
    foreign = Cluster(tmp_path / "f", etcd, name="foreign")
    (tmp_path / "f").mkdir()
    try:
        fn = foreign.add_node("f1", disk_size=256 << 20)
        foreign.kill("f1", signal.SIGTERM)
        res = run_join(cluster, "n9", fn.disk, "127.0.9.9")
        one_line_error(res, "another cluster", "--wipe")
        assert len(cluster.cli_json("node", "list")) == 1
    finally:
        foreign.close()
    # Unknown node.
    res = cluster.cli("node", "cordon", "nosuch", check=False)
    one_line_error(res, "unknown node")
    # etcd down: a clear error, not a hang (the call's timeout bounds the wait).
    res = pxcluster("http://127.0.0.1:1", "x", "node", "list", check=False, timeout=15)
    one_line_error(res, "etcd")


def disk_identity(disk: Path) -> tuple[Superblock, set[str]]:
    """The disk's superblock and the ids of the volumes it holds replicas of (the node that
    owns it must be stopped)."""

    async def body() -> tuple[Superblock, set[str]]:
        f = OSFile.open(str(disk))
        try:
            store = ChunkStore.open(f)
            found = store.superblock, set(store.volumes())
            await store.close()
            return found
        finally:
            f.close()

    return asyncio.run(body())


def test_foreign_disk_with_wipe_joins(cluster: Cluster, tmp_path: Path, etcd: EtcdServer) -> None:
    (tmp_path / "f").mkdir()
    foreign = Cluster(tmp_path / "f", etcd, name="foreign")
    try:
        fn = foreign.add_node("f1", disk_size=256 << 20)
        old_id = foreign.node_state("f1")["id"]
        # Data on the foreign disk: a volume with a replica there, written.
        foreign.cli("volume", "create", "fv", "--size", "8M", "--repl", "1")
        old_volume = foreign.inspect("fv")["id"]
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x7e 0 1M", foreign.attach("fv", "f1")],
            check=True,
            capture_output=True,
            timeout=60,
        )
        foreign.kill("f1", signal.SIGTERM)
    finally:
        foreign.close()
    old_sb, old_volumes = disk_identity(fn.disk)
    assert old_sb.node_id == old_id and old_volume in old_volumes  # what the wipe must erase
    proc = subprocess.Popen(
        join_cmd(cluster, "w1", fn.disk, "127.0.9.8", "--wipe"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cluster.wait_for(
            lambda: any(n["name"] == "w1" and n["up"] for n in cluster.cli_json("node", "list")),
            20,
            "w1 up",
        )
        w1 = cluster.node_state("w1")
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
    # A new identity in this cluster, and nothing of the foreign cluster's left on the disk.
    assert w1["id"] != old_id and w1["used"] == 0, w1
    sb, volumes = disk_identity(fn.disk)
    assert sb.cluster_id == cluster.cli_json("cluster", "status")["id"] != old_sb.cluster_id
    assert sb.node_id == w1["id"] and sb.disk_id != old_sb.disk_id
    assert volumes == set(), volumes


def test_cordon_uncordon_remove(cluster3: Cluster) -> None:
    cluster3.cli("node", "cordon", "n2")
    assert cluster3.node_state("n2")["state"] == "cordoned"
    cluster3.cli("node", "uncordon", "n2")
    assert cluster3.node_state("n2")["state"] == "active"
    res = cluster3.cli("node", "remove", "n2", check=False)
    one_line_error(res, "up")
    cluster3.kill("n2", signal.SIGTERM)
    cluster3.cli("node", "remove", "n2")
    assert [n["name"] for n in cluster3.cli_json("node", "list")] == ["n1", "n3"]


@pytest.mark.timeout(120)
def test_etcd_restart_nodes_reestablish(cluster3: Cluster) -> None:
    ids = {n["name"]: n["id"] for n in cluster3.cli_json("node", "list")}
    cluster3.cli("volume", "create", "ev", "--size", "16M", "--repl", "2")
    uri = cluster3.attach("ev", sorted(cluster3.replica_states("ev"))[0])
    cluster3.etcd.stop()
    time.sleep(1.0)  # an outage shorter than the lease TTL window is the interesting case
    cluster3.etcd.start()
    cluster3.wait_for(
        lambda: all(n["up"] for n in cluster3.cli_json("node", "list")), 30, "all nodes up again"
    )
    assert {n["name"]: n["id"] for n in cluster3.cli_json("node", "list")} == ids
    assert all(n.running() for n in cluster3.nodes.values())
    cluster3.wait_for(lambda: leader(cluster3) is not None, 15, "a leader after the restart")
    # The attach node stopped serving while its lease was at risk; it serves again after.
    cluster3.wait_for(
        lambda: subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0,
        30,
        "the volume served again",
    )


def test_a_node_that_regranted_its_lease_can_still_become_leader(cluster3: Cluster) -> None:
    c = cluster3
    c.wait_for(lambda: leader(c) is not None, 10, "a leader")
    old = leader(c)
    assert old is not None
    paused = next(n for n in ("n1", "n2", "n3") if n != old)
    c.kill(paused, signal.SIGSTOP)  # past its TTL: its lease expires, it must take a new one
    c.wait_for(lambda: not c.node_state(paused)["up"], c.lease_ttl + 5, f"{paused} down")
    c.kill(paused, signal.SIGCONT)
    c.wait_for(lambda: c.node_state(paused)["up"], 15, f"{paused} back with a new lease")
    for n in ("n1", "n2", "n3"):
        if n not in (old, paused):
            c.kill(n)  # only the node with the re-granted lease is left to lead
    c.kill(old)
    c.wait_for(lambda: leader(c) == paused, c.lease_ttl + 5, f"{paused} elected")


async def test_revoking_a_lease_etcd_no_longer_has_is_done(etcd: EtcdServer) -> None:
    # A node restarting just as its previous run's lease expired saw "lease not found" from the
    # revoke and stopped with "etcd is unreachable" (a failover test caught it once).
    client = Etcd(etcd.url)
    await client.connect()
    try:
        lease = await client.grant_lease(5)
        await client.revoke_lease(lease)
        await client.revoke_lease(lease)  # gone: done, no error
        await client.revoke_lease(0x7A7A7A7A)  # never existed: the same
    finally:
        await client.close()
    with pytest.raises(EtcdUnavailable):  # what is not "lease not found" still fails
        down = Etcd("http://127.0.0.1:1", timeout=1.0)
        await down.revoke_lease(1)
