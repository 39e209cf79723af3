"""The container files: docker-compose.yml validates, the entry point builds the right
`cluster join` from environment variables (no Docker engine needed for either)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not on PATH")
def test_compose_file_validates() -> None:
    res = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr


def test_compose_has_three_etcd_members_three_nodes_and_the_registry() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for service in ("etcd1", "etcd2", "etcd3", "node1", "node2", "node3", "registry-init"):
        assert f"\n  {service}:\n" in text, service
    assert "image: registry:2" in text and "driver: pxcluster" in text
    assert text.count("privileged: true") == 1  # in the x-node anchor every node uses
    assert text.count("<<: *node\n") == 3


def run_entrypoint(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    stub = tmp_path / "bin" / "pxcluster"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\necho "PXC_ETCD=$PXC_ETCD"\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    full = {
        "PATH": f"{stub.parent}:{os.environ['PATH']}",
        "PXC_ETCD_WAIT": "0",
        "PXC_DATA_DIR": str(tmp_path / "data"),
        **env,
    }
    return subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        env=full,
    )


def test_entrypoint_builds_the_join_command(tmp_path: Path) -> None:
    res = run_entrypoint(
        tmp_path,
        PXC_NAME="n1",
        PXC_ADDRESS="10.0.0.1",
        PXC_ZONE="a",
        PXC_API_PORT="9101",
        PXC_DOCKER_PLUGIN_SOCKET="/run/docker/plugins/pxcluster.sock",
        PXC_ETCD="http://127.0.0.1:1,http://127.0.0.1:2",
        PXC_DISK_SIZE="1M",
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "PXC_ETCD=http://127.0.0.1:1,http://127.0.0.1:2"  # every member
    args = lines[1:]
    disk = tmp_path / "data" / "disk.img"
    assert args[:2] == ["cluster", "join"]
    pairs = dict(zip(args[2::2], args[3::2], strict=True))
    assert pairs == {
        "--name": "n1",
        "--address": "10.0.0.1",
        "--data-dir": str(tmp_path / "data"),
        "--log-level": "INFO",
        "--log-format": "json",
        "--disk": str(disk),
        "--zone": "a",
        "--api-port": "9101",
        "--docker-plugin-socket": "/run/docker/plugins/pxcluster.sock",
    }
    assert disk.stat().st_size == 1 << 20


def test_entrypoint_refuses_missing_settings(tmp_path: Path) -> None:
    res = run_entrypoint(tmp_path, PXC_ADDRESS="10.0.0.1")
    assert res.returncode != 0 and "PXC_NAME" in res.stderr
    res = run_entrypoint(tmp_path, PXC_NAME="n1", PXC_ADDRESS="10.0.0.1", PXC_DISKS="/dev/nope")
    assert res.returncode != 0 and "/dev/nope is not a block device" in res.stderr


def test_dockerfile_runs_the_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "COPY docker/entrypoint.sh /usr/local/bin/pxc-entrypoint" in text
    assert 'ENTRYPOINT ["/usr/local/bin/pxc-entrypoint"]' in text
