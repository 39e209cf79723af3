"""encryption at rest. Replicas, and so disks and rebuild traffic, hold only
ciphertext; the engine on any attach node decrypts."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster

MARK = b"PXC-PLAINTEXT-MARKER-" * 195  # ~4 KiB of recognisable plaintext


def disk_contains(path: Path, needle: bytes) -> bool:
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            if needle in block:
                return True
    return False


@pytest.mark.timeout(180)
def test_encrypted_volume_keeps_only_ciphertext_on_disk(cluster3: Cluster, tmp_path: Path) -> None:
    c = cluster3
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    info = c.cli_json(
        "volume",
        "create",
        "sec",
        "--size",
        "32M",
        "--repl",
        "2",
        "--encrypted",
        "--key-file",
        str(key),
    )
    assert info["encrypted"] is True
    holders = sorted(r["node"] for r in info["replicas"])
    uri = c.attach("sec", holders[0])
    data = tmp_path / "plain"
    data.write_bytes(MARK * 64)  # ~256 KiB
    subprocess.run(["nbdcopy", str(data), uri], check=True, capture_output=True, timeout=60)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x61 1000000 3000", "-c", "flush", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    out = subprocess.run(["nbdcopy", uri, "-"], check=True, capture_output=True, timeout=60).stdout
    assert out[: len(data.read_bytes())] == data.read_bytes()
    for n in holders:
        assert not disk_contains(c.nodes[n].disk, MARK[:200]), f"plaintext on {n}'s disk"
    # Served from the other replica's node: the key comes from the cluster, not the node.
    c.cli("volume", "detach", "sec")
    uri2 = c.attach("sec", holders[1])
    again = subprocess.run(
        ["nbdcopy", uri2, "-"], check=True, capture_output=True, timeout=60
    ).stdout
    assert hashlib.sha256(again).digest() == hashlib.sha256(out).digest()
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x61 1000000 3000", uri2],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_encryption_refusals(cluster3: Cluster, tmp_path: Path) -> None:
    c = cluster3
    short = tmp_path / "short"
    short.write_bytes(b"x" * 4)
    for args, needle in [
        (("--encrypted", "--key-file", str(short)), "16 bytes"),
        (("--encrypted", "--key-file", str(tmp_path / "missing")), "cannot read"),
        (("--key-file", str(short)), "not --encrypted"),
        (("--encrypted", "--key-env", "PXC_NO_SUCH_VARIABLE"), "not set"),
    ]:
        res = c.cli("volume", "create", "bad", "--size", "16M", *args, check=False)
        assert res.returncode != 0 and needle in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
    res = c.cli("volume", "create", "odd", "--size", "1001K", "--encrypted", check=False)
    assert res.returncode != 0 and "multiple of 4096" in res.stderr
    assert c.cli_json("volume", "list") == []
