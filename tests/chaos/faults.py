"""The fault menu: each a small function on a NetnsCluster, composable, each with its heal.

A fault that lasts returns a `Heal` (call it to undo); instant faults return None.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pxcluster.tools import stamp
from replica import ondisk
from tests.chaos import netns
from tests.chaos.netns import NetnsCluster

Heal = Callable[[], None]


def kill9(c: NetnsCluster, node: str) -> None:
    c.kill(node, signal.SIGKILL)


def restart(c: NetnsCluster, node: str) -> None:
    c.start(node)


def pause(c: NetnsCluster, node: str) -> Heal:
    """SIGSTOP: the node keeps its sockets but answers nothing, its lease included."""
    c.kill(node, signal.SIGSTOP)
    return lambda: c.kill(node, signal.SIGCONT)


def _heal(c: NetnsCluster, nodes: list[str]) -> Heal:
    def heal() -> None:
        for n in nodes:
            c.net.heal(n)

    return heal


def cut_from_etcd(c: NetnsCluster, node: str) -> Heal:
    c.net.drop(node, c.etcd.host)
    return _heal(c, [node])


def cut_from_peers(c: NetnsCluster, node: str, peers: list[str] | None = None) -> Heal:
    """Drop traffic between `node` and the other nodes (or `peers`), not etcd or the client."""
    for p in peers if peers is not None else [n for n in c.nodes if n != node]:
        c.net.drop(node, c.nodes[p].address)
    return _heal(c, [node])


def isolate(c: NetnsCluster, node: str) -> Heal:
    """Cut from etcd and from every peer; the test process still reaches it (a stale client)."""
    h1 = cut_from_etcd(c, node)
    cut_from_peers(c, node)
    return h1


def partition_attach_from_replicas(c: NetnsCluster, attach: str) -> Heal:
    """The attach node keeps etcd but loses every replica peer."""
    return cut_from_peers(c, attach)


def partition_attach_from_etcd(c: NetnsCluster, attach: str) -> Heal:
    """The reverse: the attach node keeps its replicas but loses etcd (its lease)."""
    return cut_from_etcd(c, attach)


def restart_etcd(c: NetnsCluster) -> None:
    c.etcd.stop(signal.SIGKILL)
    c.etcd.start()


def stop_etcd(c: NetnsCluster) -> Heal:
    c.etcd.stop(signal.SIGKILL)
    return c.etcd.start


def corrupt_stamp(disk: Path, *, skip: int = 0) -> int:
    """Flip one byte inside the body of a stamped block on a (stopped) node's disk file.

    Returns the file offset flipped. Finds the block by its magic; `skip` picks a later one.
    """
    with open(disk, "r+b") as f:
        pos, base, seen = 0, 0, 0
        while True:
            buf = f.read(16 << 20)
            if not buf:
                raise LookupError(f"no stamped block on {disk}")
            i = buf.find(stamp.MAGIC)
            while i != -1:
                if seen == skip:
                    at = base + i + 100
                    f.seek(at)
                    (b,) = f.read(1)
                    f.seek(at)
                    f.write(bytes([b ^ 0x40]))
                    return at
                seen += 1
                i = buf.find(stamp.MAGIC, i + 1)
            base += len(buf)
            pos = base
            f.seek(pos)


def copy_disk(disk: Path, dest: Path) -> Path:
    """A copy to read with the chunk store without touching the node's own file."""
    shutil.copyfile(disk, dest)
    return dest


def _host_veth(c: NetnsCluster, node: str) -> str:
    """The root-namespace end of `node`'s veth (netns.Network.add numbers them in order)."""
    return f"pxv{c.net.pid}n{list(c.net.namespaces).index(node)}"


def rate_limit(c: NetnsCluster, node: str, rate: str = "2mbit") -> Heal:
    """A slow replica: a tbf rate limit both ways on `node`'s link (its eth0 inside its
    namespace, and the bridge side of its veth for the traffic towards it). This kernel has no
    netem; tbf works. Raises CalledProcessError when tc or sch_tbf is missing."""
    tbf = ("tbf", "rate", rate, "burst", "32kb", "latency", "400ms")
    veth = _host_veth(c, node)
    ns = c.net.namespaces[node]
    netns.ns_exec(ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf)
    try:
        netns.run("tc", "qdisc", "add", "dev", veth, "root", *tbf)
    except Exception:
        netns.ns_exec(ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        raise

    def heal() -> None:
        netns.ns_exec(ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        netns.run("tc", "qdisc", "del", "dev", veth, "root", check=False)

    return heal


def journal_records(disk: Path) -> list[tuple[int, int, Any]]:
    """The live journal records of a (stopped) node's disk: (file offset, length, body), those
    replay would apply on top of the newest valid checkpoint."""
    with open(disk, "rb") as f:
        sb = ondisk.decode_superblock(f.read(ondisk.BLOCK))
        best = -1
        for area in (0, 1):
            f.seek(sb.meta_offset + area * sb.meta_size)
            got = ondisk.decode_checkpoint(f.read(sb.meta_size))
            if got is not None and got[0] % 2 == area and got[0] > best:
                best = got[0]
        f.seek(sb.journal_offset)
        area_bytes = f.read(sb.journal_size)
    out, start = [], 0
    for end, body in ondisk.decode_records(area_bytes, best):
        out.append((sb.journal_offset + start, end - start, body))
        start = end
    return out


def flip_journal_bit(disk: Path, pick: Callable[[Any], bool] = lambda body: True) -> dict[str, Any]:
    """Flip one bit in the payload of the first live journal record `pick` accepts (else the
    first record) on a stopped node's disk: replay stops there, so that record and every one
    after it are lost. Returns {"offset", "index", "records", "body"}."""
    recs = journal_records(disk)
    if not recs:
        raise LookupError(f"no live journal record on {disk}")
    index = next((i for i, (_, _, body) in enumerate(recs) if pick(body)), 0)
    at, length, body = recs[index]
    flip = at + 16 + (length - 16) // 2  # inside the msgpack payload, past the 16-byte head
    with open(disk, "r+b") as f:
        f.seek(flip)
        (b,) = f.read(1)
        f.seek(flip)
        f.write(bytes([b ^ 0x08]))
    return {"offset": flip, "index": index, "records": len(recs), "body": body}
