"""Filesystem-level guarantees on volumes: crash-consistent snapshots of a mounted filesystem
(with and without fsfreeze) mount clean, a backup of a filesystem volume restores to the same
file tree, and fstrim gives chunks back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.host import HostEnv, sh, tree, wait_for


def fill(root: Path, files: int, size: int, seed: int) -> None:
    rnd = __import__("random").Random(seed)
    for i in range(files):
        d = root / f"d{i % 4}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(size))


@pytest.mark.timeout(300)
def test_snapshots_of_a_mounted_filesystem_mount_clean(
    host: HostEnv, hcluster3: Cluster, tmp_path: Path
) -> None:
    c = hcluster3
    c.cli("volume", "create", "fs", "--size", "256M", "--repl", "2")
    m = tmp_path / "m"
    c.cli("volume", "mount", "fs", str(m), "--node", "n1")
    fill(m, 20, 64 << 10, seed=1)
    os.sync()
    frozen_tree = tree(m)
    sh("fsfreeze", "--freeze", str(m))
    try:
        c.cli("volume", "snapshot", "create", "fs", "--name", "frozen")
    finally:
        sh("fsfreeze", "--unfreeze", str(m))
    # Without a freeze, in the middle of writes: crash-consistent, the journal replays.
    fill(m, 40, 64 << 10, seed=2)
    c.cli("volume", "snapshot", "create", "fs", "--name", "hot")
    for snap in ("frozen", "hot"):
        clone = f"fs-{snap}"
        c.cli("volume", "clone", "fs", "--snapshot", snap, "--name", clone, "--repl", "1")
        where = tmp_path / clone
        # mount replays the journal of the unfrozen one; then a read-only check is clean
        c.cli("volume", "mount", clone, str(where), "--node", "n2")
        if snap == "frozen":
            assert tree(where) == frozen_tree
        c.cli("volume", "unmount", clone)
        dev = c.cli("volume", "map", clone, "--node", "n2").stdout.strip()
        sh("fsck.ext4", "-fn", dev)
        c.cli("volume", "unmap", clone)
    c.cli("volume", "unmount", "fs")


@pytest.mark.timeout(300)
def test_backup_of_a_filesystem_restores_the_same_tree(
    host: HostEnv, hcluster3: Cluster, tmp_path: Path
) -> None:
    c = hcluster3
    c.cli("volume", "create", "bk", "--size", "256M", "--repl", "2")
    m = tmp_path / "m"
    c.cli("volume", "mount", "bk", str(m), "--node", "n1")
    fill(m, 30, 100 << 10, seed=3)
    (m / "link").symlink_to("d0/f0")
    want = tree(m)
    c.cli("volume", "unmount", "bk")
    (tmp_path / "b").mkdir()
    target = f"file://{tmp_path / 'b'}"
    b = c.cli_json("backup", "create", "bk", "--target", target)
    c.cli("backup", "restore", b["id"], "--target", target, "--name", "bk2")
    m2 = tmp_path / "m2"
    c.cli("volume", "mount", "bk2", str(m2), "--node", "n3")
    assert tree(m2) == want and os.readlink(m2 / "link") == "d0/f0"
    c.cli("volume", "unmount", "bk2")


@pytest.mark.timeout(300)
def test_fstrim_frees_chunks(host: HostEnv, hcluster3: Cluster, tmp_path: Path) -> None:
    c = hcluster3
    c.cli("volume", "create", "tr", "--size", "256M", "--repl", "3")

    def used() -> int:
        return sum(int(n["used"]) for n in c.cli_json("node", "list"))

    base = used()
    m = tmp_path / "m"
    c.cli("volume", "mount", "tr", str(m), "--node", "n1")
    (m / "big").write_bytes(os.urandom(96 << 20))
    os.sync()
    # The loop device writes into nbdfuse's page cache, so some of the file may still be on
    # its way after sync(): the baseline is taken once all of it is on every replica.
    wait_for(lambda: used() >= base + 3 * (96 << 20), 60, "96 MiB on each of 3 replicas")
    full = used()
    (m / "big").unlink()
    os.sync()
    trims = 'pxc_volume_ops_total{op="trim",volume="tr"}'
    chunks_freed = 'pxc_volume_chunks_freed_total{volume="tr"}'
    try:
        # ext4 hands a deleted file's blocks back only after its journal commit has been
        # processed, which a loaded host can delay past one fstrim: trim again until done.
        deadline = time.monotonic() + 60
        while True:
            sh("fstrim", str(m))
            try:
                wait_for(lambda: used() <= full - 3 * (64 << 20), 6, "trimmed chunks freed")
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                os.sync()
        # The space came back through the engine's trims, as the node reports them (through
        # nbdfuse they arrive in pieces; the engine frees a chunk once it reads as zeros).
        assert c.metric("n1", trims) > 0
        assert c.metric("n1", chunks_freed) >= 16
    finally:
        c.cli("volume", "unmount", "tr")
