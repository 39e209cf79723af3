"""The `backup` command group through click, against a directory and the real S3 server.

create and restore need the cluster (Service.backup_source / Service.restore_sink); here a
fake service with in-memory volumes stands in for it, through the same with_service seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pxcluster.backup import format as fmt
from pxcluster.backup.target import parse_target
from pxcluster.cli import backup as backup_commands
from pxcluster.cli import output
from pxcluster.cli.backup import backup
from pxcluster.errors import PxcError, UnknownVolume
from tests.backup.fakes import MemSink, MemSnapshot, MemVolume, MiB

CONTRACT_KEYS = {
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


class FakeService:
    """The two hooks the backup commands use, over in-memory volumes."""

    def __init__(self) -> None:
        self.volumes: dict[str, MemVolume] = {}
        self.sinks: dict[str, MemSink] = {}
        self.removed: list[str] = []
        self.temporary_snapshots = 0

    @contextlib.asynccontextmanager
    async def backup_source(self, volume: str, snapshot: str | None) -> AsyncIterator[MemSnapshot]:
        if volume not in self.volumes:
            raise UnknownVolume(f"no volume {volume}")
        if snapshot is None:
            self.temporary_snapshots += 1
        yield self.volumes[volume].snapshot(snapshot or f"backup-tmp-{self.temporary_snapshots}")

    @contextlib.asynccontextmanager
    async def restore_sink(
        self, name: str, size: int, chunk_size: int, repl: int | None, encrypted: bool
    ) -> AsyncIterator[MemSink]:
        sink = self.sinks[name] = MemSink(size, chunk_size)
        try:
            yield sink
        except BaseException:
            del self.sinks[name]
            self.removed.append(name)
            raise


@pytest.fixture
def svc(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeService]:
    from pxcluster.cli import context

    fake = FakeService()

    def with_fake_service(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return asyncio.run(fn(fake, *args, **kwargs))
            except PxcError as e:
                output.fail(str(e))

        return wrapper

    monkeypatch.setattr(context, "with_service", with_fake_service)
    monkeypatch.setattr(backup_commands, "hooks", lambda svc: svc)
    yield fake


def run(*args: str) -> Result:
    return CliRunner().invoke(backup, list(args), catch_exceptions=False)


def ok_json(*args: str) -> Any:
    r = run(*args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def one_error_line(r: Result) -> str:
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_backup_commands_end_to_end(target_url: str, svc: FakeService) -> None:
    vol = svc.volumes["db"] = MemVolume("db", 6 * MiB, 2 * MiB)
    vol.fill_random(0, 3 * MiB)

    first = ok_json("create", "db", "--target", target_url)
    assert set(first) == CONTRACT_KEYS
    assert (first["volume"], first["snapshot"], first["size"]) == ("db", "backup-tmp-1", 6 * MiB)
    assert (first["bytes_read"], first["blocks"], first["blocks_uploaded"]) == (4 * MiB, 3, 3)

    vol.write(4 * MiB, b"\x05" * 4096)
    r = run("create", "db", "--snapshot", "nightly", "--target", target_url)
    assert r.exit_code == 0, r.stderr
    assert "(snapshot nightly): read 2M, uploaded" in r.stdout
    assert "(1 new of 4 blocks)" in r.stdout

    listed = ok_json("list", "--target", target_url)
    assert [b["snapshot"] for b in listed] == ["backup-tmp-1", "nightly"]
    second = listed[1]["id"]
    assert ok_json("list", "--target", target_url, "--volume", "other") == []
    assert "nightly" in run("list", "--target", target_url).stdout

    info = ok_json("inspect", second, "--target", target_url)
    assert info["parent"] == first["id"] and info["totals"]["blocks"] == 4
    assert "incremental to" in run("inspect", second, "--target", target_url).stdout

    assert ok_json("verify", second, "--target", target_url)["ok"] is True
    assert "intact" in run("verify", second, "--target", target_url).stdout

    restored = ok_json("restore", second, "--target", target_url, "--name", "db2", "--repl", "2")
    assert restored["name"] == "db2" and restored["bytes_written"] == 6 * MiB
    assert svc.sinks["db2"].data == vol.data

    deleted = ok_json("delete", first["id"], "--target", target_url)
    assert deleted["gc"] == "done" and deleted["blocks_deleted"] == 0  # all still used
    r = run("delete", second, "--target", target_url)
    assert r.exit_code == 0 and "4 blocks freed" in r.stdout
    assert ok_json("list", "--target", target_url) == []


def test_verify_and_restore_fail_naming_the_block(target_url: str, svc: FakeService) -> None:
    vol = svc.volumes["db"] = MemVolume("db", 2 * MiB, 1 * MiB)
    vol.fill_random(0, 2 * MiB)
    backup_id = ok_json("create", "db", "--target", target_url)["id"]

    async def damage() -> str:
        async with parse_target(target_url) as t:
            m = fmt.Manifest.from_json(await t.get(fmt.manifest_key(backup_id)), backup_id)
            digest = m.chunks[1].blocks[0] or ""
            await t.put(fmt.block_key(digest), fmt.encode_block(b"something else"))
            return digest

    digest = asyncio.run(damage())
    line = one_error_line(run("verify", backup_id, "--target", target_url))
    assert f"block {digest} (chunk 1, volume offset {MiB}) is corrupt" in line
    r = run("verify", backup_id, "--target", target_url, "--json")
    assert json.loads(r.stdout)["corrupt"][0]["block"] == digest
    one_error_line(r)

    line = one_error_line(run("restore", backup_id, "--target", target_url, "--name", "copy"))
    assert digest in line and "the new volume copy was removed" in line
    assert svc.removed == ["copy"] and "copy" not in svc.sinks


def test_clear_errors(target_url: str, svc: FakeService, tmp_path: Any) -> None:
    line = one_error_line(run("list", "--target", "nfs://server/share"))
    assert "unsupported scheme 'nfs'" in line
    line = one_error_line(run("list", "--target", f"file://{tmp_path}/absent"))
    assert "no such directory" in line
    line = one_error_line(run("inspect", "20260101T000000000Z-abcdef", "--target", target_url))
    assert "no backup 20260101T000000000Z-abcdef in" in line
    line = one_error_line(run("verify", "not-an-id", "--target", target_url))
    assert "no backup not-an-id" in line
    line = one_error_line(run("create", "nope", "--target", target_url))
    assert "no volume nope" in line
    # Restoring a backup that does not exist creates nothing.
    one_error_line(
        run("restore", "20260101T000000000Z-abcdef", "--target", target_url, "--name", "x")
    )
    assert svc.sinks == {} and svc.removed == []
