"""The REST API of real node processes: the CLI's operations over HTTP, on a 3-node cluster."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import Cluster, NodeProc


def http(
    node: NodeProc, method: str, path: str, body: Any = None, *, token: str | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://{node.address}:{node.ports['api']}{path}", data=data, method=method
    )
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_freed(c: Cluster, holders: list[str]) -> None:
    """Delete frees the volume's chunks on each replica node (and a node stopped while it
    frees them hangs in its stop, so the test waits for it either way)."""
    for name in holders:
        c.wait_for(
            lambda n=name: "chunks freed" in c.log_tail(n, 50), 20, f"chunks freed on {name}"
        )


@pytest.mark.timeout(180)
def test_volume_lifecycle_over_http(cluster3: Cluster) -> None:
    c = cluster3
    n1, n2 = c.nodes["n1"], c.nodes["n2"]
    status, nodes = http(n1, "GET", "/v1/nodes")
    assert status == 200 and [n["name"] for n in nodes] == ["n1", "n2", "n3"]
    assert all(n["up"] for n in nodes)
    assert nodes == c.cli_json("node", "list")  # the same service, the same shape
    status, st = http(n2, "GET", "/v1/cluster")
    assert status == 200 and st["nodes_up"] == 3 and st["leader"] in ("n1", "n2", "n3")

    status, vol = http(n1, "POST", "/v1/volumes", {"name": "web", "size": "64M", "repl": 3})
    assert status == 201 and vol["state"] == "detached" and len(vol["replicas"]) == 3
    status, listed = http(n2, "GET", "/v1/volumes")
    assert [v["name"] for v in listed] == ["web"]

    status, att = http(n1, "POST", "/v1/volumes/web/attach", {"node": "n2", "wait": True})
    assert status == 200, att
    assert att["state"] == "attached" and att["attached_node"] == "n2"
    assert att["nbd_uri"] == f"nbd://{n2.address}:{n2.nbd_port}/web"
    epoch = att["epoch"]
    status, got = http(n1, "GET", "/v1/volumes/web")
    assert got == c.inspect("web")

    status, moved = http(n3 := c.nodes["n3"], "POST", "/v1/volumes/web/failover", {"to": "n3"})
    assert status == 200, moved
    assert moved["attached_node"] == "n3" and moved["epoch"] > epoch
    assert moved["nbd_uri"] == f"nbd://{n3.address}:{n3.nbd_port}/web"
    assert moved["last_failover"]["kind"] == "handoff"

    status, err = http(n1, "DELETE", "/v1/volumes/web")
    assert status == 409 and "detach it first" in err["error"]
    status, det = http(n1, "POST", "/v1/volumes/web/detach", {})
    assert status == 200 and det["state"] == "detached" and det["attached_node"] is None
    status, out = http(n1, "DELETE", "/v1/volumes/web")
    assert status == 200 and out["deleted"] is True
    wait_freed(c, ["n1", "n2", "n3"])
    status, err = http(n1, "GET", "/v1/volumes/web")
    assert status == 404 and err == {"error": "unknown volume 'web'"}


@pytest.mark.timeout(180)
def test_drain_dry_run_bad_input_auth_and_openapi(cluster3: Cluster, tmp_path: Path) -> None:
    c = cluster3
    n1 = c.nodes["n1"]
    http(n1, "POST", "/v1/volumes", {"name": "r3", "size": "16M", "repl": 3})
    status, plan = http(n1, "POST", "/v1/nodes/n2/drain", {"dry_run": True})
    assert status == 200 and plan["node"] == "n2" and plan["losing_redundancy"] == ["r3"]
    assert c.node_state("n2")["state"] == "active"
    status, err = http(n1, "POST", "/v1/nodes/n2/drain", {"force": False})
    assert status == 409 and "--force" in err["error"]
    status, n = http(n1, "POST", "/v1/nodes/n3/cordon")
    assert status == 200 and n["state"] == "cordoned" == c.node_state("n3")["state"]
    status, n = http(n1, "POST", "/v1/nodes/n3/uncordon")
    assert status == 200 and n["state"] == "active"

    for body, code in [
        ({"name": "x", "size": "huge"}, 400),
        ({"name": "x", "size": 4096, "repl": 0}, 400),
        ({"name": "r3", "size": "1M"}, 409),
        ({"name": "big", "size": "1P", "repl": 1}, 409),
    ]:
        status, err = http(n1, "POST", "/v1/volumes", body)
        assert status == code and err["error"], (body, status, err)
    status, err = http(n1, "POST", "/v1/volumes/r3/attach", {"node": "n9"})
    assert status == 404 and err["error"] == "unknown node 'n9'"

    status, doc = http(n1, "GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.") and "/v1/volumes" in doc["paths"]

    token_file, read_file = tmp_path / "token", tmp_path / "read-token"
    token_file.write_text("tok-123\n")
    read_file.write_text("read-456\n")
    n4 = c.add_node(
        "n4", extra=("--api-token-file", str(token_file), "--api-read-token-file", str(read_file))
    )
    status, err = http(n4, "POST", "/v1/volumes", {"name": "t", "size": "1M"})
    assert status == 401 and "Bearer" in err["error"]
    status, err = http(n4, "POST", "/v1/volumes", {"name": "t", "size": "1M"}, token="nope")
    assert status == 401
    status, _ = http(n4, "GET", "/v1/volumes")
    assert status == 401  # reads need a token too
    status, _ = http(n4, "GET", "/v1/volumes", token="read-456")
    assert status == 200
    status, err = http(n4, "POST", "/v1/volumes", {"name": "t", "size": "1M"}, token="read-456")
    assert status == 403 and "read-only" in err["error"]
    status, vol = http(n4, "POST", "/v1/volumes", {"name": "t", "size": "1M"}, token="tok-123")
    assert status == 201 and vol["name"] == "t"
    status, _ = http(n4, "DELETE", "/v1/volumes/t", token="tok-123")
    assert status == 200
    wait_freed(c, [r["node"] for r in vol["replicas"]])


def qemu_io(uri: str, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    subprocess.run(
        ["qemu-io", "-f", "raw", *args, uri], check=True, capture_output=True, timeout=60
    )


@pytest.mark.timeout(240)
def test_snapshot_clone_scrub_over_http(cluster3: Cluster) -> None:
    c = cluster3
    n1, n2 = c.nodes["n1"], c.nodes["n2"]
    status, vol = http(n1, "POST", "/v1/volumes", {"name": "src", "size": "16M", "repl": 2})
    assert status == 201, vol
    status, att = http(n1, "POST", "/v1/volumes/src/attach", {"node": "n1", "wait": True})
    assert status == 200 and att["state"] == "attached", att
    uri = att["nbd_uri"]
    qemu_io(uri, "write -P 0x5a 0 8M", "flush")

    status, snap = http(n2, "POST", "/v1/volumes/src/snapshots", {"name": "s1"})
    assert status == 201, snap
    assert snap["name"] == "s1" and snap["volume"] == "src" and snap["state"] == "ready"
    qemu_io(uri, "write -P 0xa5 0 1M", "flush")  # after the snapshot: not in the clone
    status, listed = http(n1, "GET", "/v1/volumes/src/snapshots")
    assert status == 200 and listed == [snap]
    assert listed == c.cli_json("volume", "snapshot", "list", "src")
    status, err = http(n1, "POST", "/v1/volumes/src/snapshots", {"name": "s1"})
    assert status == 409 and "already has a snapshot" in err["error"]
    status, err = http(n1, "DELETE", "/v1/volumes/src/snapshots/nope")
    assert status == 404 and "no snapshot 'nope'" in err["error"]

    status, cl = http(n2, "POST", "/v1/volumes/src/clone", {"snapshot": "s1", "name": "cl"})
    assert status == 201, cl
    assert cl["name"] == "cl" and cl["repl"] == 2 and cl["size"] == 16 << 20
    assert cl["clone_of"]["volume"] == "src" and cl["clone_of"]["snapshot"] == "s1"
    assert cl["clone_of"]["state"] in ("copying", "done")

    status, rep = http(n1, "POST", "/v1/volumes/src/scrub", {"timeout": 60})
    assert status == 200, rep
    assert rep["volume"] == "src" and rep["chunks"] >= 2
    assert rep["repaired"] == [] and rep["unrepairable"] == []
    assert set(rep) == {"volume", "chunks", "skipped", "repaired", "unrepairable", "seconds"}

    deadline = time.monotonic() + 90
    while True:
        status, got = http(n1, "GET", "/v1/volumes/cl")
        assert status == 200, got
        if got["clone_of"]["state"] == "done":
            break
        assert time.monotonic() < deadline, f"clone copy not done: {got['clone_of']}"
        time.sleep(0.2)
    assert got["clone_of"]["chunks_copied"] == got["clone_of"]["chunks_total"]
    status, out = http(n1, "DELETE", "/v1/volumes/src/snapshots/s1")
    assert status == 200 and out == {"volume": "src", "snapshot": "s1", "deleted": True}
    status, listed = http(n2, "GET", "/v1/volumes/src/snapshots")
    assert status == 200 and listed == []

    # The clone holds the snapshot's data, not what the source got afterwards.
    status, att = http(n1, "POST", "/v1/volumes/cl/attach", {"node": "n2", "wait": True})
    assert status == 200 and att["state"] == "attached", att
    qemu_io(att["nbd_uri"], "read -P 0x5a 0 8M", "read -P 0 8M 8M")
