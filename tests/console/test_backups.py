"""Backups on the console, against a real two-node cluster: the volume page lists the backups at
the volume's backup target, "Back up now" takes one, and "Restore" makes a new volume that
reads back the same bytes."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.harness.cluster import Cluster

CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')
BACKUP_ROW = re.compile(r'data-backup="([^"]+)"')


def tool(*cmd: str) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout


@pytest.mark.timeout(240)
async def test_back_up_now_and_restore_from_the_volume_page(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    c.add_node("n1")
    c.add_node("n2")
    c.cli("volume", "create", "bk", "--size", "16M", "--repl", "2")
    uri = c.attach("bk", "n1")
    data = os.urandom(4 << 20)
    (tmp_path / "in.bin").write_bytes(data)
    tool("nbdcopy", str(tmp_path / "in.bin"), uri)
    target = tmp_path / "backups"
    target.mkdir()
    n = c.nodes["n1"]
    base = f"http://{n.address}:{n.ports['api']}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def page(path: str) -> str:
            async with s.get(base + path) as r:
                assert r.status == 200, (path, r.status)
                return await r.text()

        async def post(path: str, form: dict[str, str]) -> tuple[int, str]:
            async with s.post(base + path, data=form, allow_redirects=False) as r:
                return r.status, r.headers.get("Location", "") or await r.text()

        html = await page("/volumes/bk")
        assert "No backup target" in html
        (csrf,) = set(CSRF.findall(html))
        # Without a target, one clear refusal and nothing made.
        status, body = await post("/volumes/bk/backups", {"csrf": csrf})
        assert status == 400 and "no backup target" in body, (status, body[:300])

        status, body = await post("/volumes/bk/backup-target", {"csrf": csrf, "target": "ftp://x"})
        assert status == 400 and "invalid backup target" in body, (status, body[:300])
        status, where = await post(
            "/volumes/bk/backup-target", {"csrf": csrf, "target": f"file://{target}"}
        )
        assert status in (302, 303), (status, where)
        assert c.inspect("bk")["backup_target"] == f"file://{target}"
        status, where = await post("/volumes/bk/backups", {"csrf": csrf})
        assert status in (302, 303) and where.startswith("/volumes/bk"), (status, where)
        html = await page("/volumes/bk")
        (backup_id,) = BACKUP_ROW.findall(html)
        assert backup_id in {
            b["id"] for b in c.cli_json("backup", "list", "--target", f"file://{target}")
        }

        status, body = await post(
            "/volumes/bk/restore", {"csrf": csrf, "backup": "../../etc", "name": "x"}
        )
        assert status == 400, (status, body[:200])
        status, where = await post(
            "/volumes/bk/restore", {"csrf": csrf, "backup": backup_id, "name": "bk-restored"}
        )
        assert status in (302, 303) and where.startswith("/volumes/bk-restored"), (status, where)
    restored = c.attach("bk-restored", "n2")
    out = tool("nbdcopy", restored, "-")
    assert hashlib.sha256(out[: len(data)]).digest() == hashlib.sha256(data).digest()
