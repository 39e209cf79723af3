"""Snapshots (online, crash-consistent, the same on every replica), clone, revert,
delete, and snapshots carried through failover and rebuild. Real etcd, real nodes, real NBD."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from typing import Any

import pytest

from pxcluster.nbd.client import NbdClient
from replica.client import ReplicaClient
from tests.harness.cluster import Cluster

MiB = 1 << 20
BLOCK = 4096


def qemu_io(uri: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    res = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "fail" not in res.stdout.lower(), res.stdout + res.stderr


def nbd_sha(uri: str) -> str:
    data = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True, timeout=60)
    return hashlib.sha256(data.stdout).hexdigest()


def volume_id(c: Cluster, name: str) -> str:
    return str(c.inspect(name)["id"])


async def replica_views(c: Cluster, vol: str, snap_id: str, size: int) -> dict[str, str]:
    """sha256 of the snapshot as each node's replica holds it, read straight off the replica."""
    vid = volume_id(c, vol)
    out: dict[str, str] = {}
    for name, n in c.nodes.items():
        client = ReplicaClient(n.address, n.ports["data"], key=c.replica_key())
        try:
            snaps = await client.snapshots(vid)
            if snap_id not in [s.id for s in snaps]:
                out[name] = "missing"
                continue
            h = hashlib.sha256()
            chunk = 4 * MiB
            for i in range(-(-size // chunk)):
                n_bytes = min(chunk, size - i * chunk)
                h.update(await client.read(vid, 0, i, 0, n_bytes, snapshot=snap_id))
            out[name] = h.hexdigest()
        finally:
            await client.close()
    return out


def settled_usage(c: Cluster) -> int:
    """The nodes' published usage once it holds still over a refresh (each node rewrites its
    record every 2 s): read too early, it misses chunks just written, and a later drop can
    hide behind them."""
    last = -1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        used = sum(n["used"] for n in c.cli_json("node", "list"))
        if used == last:
            return used
        last = used
        time.sleep(2.5)
    raise AssertionError("the nodes' usage did not settle in 30 s")


@pytest.mark.timeout(240)
def test_snapshot_clone_revert_delete(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "db", "--size", "16M", "--repl", "3")
    uri = c.attach("db", "n1")
    qemu_io(uri, "write -P 0x11 0 8M", "write -P 0x12 12M 100k")
    old_sha = nbd_sha(uri)
    snap = c.cli_json("volume", "snapshot", "create", "db", "--name", "before")
    assert snap["name"] == "before" and snap["state"] == "ready" and snap["volume"] == "db"
    # Overwrite part of a block and whole blocks: the snapshot keeps the old bytes.
    qemu_io(uri, "write -P 0x21 100 1000", "write -P 0x22 4M 64k", "write -z 12M 4k")
    new_sha = nbd_sha(uri)
    assert new_sha != old_sha
    listed = c.cli_json("volume", "snapshot", "list", "db")
    assert [(x["name"], x["state"]) for x in listed] == [("before", "ready")]
    assert set(listed[0]) >= {"id", "name", "volume", "created", "state"}

    # Errors: one line, non-zero, nothing changed.
    for args, text in [
        (("volume", "snapshot", "create", "db", "--name", "before"), "already has"),
        (("volume", "snapshot", "create", "nope", "--name", "x"), "unknown volume"),
        (("volume", "snapshot", "create", "db", "--name", "../x"), "invalid snapshot name"),
        (("volume", "snapshot", "delete", "db", "ghost"), "no snapshot"),
        (("volume", "revert", "db", "--snapshot", "before"), "detach"),
        (("volume", "clone", "db", "--snapshot", "ghost", "--name", "c2"), "no snapshot"),
    ]:
        res = c.cli(*args, check=False)
        assert res.returncode != 0 and text in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert len(c.cli_json("volume", "snapshot", "list", "db")) == 1

    # Every replica holds the same snapshot, read straight off the replicas.
    views = asyncio.run(replica_views(c, "db", snap["id"], 16 * MiB))
    assert set(views.values()) == {old_sha}, views

    # Clone: independent, with the snapshot's data; the volume keeps the new data.
    info = c.cli_json("volume", "clone", "db", "--snapshot", "before", "--name", "db-old")
    assert info["name"] == "db-old" and info["size"] == 16 * MiB
    clone_uri = c.attach("db-old", "n2")
    assert nbd_sha(clone_uri) == old_sha
    assert nbd_sha(uri) == new_sha
    qemu_io(clone_uri, "write -P 0x33 0 4k")
    assert nbd_sha(uri) == new_sha

    # Revert (detached only) brings the old data back; later writes land on top.
    c.cli("volume", "detach", "db")
    c.wait_for(lambda: c.inspect("db")["attached_node"] in (None, ""), 30, "detach")
    c.cli("volume", "revert", "db", "--snapshot", "before")
    uri = c.attach("db", "n3")
    assert nbd_sha(uri) == old_sha

    # Deleting the snapshot keeps the volume's data and frees the overwritten chunks' copies.
    qemu_io(uri, "write -P 0x44 0 8M")
    head_sha = nbd_sha(uri)
    used_before = settled_usage(c)  # counting the head entries that write just made
    c.cli("volume", "snapshot", "delete", "db", "before")
    assert c.cli_json("volume", "snapshot", "list", "db") == []
    assert nbd_sha(uri) == head_sha

    def freed() -> bool:
        return sum(n["used"] for n in c.cli_json("node", "list")) < used_before

    c.wait_for(freed, 30, "the snapshot's chunks to be freed")


class StampLog:
    """Stamped 4 KiB writes from several in-process NBD writers, with issue and ack times."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.writes: dict[int, list[tuple[float, float, int]]] = {b: [] for b in range(blocks)}
        self.stop = False

    async def writer(self, uri: str, first: int, step: int) -> None:
        client = await NbdClient.connect(uri)
        value = 0
        try:
            while not self.stop:
                for b in range(first, self.blocks, step):
                    value += 1
                    stamp = (b << 32 | value).to_bytes(8, "little") * (BLOCK // 8)
                    issued = time.monotonic()
                    await client.write(b * BLOCK, stamp)
                    self.writes[b].append((issued, time.monotonic(), value))
                    if self.stop:
                        break
        finally:
            await client.close()


@pytest.mark.timeout(240)
def test_snapshot_under_load_is_crash_consistent(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "load", "--size", "8M", "--repl", "3")
    uri = c.attach("load", "n1")
    log = StampLog(blocks=512)

    async def run() -> tuple[float, float, dict[str, Any]]:
        tasks = [asyncio.create_task(log.writer(uri, i, 4)) for i in range(4)]
        await asyncio.sleep(1.5)
        t0 = time.monotonic()
        res = await asyncio.to_thread(
            c.cli_json, "volume", "snapshot", "create", "load", "--name", "mid"
        )
        t1 = time.monotonic()
        await asyncio.sleep(1.0)
        log.stop = True
        await asyncio.gather(*tasks)
        return t0, t1, res

    t0, t1, _snap = asyncio.run(run())
    c.cli("volume", "clone", "load", "--snapshot", "mid", "--name", "load-mid")
    clone_uri = c.attach("load-mid", "n2")
    data = subprocess.run(["nbdcopy", clone_uri, "-"], capture_output=True, check=True).stdout
    after_snapshot = 0
    for b in range(log.blocks):
        raw = data[b * BLOCK : b * BLOCK + 8]
        value = int.from_bytes(raw, "little") & 0xFFFFFFFF
        if raw != bytes(8):
            assert int.from_bytes(raw, "little") >> 32 == b, f"block {b} holds another block's data"
        acked_before = [v for issued, acked, v in log.writes[b] if acked < t0]
        issued_after = [v for issued, acked, v in log.writes[b] if issued > t1]
        # Every write acknowledged before the snapshot started is in it...
        if acked_before:
            assert value >= max(acked_before), (b, value, max(acked_before))
        # ...and none issued after it returned.
        assert value not in issued_after, (b, value)
        known = {v for _, _, v in log.writes[b]}
        assert value == 0 or value in known, (b, value)
        after_snapshot += bool(issued_after)
    assert after_snapshot > 0  # the load went on after the snapshot
    assert all(len(w) > 1 for w in log.writes.values())


@pytest.mark.timeout(300)
def test_snapshots_survive_failover_and_rebuild(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "keep", "--size", "16M", "--repl", "3")
    uri = c.attach("keep", "n1")
    qemu_io(uri, "write -P 0x51 0 16M")
    s1 = c.cli_json("volume", "snapshot", "create", "keep", "--name", "s1")
    sha1 = nbd_sha(uri)
    qemu_io(uri, "write -P 0x52 1M 2M")
    # A replica goes down; a snapshot taken meanwhile must reach it when it comes back.
    c.kill("n3")
    qemu_io(uri, "write -P 0x53 5M 1M")
    s2 = c.cli_json("volume", "snapshot", "create", "keep", "--name", "s2")
    sha2 = nbd_sha(uri)
    qemu_io(uri, "write -P 0x54 9M 100k")
    c.start("n3")
    c.wait_for(
        lambda: set(c.replica_states("keep").values()) == {"in_sync"}, 90, "n3 rebuilt in sync"
    )
    views1 = asyncio.run(replica_views(c, "keep", s1["id"], 16 * MiB))
    views2 = asyncio.run(replica_views(c, "keep", s2["id"], 16 * MiB))
    assert set(views1.values()) == {sha1}, views1
    assert set(views2.values()) == {sha2}, views2
    head = nbd_sha(uri)
    # The attach node dies: the volume fails over with its snapshots.
    c.kill("n1")
    c.wait_for(lambda: c.inspect("keep")["attached_node"] not in (None, "", "n1"), 60, "failover")
    node = c.inspect("keep")["attached_node"]
    uri2 = c.inspect("keep")["nbd_uri"]
    assert node in ("n2", "n3")
    assert nbd_sha(uri2) == head
    c.cli("volume", "clone", "keep", "--snapshot", "s1", "--name", "keep-s1", "--repl", "2")
    assert nbd_sha(c.attach("keep-s1", "n2")) == sha1
    names = [x["name"] for x in c.cli_json("volume", "snapshot", "list", "keep")]
    assert names == ["s1", "s2"]
