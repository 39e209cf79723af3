"""A filesystem on a volume across the loss of its node: the daemon restarting (the device
holds its I/O and reconnects: a pause, never an error) and the host dying (another host takes
the volume over and finds everything that was fsynced)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.host import HostEnv, sh, wait_for


def fio(directory: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """A verifying workload on files in `directory`: crc32c in every 4 KiB block, checked on
    read back; fsync every 16 writes so flushes go through the whole path."""
    return sh(
        "fio",
        "--name=verify",
        f"--directory={directory}",
        "--size=24M",
        "--nrfiles=2",
        "--bs=4k",
        "--rw=randwrite",
        "--ioengine=psync",
        "--fsync=16",
        "--end_fsync=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randseed=7",
        *extra,
        timeout=timeout,
    )


def node_down(c: Cluster, name: str) -> bool:
    return not c.node_state(name)["up"]


@pytest.mark.timeout(300)
def test_fsynced_file_survives_serving_node_kill(
    host: HostEnv, hcluster3: Cluster, tmp_path: Path
) -> None:
    c = hcluster3
    c.cli("volume", "create", "fv", "--size", "256M", "--repl", "3")
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    c.cli("volume", "mount", "fv", str(m1), "--node", "n1")
    # Taken over while its node is up: refused, nothing changed.
    res = c.cli("volume", "mount", "fv", str(m2), "--node", "n2", *host.on("h2"), check=False)
    assert res.returncode != 0 and "which is up" in res.stderr, res.stderr
    assert c.inspect("fv")["attached_node"] == "n1" and not m2.exists()

    data = os.urandom(8 << 20)
    with open(m1 / "payload", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # flush -> FLUSH on the device -> durable on every replica
    c.kill("n1")  # right after the fsync returned
    host.crash("fv")  # and its host with it: the mount is gone, unflushed pages lost
    wait_for(lambda: node_down(c, "n1"), 30, "n1 seen down")
    # The leader leaves a volume with a device on its host alone (no automatic failover).
    assert c.inspect("fv")["state"] != "attached" or c.inspect("fv")["attached_node"] != "n2"
    c.cli("volume", "mount", "fv", str(m2), "--node", "n2", *host.on("h2"), timeout=120)
    assert c.inspect("fv")["attached_node"] == "n2"
    got = (m2 / "payload").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    c.cli("volume", "unmount", "fv", *host.on("h2"))


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
@pytest.mark.timeout(420)
def test_fio_verify_across_daemon_restart_and_failover(
    host: HostEnv, hcluster3: Cluster, tmp_path: Path, fstype: str
) -> None:
    c = hcluster3
    c.cli("volume", "create", "fio", "--size", "320M", "--repl", "3")
    m1 = tmp_path / "m1"
    c.cli("volume", "mount", "fio", str(m1), "--node", "n1", "--fs", fstype)
    # The node daemon restarts while fio writes: the device holds the I/O and reconnects.
    proc = subprocess.Popen(
        [
            "fio",
            "--name=verify",
            f"--directory={m1}",
            "--size=24M",
            "--nrfiles=2",
            "--bs=4k",
            "--rw=randwrite",
            "--ioengine=psync",
            "--fsync=16",
            "--end_fsync=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=7",
            "--rate=4m",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: any(m1.glob("verify.*")), 30, "fio writing")
        c.kill("n1")
        c.start("n1")
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "err= 0" in out, out  # a pause, never an I/O error
    assert c.inspect("fio")["attached_node"] == "n1"

    # Failover: the host dies after fio's last fsync; another host verifies every block.
    fio(m1)
    c.kill("n1")
    host.crash("fio")
    wait_for(lambda: node_down(c, "n1"), 30, "n1 seen down")
    m2 = tmp_path / "m2"
    c.cli("volume", "mount", "fio", str(m2), "--node", "n2", *host.on("h2"), timeout=120)
    out2 = fio(m2, "--verify_only").stdout
    assert "err= 0" in out2, out2
    c.cli("volume", "unmount", "fio", *host.on("h2"))
    fsck = ["fsck.ext4", "-fn"] if fstype == "ext4" else ["xfs_repair", "-n"]
    dev = c.cli("volume", "map", "fio", "--node", "n2", *host.on("h2")).stdout.strip()
    sh(*fsck, dev)
    c.cli("volume", "unmap", "fio", *host.on("h2"))
