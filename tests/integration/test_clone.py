"""A clone is usable at once (reads of chunks not yet copied come from the source
snapshot), writes during the copy win over it, and the copy resumes after its engine dies."""

from __future__ import annotations

import hashlib
import random

import pytest

from tests.harness.cluster import Cluster
from tests.harness.volume_bytes import nbd_bytes, nbd_write

MiB = 1 << 20


@pytest.mark.timeout(300)
def test_clone_is_usable_at_once_and_its_copy_resumes_elsewhere(cluster: Cluster) -> None:
    c = cluster
    for name in ("n1", "n2", "n3"):
        # A slow background copy (2 MiB/s) keeps the clone "copying" long enough to use it.
        c.add_node(name, extra=("--rebuild-bw", "2M"))
    c.cli("volume", "create", "src", "--size", "32M", "--repl", "2")
    src_uri = c.attach("src", "n1")
    rng = random.Random(5)
    image = bytearray(rng.randbytes(32 * MiB))
    nbd_write(src_uri, 0, bytes(image))
    c.cli("volume", "snapshot", "create", "src", "--name", "gold")
    nbd_write(src_uri, 0, b"\xee" * (8 * MiB))  # the source moves on; the clone must not see it

    info = c.cli_json("volume", "clone", "src", "--snapshot", "gold", "--name", "cl", "--repl", "2")
    assert info["clone_of"]["volume"] == "src" and info["clone_of"]["snapshot"] == "gold"
    assert info["clone_of"]["state"] == "copying" and info["clone_of"]["chunks_total"] == 8
    # Busy sources: neither the snapshot nor the volume may go while the clone copies them.
    res = c.cli("volume", "snapshot", "delete", "src", "gold", check=False)
    assert res.returncode != 0 and "still copying" in res.stderr
    c.cli("volume", "detach", "src")
    c.wait_for(lambda: c.inspect("src")["attached_node"] is None, 30, "src detached")
    res = c.cli("volume", "delete", "src", check=False)
    assert res.returncode != 0 and "still copying" in res.stderr

    # Attach for clients on the very node copying it in the background (served there, not
    # exported, until now): the same engine goes on and becomes reachable.
    vid = c.inspect("cl")["id"]
    target = c.etcd_get_prefix(f"/pxc/{c.name}/volumes/{vid}/target")
    assert target and target[0]["reason"] == "snapshot", target
    here = next(n["name"] for n in c.cli_json("node", "list") if n["id"] == target[0]["node"])
    uri = c.attach("cl", here)
    assert c.inspect("cl")["clone_of"]["state"] == "copying"
    assert hashlib.sha256(nbd_bytes(uri)).digest() == hashlib.sha256(image).digest()
    # Writes during the copy: the chunk is copied first, then written; the copy never
    # overwrites them later, not even after the engine dies and another node resumes.
    patch = rng.randbytes(5000)
    nbd_write(uri, 20 * MiB + 123, patch)
    image[20 * MiB + 123 : 20 * MiB + 123 + len(patch)] = patch
    nbd_write(uri, 31 * MiB, b"\x42" * MiB)
    image[31 * MiB : 32 * MiB] = b"\x42" * MiB
    assert nbd_bytes(uri) == bytes(image)
    c.kill(here)

    def moved() -> bool:
        return c.inspect("cl")["attached_node"] not in (None, here)

    c.wait_for(moved, 60, "the clone to fail over")
    c.wait_for(lambda: c.inspect("cl")["clone_of"]["state"] == "done", 120, "the copy to finish")
    uri2 = c.inspect("cl")["nbd_uri"]
    assert nbd_bytes(uri2) == bytes(image)
    # Independent now: the source and its snapshot can go.
    c.cli("volume", "snapshot", "delete", "src", "gold")
    c.cli("volume", "delete", "src")
    assert nbd_bytes(uri2) == bytes(image)
