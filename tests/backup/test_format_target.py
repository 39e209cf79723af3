"""The backup format and target URLs, without a cluster."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pxcluster.backup import format as fmt
from pxcluster.backup.errors import BadManifest, InvalidTarget, NotFound
from pxcluster.backup.target import FileTarget, S3Target, parse_target
from pxcluster.errors import PxcError


def test_block_round_trip_and_damage_is_detected() -> None:
    data = os.urandom(1000) * 300
    digest = fmt.sha256_hex(data)
    blob = fmt.encode_block(data)
    assert blob[:4] == b"PXCB" and len(blob) < len(data) // 10
    assert fmt.decode_block(blob, digest) == data
    flipped = bytearray(blob)
    flipped[-5] ^= 1
    cases = {
        "short": blob[:5],
        "magic": b"XXXX" + blob[4:],
        "version": blob[:4] + b"\x09" + blob[5:],
        "truncated": blob[: len(blob) // 2],
        "flipped": bytes(flipped),
        "length": fmt.HEADER.pack(fmt.MAGIC, 1, 1, 0, len(data) - 1) + blob[fmt.HEADER.size :],
        "other data": fmt.encode_block(data[:-1] + bytes([data[-1] ^ 1])),  # never the same
    }
    for name, bad in cases.items():
        with pytest.raises(fmt.BadBlock):
            fmt.decode_block(bad, digest)
            pytest.fail(name)


def test_block_sizes_keys_and_ids() -> None:
    assert fmt.block_size_for(64 << 10) == 64 << 10
    assert fmt.block_size_for(4 << 20) == 1 << 20
    for bad in (0, 4096, 96 << 10, (1 << 20) + 1):
        with pytest.raises(ValueError):
            fmt.block_size_for(bad)
    d = "ab" * 32
    assert fmt.block_key(d) == f"blocks/ab/{d}"
    assert fmt.digest_of_key(fmt.block_key(d)) == d
    assert fmt.digest_of_key(f"blocks/cd/{d}") is None
    assert fmt.digest_of_key("blocks/ab/xyz") is None
    ids = [fmt.new_id(1_700_000_000 + i / 1000) for i in range(5)]
    assert ids == sorted(ids) and all(fmt.is_valid_id(i) for i in ids)
    assert ids[0].startswith("20231114T221320000Z-")
    assert fmt.id_of_key(fmt.BACKUPS, fmt.manifest_key(ids[0])) == ids[0]
    assert not fmt.is_valid_id("../../etc/passwd")
    assert fmt.is_zero(bytes(4096)) and not fmt.is_zero(b"\0" * 4095 + b"\1")


def sample_manifest() -> fmt.Manifest:
    d = "0f" * 32
    return fmt.Manifest(
        id=fmt.new_id(),
        volume="db",
        volume_id="v1",
        snapshot="s",
        created=fmt.created_now(),
        size=3 << 20,
        chunk_size=2 << 20,
        block_size=1 << 20,
        encrypted=True,
        chunks={0: fmt.ChunkEntry((2, 7), (d, None)), 1: fmt.ChunkEntry((1, 1), (d,))},
        totals=fmt.Totals(2, 2, 1, 2 << 20, 3 << 20, 100, 1, 0.5),
        parent=None,
    )


def test_manifest_round_trip_and_refusals() -> None:
    m = sample_manifest()
    assert fmt.Manifest.from_json(m.to_json(), m.id) == m
    assert m.locations() == {"0f" * 32: (0, 0)}
    d = m.to_dict()
    assert d["chunks"][0] == {"index": 0, "generation": [2, 7], "blocks": ["0f" * 32, None]}
    with pytest.raises(BadManifest, match="says it is"):
        fmt.Manifest.from_json(m.to_json(), fmt.new_id())
    with pytest.raises(BadManifest, match="format 2"):
        fmt.Manifest.from_json(m.to_json().replace(b'"format":1', b'"format":2'), m.id)
    with pytest.raises(BadManifest, match="unreadable"):
        fmt.Manifest.from_json(b"{not json", m.id)
    with pytest.raises(BadManifest, match="bad block hash"):
        fmt.Manifest.from_json(m.to_json().replace(b"0f" * 32, b"zz", 1), m.id)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "empty backup target"),
        ("/var/backups", "is not a URL"),
        ("backups", "is not a URL"),
        ("http://example.com/x", "unsupported scheme 'http'"),
        ("ftp://host/x", "unsupported scheme"),
        ("file://relative/path", "has no host"),
        ("file:///", "absolute directory"),
        ("file:///x?y=1", "no query"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://Upper/x", "not a valid bucket name"),
        ("s3://my_bucket/x", "not a valid bucket name"),
        ("s3://bucket/a b", "prefix 'a b'"),
        ("s3://bucket/a/../b", "'..' are not allowed"),
    ],
)
def test_bad_target_urls_are_one_clear_line(url: str, reason: str) -> None:
    with pytest.raises(InvalidTarget) as e:
        parse_target(url)
    assert reason in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, PxcError)


def test_good_target_urls() -> None:
    t = parse_target("file:///srv/backups/")
    assert isinstance(t, FileTarget) and t.root == Path("/srv/backups")
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k"}
    with pytest.raises(InvalidTarget, match="set both AWS_ACCESS_KEY_ID and AWS_SECRET"):
        parse_target("s3://my-bucket/team/db/", env)
    env["AWS_SECRET_ACCESS_KEY"] = "s"
    s = parse_target("s3://my-bucket/team/db/", env)
    assert isinstance(s, S3Target) and (s.bucket, s.prefix) == ("my-bucket", "team/db")
    assert s.url == "s3://my-bucket/team/db"
    assert parse_target("s3://my-bucket", env).url == "s3://my-bucket"
    with pytest.raises(InvalidTarget, match="AWS_ENDPOINT_URL"):
        parse_target("s3://my-bucket", {"AWS_ENDPOINT_URL": "127.0.0.1:9000"})


async def test_file_target_atomic_puts_and_missing_directory(tmp_path: Path) -> None:
    t = FileTarget(tmp_path)
    await asyncio.gather(*(t.put("blocks/aa/k", bytes([i]) * 100_000) for i in range(8)))
    assert await t.list("") == ["blocks/aa/k"]  # one whole object, no temporary files left
    assert len(set(await t.get("blocks/aa/k"))) == 1
    assert [p.name for p in (tmp_path / "blocks" / "aa").iterdir()] == ["k"]
    (tmp_path / "blocks" / "aa" / ".k.tmp-dead").write_bytes(b"from a crash")
    assert await t.list("blocks/") == ["blocks/aa/k"]
    with pytest.raises(NotFound):
        await t.get("blocks/aa/missing")
    with pytest.raises(ValueError):
        await t.put("../escape", b"")
    gone = FileTarget(tmp_path / "absent")
    with pytest.raises(InvalidTarget, match="no such directory"):
        await gone.put("x", b"")
    with pytest.raises(InvalidTarget, match="no such directory"):
        await gone.list("")


async def test_s3_target_unreachable_endpoint_fails_in_one_line() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    t = parse_target("s3://some-bucket/p", env)
    assert isinstance(t, S3Target)
    from pxcluster.backup import target as target_mod
    from pxcluster.backup.errors import TargetError

    with pytest.raises(TargetError) as e:
        await asyncio.wait_for(t.get("backups/x.json"), 120)
    assert "s3://some-bucket/p: get backups/x.json" in str(e.value)
    assert "\n" not in str(e.value)
    assert target_mod.RETRY_TIMEOUT.total_seconds() <= 120
