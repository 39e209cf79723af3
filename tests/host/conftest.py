from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.host import HostEnv, skip_reason


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostEnv]:
    why = skip_reason()
    if why is not None:
        pytest.skip(why)
    env = HostEnv(tmp_path / "hosts")
    # Every CLI call of the test (a subprocess) records its devices here, not in /run.
    monkeypatch.setenv("PXC_HOST_STATE_DIR", str(env.state))
    try:
        yield env
    finally:
        env.teardown()


@pytest.fixture
def hcluster3(host: HostEnv, cluster: Cluster) -> Cluster:
    """Three nodes, torn down after the host's devices (requested after `host`)."""
    for name in ("n1", "n2", "n3"):
        cluster.add_node(name)
    return cluster
