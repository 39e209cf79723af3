"""The fault menu: each a small function on a NetnsCluster, composable, each with its heal.

A fault that lasts returns a `Heal` (call it to undo); instant faults return None.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from pxcluster import stamp
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
