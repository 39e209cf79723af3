"""Backups of a real cluster's volumes to a directory and to a real S3 server
(SeaweedFS), incremental twice over, restored here and into a second cluster."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.etcd import EtcdServer
from tests.harness.s3 import S3_BUCKET, SeaweedS3
from tests.harness.volume_bytes import nbd_sha, nbd_write

MiB = 1 << 20
BUCKET = S3_BUCKET


@pytest.fixture(params=["file", "s3"])
def target_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "file":
        root = tmp_path / "backups"
        root.mkdir()
        return f"file://{root}"
    server: SeaweedS3 = request.getfixturevalue("seaweed")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    return f"s3://{BUCKET}/{os.getpid()}-{tmp_path.name}"


@pytest.mark.timeout(300)
def test_backup_incremental_restore_here_and_in_another_cluster(
    cluster3: Cluster, target_url: str, tmp_path: Path
) -> None:
    c = cluster3
    rng = random.Random(10)
    image = bytearray(32 * MiB)
    c.cli("volume", "create", "reg", "--size", "32M", "--repl", "2")
    uri = c.attach("reg", "n1")
    first = rng.randbytes(20 * MiB)
    nbd_write(uri, 0, first)
    image[: len(first)] = first
    sha1 = hashlib.sha256(image).hexdigest()

    r1 = c.cli_json("backup", "create", "reg", "--target", target_url)
    assert set(r1) == {
        "id",
        "volume",
        "snapshot",
        "size",
        "bytes_read",
        "bytes_uploaded",
        "blocks",
        "blocks_uploaded",
        "seconds",
    }
    assert r1["volume"] == "reg" and r1["size"] == 32 * MiB
    assert r1["bytes_read"] == 20 * MiB  # five 4 MiB chunks were ever written
    assert r1["blocks"] == 20 and r1["blocks_uploaded"] == 20
    # The temporary snapshot is gone again.
    assert c.cli_json("volume", "snapshot", "list", "reg") == []

    # A small change: the next backup reads one chunk and uploads one block.
    patch = rng.randbytes(10)
    nbd_write(uri, 4 * MiB + 100, patch)
    image[4 * MiB + 100 : 4 * MiB + 110] = patch
    sha2 = hashlib.sha256(image).hexdigest()
    c.cli("volume", "snapshot", "create", "reg", "--name", "s2")
    r2 = c.cli_json("backup", "create", "reg", "--snapshot", "s2", "--target", target_url)
    assert r2["snapshot"] == "s2"
    assert r2["bytes_read"] == 4 * MiB and r2["blocks_uploaded"] == 1 and r2["blocks"] == 20

    listed = c.cli_json("backup", "list", "--target", target_url)
    assert [b["id"] for b in listed] == [r1["id"], r2["id"]]
    c.cli("backup", "verify", r2["id"], "--target", target_url)

    for rid, name, want in [(r1["id"], "reg-1", sha1), (r2["id"], "reg-2", sha2)]:
        c.cli("backup", "restore", rid, "--target", target_url, "--name", name, "--repl", "2")
        assert nbd_sha(c.attach(name, "n2")) == want

    # Deleting the first keeps everything the second needs.
    c.cli("backup", "delete", r1["id"], "--target", target_url)
    c.cli("backup", "verify", r2["id"], "--target", target_url)
    res = c.cli("backup", "inspect", r1["id"], "--target", target_url, check=False)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1

    # Another cluster, its own etcd: the state moves across.
    if shutil.which("etcd") is None:
        return
    etcd2 = EtcdServer(tmp_path / "etcd2")
    etcd2.start()
    other = Cluster(tmp_path / "other", etcd2, name="other")
    (tmp_path / "other").mkdir(exist_ok=True)
    try:
        other.add_node("m1")
        other.cli("backup", "restore", r2["id"], "--target", target_url, "--name", "moved")
        assert other.inspect("moved")["repl"] == 1
        assert nbd_sha(other.attach("moved", "m1")) == sha2
    finally:
        other.close()
        etcd2.stop()


@pytest.mark.timeout(120)
def test_restore_of_a_corrupt_backup_names_the_block_and_leaves_no_volume(
    cluster3: Cluster, tmp_path: Path
) -> None:
    c = cluster3
    root = tmp_path / "bk"
    root.mkdir()
    url = f"file://{root}"
    c.cli("volume", "create", "small", "--size", "8M", "--repl", "2")
    uri = c.attach("small", "n1")
    nbd_write(uri, 0, random.Random(3).randbytes(3 * MiB))
    r = c.cli_json("backup", "create", "small", "--target", url)
    blocks = sorted(p for p in (root / "blocks").rglob("*") if p.is_file())
    assert len(blocks) == 3
    victim = blocks[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = c.cli("backup", "verify", r["id"], "--target", url, check=False)
    assert res.returncode != 0 and victim.name[:12] in res.stdout + res.stderr
    res = c.cli("backup", "restore", r["id"], "--target", url, "--name", "bad", check=False)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    assert "removed" in res.stderr, res.stderr
    names = [v["name"] for v in c.cli_json("volume", "list")]
    assert "bad" not in names
