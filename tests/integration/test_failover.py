"""Failover (automatic and by hand) and incremental rebuild, with real processes."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.stamps import UriFollower, Writer, check, has_libnbd

pytestmark = pytest.mark.skipif(not has_libnbd(), reason="python3-libnbd (Debian) not installed")


def serving_on(c: Cluster, name: str, node: str) -> bool:
    info = c.inspect(name)
    return bool(info["attached_node"] == node and info["state"] == "attached")


def all_in_sync(c: Cluster, name: str) -> bool:
    return all(r["state"] == "in_sync" for r in c.inspect(name)["replicas"])


def nbd_serves(uri: str) -> bool:
    return (
        subprocess.run(["nbdinfo", "--size", uri], capture_output=True, timeout=30).returncode == 0
    )


@pytest.mark.timeout(240)
def test_kill_attach_node_under_load_fails_over_and_rebuilds(
    cluster3: Cluster, tmp_path: Path
) -> None:
    c = cluster3
    c.cli("volume", "create", "fv", "--size", "64M", "--repl", "3")
    uri = c.attach("fv", "n1")
    urifile = tmp_path / "uri"
    urifile.write_text(uri)
    follower = UriFollower(c, "fv", urifile)
    nblocks = 4096
    writer = Writer(urifile, nblocks, seconds=120, seed=7)  # stopped below
    writer.wait_acked(timeout=30)  # writes in flight when the node dies
    c.kill("n1")
    writer.fault()
    c.wait_for(lambda: c.inspect("fv")["attached_node"] not in (None, "n1"), 30, "failover")
    writer.wait_acked(timeout=30)  # the writer follows the volume and is answered there
    writer.stop()
    history = writer.finish()
    follower.close()
    info = c.inspect("fv")
    assert follower.moves, "the URI never moved"
    f = info["last_failover"]
    assert f["kind"] == "automatic" and f["from"] == "n1" and f["to"] == info["attached_node"]
    assert f["done"] and f["serve_s"] is not None
    assert {r["node"]: r["state"] for r in info["replicas"]}["n1"] == "stale"
    result = check(history, info["nbd_uri"], nblocks)  # requires acks before and after
    assert result.ok, result
    # n1 comes back on its old disk: its replica is rebuilt incrementally, then in sync.
    c.start("n1")
    c.wait_for(lambda: all_in_sync(c, "fv"), 60, "n1's replica back in sync")
    assert c.inspect("fv")["health"] == "healthy"


@pytest.mark.timeout(240)
def test_sigstop_attach_node_past_ttl_acks_nothing_after_takeover(
    cluster3: Cluster, tmp_path: Path
) -> None:
    c = cluster3
    c.cli("volume", "create", "sv", "--size", "32M", "--repl", "3")
    uri = c.attach("sv", "n2")
    urifile = tmp_path / "uri"
    urifile.write_text(uri)
    follower = UriFollower(c, "sv", urifile)
    nblocks = 2048
    writer = Writer(urifile, nblocks, seconds=120, seed=11)  # stopped below
    writer.wait_acked(timeout=30)
    c.kill("n2", signal.SIGSTOP)
    writer.fault()
    c.wait_for(lambda: c.inspect("sv")["attached_node"] not in (None, "n2"), 30, "failover")
    c.kill("n2", signal.SIGCONT)  # the old engine wakes up with writes queued
    writer.wait_acked(timeout=30)
    writer.stop()
    history = writer.finish()
    follower.close()
    info = c.inspect("sv")
    result = check(history, info["nbd_uri"], nblocks)  # requires acks before and after
    assert result.ok, result
    # The resumed node stops serving the volume at once: its clients get errors or nothing.
    old = c.nodes["n2"]
    c.wait_for(lambda: not nbd_serves(f"nbd://{old.address}:{old.nbd_port}/sv"), 15, "n2 fenced")
    c.wait_for(lambda: all_in_sync(c, "sv"), 60, "n2's replica rebuilt")


@pytest.mark.timeout(240)
def test_replica_node_restart_rebuilds_only_changed_chunks(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "rv", "--size", "256M", "--repl", "3")
    uri = c.attach("rv", "n1")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 200M", uri],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # The engine records idle chunks clean (after a covering flush) within a few seconds: only
    # then is a chunk's generation the whole story, and only changed chunks need copying.
    c.wait_for(lambda: c.all_chunks_clean("n1", "rv"), 30, "idle chunks marked clean")
    c.kill("n3")
    # 3 chunks change while n3 is away (4 MiB chunks): 1M at 8M, 1M at 100M, 4k at 199M.
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x22 8M 1M",
            "-c",
            "write -P 0x33 100M 1M",
            "-c",
            "write -P 0x44 199M 4k",
            uri,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert {r["node"]: r["state"] for r in c.inspect("rv")["replicas"]}["n3"] == "stale"
    c.start("n3")
    c.wait_for(lambda: all_in_sync(c, "rv"), 60, "n3 in sync")
    ops = c.etcd_get_prefix("/pxc/test/ops/")
    rebuild = [o for o in ops if o["node"] == c.node_state("n3")["id"]]
    assert rebuild and rebuild[-1]["state"] == "done"
    assert rebuild[-1]["copied_chunks"] <= 4, rebuild[-1]  # 3 changed chunks, not 50
    # n3's copy is byte for byte the others': serve it from n3 (reads are local there).
    c.cli("volume", "detach", "rv")
    uri3 = c.attach("rv", "n3")
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read -P 0x11 0 8M",
            "-c",
            "read -P 0x22 8M 1M",
            "-c",
            "read -P 0x33 100M 1M",
            "-c",
            "read -P 0x44 199M 4k",
            uri3,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.timeout(180)
def test_manual_failover_clean_handoff_and_drill(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "mv", "--size", "32M", "--repl", "2")
    holders = [r["node"] for r in c.inspect("mv")["replicas"]]
    uri = c.attach("mv", holders[0])
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    epoch = c.inspect("mv")["epoch"]
    out = c.cli("volume", "failover", "mv", "--to", holders[1]).stdout.strip()
    n = c.nodes[holders[1]]
    assert out == f"nbd://{n.address}:{n.nbd_port}/mv"
    info = c.inspect("mv")
    assert info["epoch"] == epoch + 1 and info["attached_node"] == holders[1]
    assert info["last_failover"]["kind"] == "handoff"
    metrics = urllib.request.urlopen(f"http://{n.address}:{n.ports['api']}/metrics", timeout=10)
    text = metrics.read().decode()
    assert 'pxc_failovers_total{kind="handoff"} 1.0' in text
    assert "pxc_failover_seconds_bucket" in text and "pxc_node_capacity_bytes" in text
    assert 'pxc_volume_ops_total{op="write",volume="mv"}' in text
    assert 'pxc_volume_stale_replicas{volume="mv"} 0.0' in text
    assert all(r["state"] == "in_sync" for r in info["replicas"])  # clean: nobody went stale
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x77 0 1M", out],
        check=True,
        capture_output=True,
        timeout=60,
    )
    drill = c.cli("volume", "failover", "mv", "--drill").stdout
    assert "serving after" in drill
    info = c.inspect("mv")
    assert info["last_failover"]["kind"] == "drill" and info["last_failover"]["serve_s"] > 0
    res = c.cli("volume", "failover", "mv", "--to", info["attached_node"], check=False)
    assert res.returncode != 0 and "already attached" in res.stderr


@pytest.mark.timeout(240)
def test_leader_killed_with_the_attach_node(cluster3: Cluster) -> None:
    c = cluster3
    c.wait_for(lambda: c.cli_json("cluster", "status")["leader"] is not None, 10, "leader")
    leader = c.cli_json("cluster", "status")["leader"]
    others = [n for n in ("n1", "n2", "n3") if n != leader]
    c.cli("volume", "create", "lv", "--size", "32M", "--repl", "3")
    uri = c.attach("lv", others[0])
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 2M", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    c.kill(leader)
    c.kill(others[0])
    c.wait_for(lambda: serving_on(c, "lv", others[1]), 30, f"lv served on {others[1]}")
    uri2 = c.inspect("lv")["nbd_uri"]
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x66 0 2M", uri2],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.timeout(240)
def test_all_replica_nodes_killed_and_restarted(cluster3: Cluster, tmp_path: Path) -> None:
    c = cluster3
    c.cli("volume", "create", "av", "--size", "32M", "--repl", "3")
    uri = c.attach("av", "n1")
    urifile = tmp_path / "uri"
    urifile.write_text(uri)
    follower = UriFollower(c, "av", urifile)
    nblocks = 2048
    writer = Writer(urifile, nblocks, seconds=120, seed=5)  # stopped below
    writer.wait_acked(timeout=30)
    for n in ("n1", "n2", "n3"):
        c.kill(n)
    writer.fault()
    for n in ("n1", "n2", "n3"):
        c.start(n, wait=False)
    for n in ("n1", "n2", "n3"):
        c.wait_up(n)
    c.wait_for(lambda: c.inspect("av")["state"] == "attached", 60, "av attached again")
    writer.wait_acked(timeout=60)  # served again: the writer is answered after the restart
    writer.stop()
    history = writer.finish()
    follower.close()
    info = c.inspect("av")
    result = check(history, info["nbd_uri"], nblocks)  # requires acks before and after
    assert result.ok, result
