"""Node drain, cordon and decommission, on real processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import Cluster
from tests.harness.stamps import Writer, check, has_libnbd


def drain_op(c: Cluster, node: str) -> dict[str, Any]:
    node_id = c.node_state(node)["id"]
    ops = c.etcd_get_prefix(f"/pxc/{c.name}/ops/drain-{node_id}")
    return ops[0] if ops else {}


def holders(c: Cluster, volume: str) -> set[str]:
    return set(c.replica_states(volume))


@pytest.mark.skipif(not has_libnbd(), reason="python3-libnbd (Debian) not installed")
@pytest.mark.timeout(300)
def test_drain_moves_replicas_and_attachment_under_load(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    for n in ("n1", "n2", "n3", "n4"):
        c.add_node(n)
    c.cli("volume", "create", "d3", "--size", "64M", "--repl", "3")
    c.cli("volume", "create", "d2", "--size", "64M", "--repl", "2")
    target = sorted(holders(c, "d3") & holders(c, "d2"))[0]  # N holds a replica of both
    uri = c.attach("d3", target)
    c.attach("d2", sorted(holders(c, "d2") - {target})[0])
    plan = json.loads(c.cli("node", "drain", target, "--dry-run", "--json").stdout)
    assert sorted(m["volume"] for m in plan["replicas"]) == ["d2", "d3"]
    assert [a["volume"] for a in plan["attachments"]] == ["d3"]
    assert plan["losing_redundancy"] == [] and all(m["to"] for m in plan["replicas"])
    assert c.node_state(target)["state"] == "active"  # a dry run changes nothing
    urifile = tmp_path / "uri"
    urifile.write_text(uri)
    writer = Writer(urifile, 2048, seconds=10, seed=3)
    time.sleep(1.5)
    res = c.cli("node", "drain", target, "--wait", "--timeout", "120", "--json", check=False)
    assert res.returncode == 0, res.stderr
    op = json.loads(res.stdout)
    assert op["state"] == "done" and op["replicas_moved"] == 2 and op["attachments_moved"] == 1
    # The writer follows the volume to its new node.
    info = c.inspect("d3")
    assert info["attached_node"] not in (None, target)
    urifile.write_text(info["nbd_uri"])
    history = writer.finish()
    assert history.acked
    for vol, repl in (("d3", 3), ("d2", 2)):
        states = c.replica_states(vol)
        assert target not in states and len(states) == repl
        assert all(s == "in_sync" for s in states.values()), states
    result = check(history, c.inspect("d3")["nbd_uri"], 2048)
    assert result.ok, result
    assert c.node_state(target)["state"] == "drained"
    for i in range(3):
        info = c.cli_json("volume", "create", f"after{i}", "--size", "16M", "--repl", "3")
        assert target not in {r["node"] for r in info["replicas"]}
    c.wait_for(lambda: c.node_state(target)["used"] == 0, 30, "the drained node's chunks freed")
    c.kill(target, signal.SIGTERM)
    c.cli("node", "remove", target)
    assert target not in {n["name"] for n in c.cli_json("node", "list")}


@pytest.mark.timeout(300)
def test_drain_refused_when_replication_cannot_be_kept(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "r3", "--size", "32M", "--repl", "3")
    res = c.cli("node", "drain", "n2", check=False)
    assert res.returncode != 0
    assert (
        len(res.stderr.strip().splitlines()) == 1 and "r3" in res.stderr and "--force" in res.stderr
    )
    assert c.node_state("n2")["state"] == "active"  # nothing half done
    plan = json.loads(c.cli("node", "drain", "n2", "--dry-run", "--json").stdout)
    assert plan["losing_redundancy"] == ["r3"]
    res = c.cli("node", "drain", "n2", "--force", "--wait", "--timeout", "60", check=False)
    assert res.returncode == 0, res.stderr
    assert "fewer replicas" in res.stderr
    states = c.replica_states("r3")
    assert sorted(states) == ["n1", "n3"] and all(s == "in_sync" for s in states.values())
    assert c.node_state("n2")["state"] == "drained"


@pytest.mark.timeout(300)
def test_leader_killed_mid_drain_and_uncordon_cancels(cluster: Cluster) -> None:
    c = cluster
    for n in ("n1", "n2", "n3", "n4"):
        c.add_node(n, extra=("--rebuild-bw", "8M"))
    c.wait_for(lambda: c.cli_json("cluster", "status")["leader"] is not None, 10, "leader")
    leader = c.cli_json("cluster", "status")["leader"]
    others = [n for n in ("n1", "n2", "n3", "n4") if n != leader]
    c.cli("volume", "create", "big", "--size", "128M", "--repl", "2")
    reps = holders(c, "big")
    target = sorted(reps - {leader})[0] if reps - {leader} else others[0]
    uri = c.attach("big", sorted(reps - {target})[0] if reps - {target} else others[1])
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x7 0 96M", uri],
        check=True,
        capture_output=True,
        timeout=120,
    )
    c.cli("node", "drain", target)
    c.wait_for(lambda: int(drain_op(c, target).get("bytes_copied", 0)) > 0, 60, "drain copying")
    c.kill(leader)
    if leader in holders(c, "big"):
        c.start(leader)  # its replica must come back for the drain to finish safely
    res = c.cli("node", "drain", target, "--wait", "--timeout", "120", check=False)
    assert res.returncode == 0, res.stderr + c.log_tail(others[0])
    assert target not in holders(c, "big")
    assert c.node_state(target)["state"] == "drained"
    # A second drain, cancelled by uncordon: the node goes back to service.
    c.cli("node", "uncordon", target)
    assert c.node_state(target)["state"] == "active"
    c.cli("volume", "create", "big2", "--size", "128M", "--repl", "2")
    victim = sorted(holders(c, "big2"))[0]
    uri2 = c.attach("big2", sorted(holders(c, "big2"))[1])
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x8 0 96M", uri2],
        check=True,
        capture_output=True,
        timeout=120,
    )
    c.cli("node", "drain", victim)
    c.cli("node", "uncordon", victim)
    c.wait_for(lambda: drain_op(c, victim).get("state") == "cancelled", 30, "drain cancelled")
    assert c.node_state(victim)["state"] == "active"


@pytest.mark.timeout(120)
def test_sigterm_hands_attachments_off_cleanly(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "ht", "--size", "32M", "--repl", "2")
    on = sorted(holders(c, "ht"))[0]
    uri = c.attach("ht", on)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 4M", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    c.kill(on, signal.SIGTERM)
    c.wait_for(lambda: c.inspect("ht")["state"] == "attached", 30, "served elsewhere")
    info = c.inspect("ht")
    f = info["last_failover"]
    assert info["attached_node"] != on and f["kind"] == "handoff" and f["reconciled_chunks"] == 0
    # Only the stopped node's replica is behind (it is down), and it catches up on return.
    assert {r["node"]: r["state"] for r in info["replicas"]} == {
        on: "stale",
        info["attached_node"]: "in_sync",
    }
    c.start(on)
    c.wait_for(lambda: set(c.replica_states("ht").values()) == {"in_sync"}, 60, "back in sync")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 4M", info["nbd_uri"]],
        check=True,
        capture_output=True,
        timeout=60,
    )
