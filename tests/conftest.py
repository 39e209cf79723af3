from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.etcd import EtcdServer
from tests.harness.s3 import S3_BUCKET, SeaweedS3, weed_binary


def pytest_report_header(config: pytest.Config) -> str:
    # A run that ends in ENOSPC errors should say up front that the disk was short.
    root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(root).free
    return f"free disk under {root}: {free / 2**30:.1f} GiB (a full run peaks near 1 GiB)"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (scripts/install.sh installs it)")
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster3(cluster: Cluster) -> Cluster:
    for name in ("n1", "n2", "n3"):
        cluster.add_node(name)
    return cluster


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS) for the whole run, with the bucket S3_BUCKET."""
    try:
        weed_binary()
    except Exception as e:
        pytest.skip(f"SeaweedFS not installed: {e}")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS_* variables that reach the S3 server, set for this test (and the CLI it runs)."""
    env = seaweed.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
