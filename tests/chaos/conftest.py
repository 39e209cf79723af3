from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import netns
from tests.chaos.netns import NetnsCluster, NetnsEtcd, Network
from tests.harness.stamps import has_libnbd


@pytest.fixture
def net() -> Iterator[Network]:
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"chaos suite skipped: {why}")
    if not has_libnbd():
        pytest.skip("chaos suite skipped: python3-libnbd (Debian) not installed")
    netns.sweep()
    network = Network()
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def ncluster(tmp_path: Path, net: Network) -> Iterator[NetnsCluster]:
    """etcd and n1..n3, each in its own namespace (1 GiB sparse disks, lease TTL 2 s)."""
    etcd = NetnsEtcd(tmp_path / "etcd", net)
    etcd.start()
    c = NetnsCluster(tmp_path, etcd, net)
    try:
        for name in ("n1", "n2", "n3"):
            c.add_node(name, disk_size=256 << 20)
        yield c
    finally:
        c.close()
        etcd.stop()
