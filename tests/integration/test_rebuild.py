"""Rebuild: interrupted rebuilds resume, lost replicas are replaced, acked-then-crashed
writes read the same everywhere."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import Cluster
from tests.harness.stamps import Writer, check, has_libnbd

pytestmark = pytest.mark.skipif(not has_libnbd(), reason="python3-libnbd (Debian) not installed")


def qemu_io(uri: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for cmd in cmds:
        args += ["-c", cmd]
    subprocess.run([*args, uri], check=True, capture_output=True, timeout=120)


def sha_from_each_replica(c: Cluster, name: str, nodes: list[str]) -> dict[str, str]:
    """Serve the volume from each replica's node in turn: reads are local there."""
    out = {}
    for n in nodes:
        c.cli("volume", "detach", name)
        uri = c.attach(name, n)
        data = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120, check=True)
        out[n] = hashlib.sha256(data.stdout).hexdigest()
    return out


def holds(disk: Path, block: bytes) -> bool:
    """Whether the disk file (page cache included) holds `block` somewhere: a replica has
    applied a write of it. Only the file's data extents are read."""
    with open(disk, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past pos
                return False
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            tail = b""
            while start < stop:
                piece = tail + f.read(min(1 << 20, stop - start))
                if block in piece:
                    return True
                start += len(piece) - len(tail)
                tail = piece[-(len(block) - 1) :]
            pos = stop
    return False


def rebuild_ops(c: Cluster, node: str) -> list[dict[str, Any]]:
    node_id = c.node_state(node)["id"]
    return [o for o in c.etcd_get_prefix(f"/pxc/{c.name}/ops/") if o["node"] == node_id]


@pytest.mark.timeout(300)
def test_interrupted_rebuild_resumes_and_matches_byte_for_byte(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    for n in ("n1", "n2", "n3"):
        c.add_node(n, extra=("--rebuild-bw", "24M"))
    c.cli("volume", "create", "iv", "--size", "256M", "--repl", "3")
    uri = c.attach("iv", "n1")
    c.kill("n3")
    # 40 chunks for n3 to catch up on (~7 s at 24M/s); the first 8 MiB stay for the stamps.
    qemu_io(uri, "write -P 0x5c 8M 160M")
    c.start("n3")
    c.wait_for(
        lambda: any(
            o["state"] == "running" and o["done_chunks"] >= 8 for o in rebuild_ops(c, "n3")
        ),
        60,
        "rebuild under way",
    )
    # Unaligned writes while the rebuild runs, then the target dies mid-rebuild.
    urifile = tmp_path / "uri"
    urifile.write_text(uri)
    writer = Writer(urifile, 2048, seconds=120, seed=2)  # the first 8 MiB: 2 chunks; stopped below
    writer.wait_acked(timeout=30)
    qemu_io(uri, "write -P 0x61 8389608 5000", "write -P 0x62 16777016 9000")  # one crosses chunks
    c.kill("n3")
    writer.fault()
    first = max(o["done_chunks"] for o in rebuild_ops(c, "n3"))
    writer.wait_acked(timeout=30)  # writes go on while the target is down
    writer.stop()
    history = writer.finish()
    assert not history.failed
    c.start("n3")
    c.wait_for(lambda: c.replica_states("iv")["n3"] == "in_sync", 90, "n3 in sync after resuming")
    done = [o for o in rebuild_ops(c, "n3") if o["state"] == "done"]
    assert done and done[-1]["total_chunks"] < 40, (first, done)  # resumed, not from 0%
    result = check(history, c.inspect("iv")["nbd_uri"], 2048)  # acks before and after the kill
    assert result.ok, result
    sums = sha_from_each_replica(c, "iv", ["n1", "n2", "n3"])
    assert len(set(sums.values())) == 1, sums


@pytest.mark.timeout(300)
def test_rebuild_source_killed_midway(cluster: Cluster) -> None:
    c = cluster
    for n in ("n1", "n2", "n3", "n4"):
        c.add_node(n, extra=("--rebuild-bw", "24M"))
    c.cli("volume", "create", "sk", "--size", "256M", "--repl", "3")
    reps = sorted(r["node"] for r in c.inspect("sk")["replicas"])
    attach_on, source, target = reps
    uri = c.attach("sk", attach_on)
    c.kill(target)
    qemu_io(uri, "write -P 0x3d 0 160M")
    c.start(target)
    c.wait_for(
        lambda: any(
            o["state"] == "running" and o["done_chunks"] >= 8 for o in rebuild_ops(c, target)
        ),
        60,
        "rebuild under way",
    )
    c.kill(source)  # one of the two sources dies: the rebuild continues from the other
    qemu_io(uri, "write -P 0x3e 3000 7000")
    c.wait_for(lambda: c.replica_states("sk")[target] == "in_sync", 90, f"{target} in sync")
    assert c.replica_states("sk")[source] == "stale"
    sums = sha_from_each_replica(c, "sk", [attach_on, target])
    assert len(set(sums.values())) == 1, sums


@pytest.mark.timeout(300)
def test_replica_on_a_lost_node_is_replaced_after_the_grace_period(cluster: Cluster) -> None:
    c = cluster
    for n in ("n1", "n2", "n3", "n4"):
        c.add_node(n, extra=("--replace-after", "3"))
    c.cli("volume", "create", "gv", "--size", "64M", "--repl", "3")
    c.cli("volume", "create", "dv", "--size", "64M", "--repl", "2")  # detached volume too
    gv_reps = {r["node"] for r in c.inspect("gv")["replicas"]}
    dv_reps = {r["node"] for r in c.inspect("dv")["replicas"]}
    lost = sorted(gv_reps & dv_reps)[0]  # 3 of 4 and 2 of 4 nodes always share one
    uri = c.attach("gv", sorted(gv_reps - {lost})[0])
    qemu_io(uri, "write -P 0x42 0 20M")
    c.kill(lost)
    for name in ("gv", "dv"):
        c.wait_for(
            lambda name=name: (
                lost not in c.replica_states(name)
                and all(s == "in_sync" for s in c.replica_states(name).values())
            ),
            90,
            f"{name}: replica on {lost} replaced and rebuilt",
        )
    info = c.inspect("gv")
    assert len(info["replicas"]) == 3 and info["health"] == "healthy"
    assert c.inspect("dv")["state"] == "detached"  # the rebuild attachment was let go
    qemu_io(info["nbd_uri"], "read -P 0x42 0 20M")


@pytest.mark.timeout(300)
def test_ack_then_crash_reads_the_same_everywhere(cluster3: Cluster) -> None:
    """The attach node dies with writes applied on some replicas and unacknowledged: after
    failover a block reads the same every time and from every replica (Longhorn #6290)."""
    c = cluster3
    c.cli("volume", "create", "ac", "--size", "32M", "--repl", "3")
    uri = c.attach("ac", "n1")
    qemu_io(uri, "write -P 0x01 0 8M")
    c.kill("n3", signal.SIGSTOP)  # n3 stalls: the next writes reach n1 and n2 only
    p = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x02 0 8M", uri],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill n1 once the new data is on n1 and n2 (n3 cannot have it), while qemu-io still
    # waits for its acknowledgement: applied on some replicas, acknowledged to nobody.
    new = b"\x02" * 4096
    c.wait_for(
        lambda: holds(c.nodes["n1"].disk, new) and holds(c.nodes["n2"].disk, new),
        30,
        "the new writes applied on n1 and n2",
    )
    assert p.poll() is None, "the write was acknowledged with n3 stopped"
    c.kill("n1")
    p.kill()
    c.kill("n3", signal.SIGCONT)
    c.wait_for(lambda: c.inspect("ac")["state"] == "attached", 30, "failover")
    c.start("n1")
    c.wait_for(
        lambda: all(s == "in_sync" for s in c.replica_states("ac").values()), 90, "all in sync"
    )
    sums = sha_from_each_replica(c, "ac", ["n1", "n2", "n3", "n2"])
    assert len(set(sums.values())) == 1, sums
