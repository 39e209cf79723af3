"""`volume map|mount|unmount|unmap` and `device list` on a real cluster: a filesystem on a
3-replica volume, made once, kept across mounts, and the refusals that change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.host import HostEnv, sh


def devices(c: Cluster) -> dict[str, dict[str, str]]:
    return {d["volume"]: d for d in c.cli_json("device", "list")}


@pytest.mark.timeout(240)
def test_mount_makes_filesystem_once_and_unmount_detaches(
    host: HostEnv, hcluster3: Cluster, tmp_path: Path
) -> None:
    c = hcluster3
    c.cli("volume", "create", "data", "--size", "256M", "--repl", "3")
    mnt = tmp_path / "mnt"
    info = json.loads(c.cli("volume", "mount", "data", str(mnt), "--node", "n1", "--json").stdout)
    assert info["mountpoint"] == str(mnt) and info["fs"] == "ext4"
    assert info["state"] == "connected" and info["node"] == "n1"
    assert c.inspect("data")["attached_node"] == "n1"
    (mnt / "hello").write_text("world")
    listed = devices(c)["data"]
    assert listed["mountpoint"] == str(mnt) and listed["device"] == info["device"]
    assert listed["method"] in ("kernel", "nbdfuse")
    c.cli("volume", "unmount", str(mnt))
    assert not os.path.ismount(mnt) and devices(c) == {}
    assert c.inspect("data")["state"] == "detached"
    # Mounted again: the filesystem is found (blkid), not made again; the file is there.
    c.cli("volume", "mount", "data", str(mnt), "--node", "n2")
    assert (mnt / "hello").read_text() == "world"
    assert c.inspect("data")["attached_node"] == "n2"
    c.cli("volume", "unmount", "data")
    assert c.inspect("data")["state"] == "detached"


@pytest.mark.timeout(240)
def test_map_unmap_and_refusals_change_nothing(
    host: HostEnv, hcluster3: Cluster, tmp_path: Path
) -> None:
    c = hcluster3
    c.cli("volume", "create", "raw", "--size", "320M", "--repl", "2")
    dev = c.cli("volume", "map", "raw", "--node", "n1").stdout.strip()
    assert dev.startswith("/dev/")
    # Mapped twice: the same device, no second connection.
    assert c.cli("volume", "map", "raw", "--node", "n1").stdout.strip() == dev
    sh("mkfs.xfs", "-q", dev)
    c.cli("volume", "unmap", "raw")
    assert c.inspect("raw")["state"] == "detached" and devices(c) == {}

    def refused(*args: str, says: str) -> None:
        res = c.cli(*args, check=False)
        assert res.returncode != 0, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], res.stderr
        assert devices(c) == {}, "a refused command left a device"

    # A foreign filesystem: xfs is there, ext4 asked: never formatted over.
    refused(
        "volume",
        "mount",
        "raw",
        str(tmp_path / "m1"),
        "--fs",
        "ext4",
        "--node",
        "n1",
        says="holds an xfs filesystem, not ext4",
    )
    assert c.inspect("raw")["state"] == "detached"
    # A busy path: not empty, or already a mount point.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    refused("volume", "mount", "raw", str(busy), "--node", "n1", says="is not empty")
    assert c.inspect("raw")["state"] == "detached"
    # Neither path to a block device (no tool on PATH): refused before attaching.
    cmd = [sys.executable, "-m", "pxcluster.cli", "--etcd", c.etcd.url, "--cluster", c.name]
    env = {**os.environ, "PATH": "/nonexistent"}
    res = subprocess.run(
        [*cmd, "volume", "map", "raw", "--node", "n1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode != 0 and "no way to make a block device" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert c.inspect("raw")["state"] == "detached"
    # In use: a process has a file open on the mount; unmount refuses and changes nothing.
    mnt = tmp_path / "m2"
    c.cli("volume", "mount", "raw", str(mnt), "--node", "n1")
    assert devices(c)["raw"]["fs"] == "xfs"
    with open(mnt / "open", "w") as f:
        f.write("held")
        res = c.cli("volume", "unmount", "raw", check=False)
        assert res.returncode != 0 and "in use" in res.stderr, res.stderr
        assert os.path.ismount(mnt) and c.inspect("raw")["attached_node"] == "n1"
    c.cli("volume", "unmount", "raw")
    assert c.inspect("raw")["state"] == "detached"
    # Unknown volume, nothing mapped.
    refused("volume", "unmount", "nope", says="no volume is mapped")
