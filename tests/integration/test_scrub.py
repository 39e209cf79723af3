"""`volume scrub` finds a corrupt chunk copy by checksum and repairs it from a good
one, in the head and in a snapshot; a corrupt copy is never served to a client."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.volume_bytes import nbd_sha, nbd_write

MARK_A = b"SCRUB-TEST-HEAD-"
MARK_B = b"SCRUB-TEST-SNAP-"


def flip_after(disk: Path, marker: bytes) -> int:
    """Flip one byte just after the first occurrence of `marker` in a stopped node's disk."""
    with open(disk, "r+b") as f:
        base = 0
        while True:
            buf = f.read(16 << 20)
            if not buf:
                raise LookupError(f"{marker!r} not on {disk}")
            i = buf.find(marker)
            if i != -1:
                at = base + i + len(marker) + 5
                f.seek(at)
                (b,) = f.read(1)
                f.seek(at)
                f.write(bytes([b ^ 0x10]))
                return at
            base += len(buf)


def write_marked(uri: str, offset: int, marker: bytes) -> None:
    """64 KiB of recognisable blocks: the marker at each 4 KiB block's start."""
    block = marker + bytes(range(256)) * 15 + bytes(4096 - len(marker) - 3840)
    nbd_write(uri, offset, block * 16)


@pytest.mark.timeout(240)
def test_scrub_repairs_corrupt_copies_in_head_and_snapshot(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "sc", "--size", "16M", "--repl", "3")
    uri = c.attach("sc", "n1")
    write_marked(uri, 4 << 20, MARK_B)
    c.cli("volume", "snapshot", "create", "sc", "--name", "base")
    write_marked(uri, 9 << 20, MARK_A)
    want = nbd_sha(uri)
    clean = c.cli_json("volume", "scrub", "sc")
    assert clean["repaired"] == [] and clean["unrepairable"] == [] and clean["chunks"] >= 2
    c.wait_for(lambda: c.all_chunks_clean("n1", "sc"), 30, "idle chunks marked clean")

    c.kill("n3")
    flip_after(c.nodes["n3"].disk, MARK_A)
    flip_after(c.nodes["n3"].disk, MARK_B)
    c.start("n3")
    # The first write after n3's restart finds it unopened: stale, caught up by a rebuild
    # (which copies what changed, not what rotted on its disk).
    write_marked(uri, 14 << 20, b"SCRUB-TEST-LATE-")
    want = nbd_sha(uri)
    c.wait_for(lambda: set(c.replica_states("sc").values()) == {"in_sync"}, 60, "n3 back")

    report = c.cli_json("volume", "scrub", "sc")
    got = sorted(
        (r["layer"] == "head", r["chunk"], r["node"], r["reason"]) for r in report["repaired"]
    )
    n3 = c.node_state("n3")["id"]
    assert got == [(False, 1, n3, "checksum"), (True, 2, n3, "checksum")], report
    assert c.cli_json("volume", "scrub", "sc")["repaired"] == []
    # n3 serves the volume now: its copies are whole again.
    c.cli("volume", "detach", "sc")
    c.wait_for(lambda: c.inspect("sc")["attached_node"] in (None, ""), 30, "detach")
    uri3 = c.attach("sc", "n3")
    assert nbd_sha(uri3) == want
    assert set(c.replica_states("sc").values()) == {"in_sync"}


@pytest.mark.timeout(240)
def test_a_corrupt_block_is_never_served(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "ns", "--size", "8M", "--repl", "2")
    uri = c.attach("ns", "n1")
    write_marked(uri, 1 << 20, MARK_A)
    want = nbd_sha(uri)
    c.wait_for(lambda: c.all_chunks_clean("n1", "ns"), 30, "idle chunks marked clean")
    holder = next(r["node"] for r in c.inspect("ns")["replicas"] if r["node"] != "n1")
    c.cli("volume", "detach", "ns")
    c.wait_for(lambda: c.inspect("ns")["attached_node"] in (None, ""), 30, "detach")
    c.kill(holder)
    flip_after(c.nodes[holder].disk, MARK_A)
    c.start(holder)
    # Served where the corrupt copy lives (reads go to the local replica first): the client
    # still gets the good bytes, the bad copy is dropped and rebuilt.
    uri2 = c.attach("ns", holder)
    assert nbd_sha(uri2) == want
    c.wait_for(
        lambda: set(c.replica_states("ns").values()) == {"in_sync"}, 60, "the bad copy rebuilt"
    )
    assert c.cli_json("volume", "scrub", "ns")["repaired"] == []
