"""Snapshots survive a drain (the moved replica carries both layers, the drained
node keeps none), and snapshotting a detached volume leaves it detached. Real etcd, real
node processes, real NBD clients; snapshot data read straight off each replica."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess

import pytest

from replica.client import ReplicaClient
from replica.errors import UnknownVolume
from tests.harness.cluster import Cluster
from tests.integration.test_snapshots import nbd_sha, qemu_io, replica_views

MiB = 1 << 20
SIZE = 24 * MiB


def holders(c: Cluster, volume: str) -> set[str]:
    return set(c.replica_states(volume))


def only(c: Cluster, names: set[str]) -> Cluster:
    """The same cluster, seen through a subset of its nodes (for replica_views)."""
    view = copy.copy(c)
    view.nodes = {n: c.nodes[n] for n in sorted(names)}
    return view


def etcd_key_present(c: Cluster, key: str) -> bool:
    res = subprocess.run(
        ["etcdctl", "--endpoints", c.etcd.url, "get", "--keys-only", key],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return bool(res.stdout.strip())


async def replica_snapshot_ids(c: Cluster, node: str, vid: str) -> list[str] | None:
    """The snapshot layers the node's replica of `vid` holds; None when it holds no replica."""
    n = c.nodes[node]
    client = ReplicaClient(n.address, n.ports["data"], key=c.replica_key())
    try:
        return [s.id for s in await client.snapshots(vid)]
    except UnknownVolume:
        return None
    finally:
        await client.close()


@pytest.mark.timeout(300)
def test_drain_moves_replica_with_its_snapshots(cluster: Cluster) -> None:
    c = cluster
    for n in ("n1", "n2", "n3", "n4"):
        c.add_node(n)
    c.cli("volume", "create", "sd", "--size", "24M", "--repl", "3")
    before = holders(c, "sd")
    assert len(before) == 3
    attach_on = sorted(before)[0]
    target = sorted(before - {attach_on})[0]  # holds a replica, does not serve the volume
    uri = c.attach("sd", attach_on)
    vid = str(c.inspect("sd")["id"])

    # Two snapshots, data written after each (whole and partial blocks, several chunks).
    qemu_io(uri, "write -P 0x61 0 20M", "write -P 0x62 22M 300k")
    sha1 = nbd_sha(uri)
    s1 = c.cli_json("volume", "snapshot", "create", "sd", "--name", "s1")
    qemu_io(uri, "write -P 0x63 1M 3M", "write -P 0x64 9000 777", "write -z 16M 8k")
    sha2 = nbd_sha(uri)
    assert sha2 != sha1
    s2 = c.cli_json("volume", "snapshot", "create", "sd", "--name", "s2")
    qemu_io(uri, "write -P 0x65 5M 4M", "write -P 0x66 23M 100")
    head = nbd_sha(uri)
    assert head not in (sha1, sha2)

    res = c.cli("node", "drain", target, "--wait", "--timeout", "150", "--json", timeout=200)
    op = json.loads(res.stdout)
    assert op["state"] == "done" and op["replicas_moved"] == 1, op
    assert op["attachments_moved"] == 0, op
    assert c.node_state(target)["state"] == "drained"

    # The volume stayed where it was, with the same data, on three in-sync replicas.
    info = c.inspect("sd")
    assert info["attached_node"] == attach_on and info["nbd_uri"] == uri
    after = holders(c, "sd")
    assert target not in after and len(after) == 3 and len(after - before) == 1, after
    assert set(c.replica_states("sd").values()) == {"in_sync"}
    assert nbd_sha(uri) == head
    listed = c.cli_json("volume", "snapshot", "list", "sd")
    assert [(x["name"], x["state"]) for x in listed] == [("s1", "ready"), ("s2", "ready")]

    # Every replica, the moved one included, holds both snapshots with their data.
    replicas = only(c, after)
    views1 = asyncio.run(replica_views(replicas, "sd", s1["id"], SIZE))
    views2 = asyncio.run(replica_views(replicas, "sd", s2["id"], SIZE))
    assert views1 == dict.fromkeys(sorted(after), sha1), views1
    assert views2 == dict.fromkeys(sorted(after), sha2), views2
    for n in after:
        ids = asyncio.run(replica_snapshot_ids(c, n, vid))
        assert ids == [s1["id"], s2["id"]], (n, ids)

    # The drained node frees its replica, snapshot layers and all.
    c.wait_for(lambda: c.node_state(target)["used"] == 0, 30, "the drained node's chunks freed")
    assert asyncio.run(replica_snapshot_ids(c, target, vid)) in (None, [])
    assert nbd_sha(uri) == head


@pytest.mark.timeout(180)
def test_snapshot_of_detached_volume_leaves_it_detached(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "cold", "--size", "12M", "--repl", "3")
    uri = c.attach("cold", "n2")
    qemu_io(uri, "write -P 0x71 0 9M", "write -P 0x72 11M 5000")
    sha = nbd_sha(uri)
    c.cli("volume", "detach", "cold")
    c.wait_for(lambda: c.inspect("cold")["attached_node"] in (None, ""), 30, "detach")
    vid = str(c.inspect("cold")["id"])
    target_key = f"/pxc/{c.name}/volumes/{vid}/target"
    attachment_key = f"/pxc/{c.name}/volumes/{vid}/attachment"
    c.wait_for(
        lambda: not etcd_key_present(c, target_key) and not etcd_key_present(c, attachment_key),
        30,
        "the detach to finish (no target, no attachment)",
    )

    snap = c.cli_json("volume", "snapshot", "create", "cold", "--name", "frozen")
    assert snap["state"] == "ready" and snap["name"] == "frozen"
    info = c.inspect("cold")
    assert info["attached_node"] in (None, "") and info["state"] == "detached", info
    assert info["nbd_uri"] in (None, "")
    # The engine that took the snapshot was only borrowed: it lets the volume go.
    c.wait_for(
        lambda: not etcd_key_present(c, target_key) and not etcd_key_present(c, attachment_key),
        30,
        "the snapshot's serving engine to let the volume go (no target, no attachment)",
    )
    info = c.inspect("cold")
    assert info["attached_node"] in (None, "") and info["state"] == "detached", info
    views = asyncio.run(replica_views(c, "cold", snap["id"], 12 * MiB))
    assert views == dict.fromkeys(["n1", "n2", "n3"], sha), views
    # Still usable as before: attach elsewhere, same data.
    assert nbd_sha(c.attach("cold", "n3")) == sha
