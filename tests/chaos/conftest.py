from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.chaos import netns
from tests.chaos.netns import NetnsCluster, NetnsEtcd, Network
from tests.harness.stamps import has_libnbd

MakeCluster = Callable[..., NetnsCluster]


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
def make_cluster(tmp_path: Path, net: Network) -> Iterator[MakeCluster]:
    """make_cluster(nodes=3, disk_size=256 MiB, extra=(), lease_ttl=2) -> etcd and nodes
    n1..nN, each in its own namespace; all stopped at teardown, before the namespaces go."""
    stack = ExitStack()

    def make(
        nodes: int = 3,
        disk_size: int = 256 << 20,
        extra: tuple[str, ...] = (),
        lease_ttl: int = 2,
    ) -> NetnsCluster:
        etcd = NetnsEtcd(tmp_path / "etcd", net)
        stack.callback(etcd.stop)
        etcd.start()
        c = NetnsCluster(tmp_path, etcd, net, lease_ttl=lease_ttl)
        stack.callback(c.close)
        for i in range(1, nodes + 1):
            c.add_node(f"n{i}", disk_size=disk_size, extra=extra)
        return c

    with stack:
        yield make


@pytest.fixture
def ncluster(make_cluster: MakeCluster) -> NetnsCluster:
    return make_cluster()
