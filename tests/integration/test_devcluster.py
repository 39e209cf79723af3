"""`pxcluster dev up|status|down`: the README's first command, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.etcd import free_port


def px(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pxcluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(180)
def test_dev_up_serves_a_volume_and_down_stops_everything(tmp_path: Path) -> None:
    etcd = f"http://127.0.0.1:{free_port()}"
    d = str(tmp_path / "dev")
    up = px("--etcd", etcd, "dev", "up", "--nodes", "3", "--dir", d, "--disk-size", "1G")
    try:
        assert up.returncode == 0, up.stderr
        assert "3/3" in up.stdout  # the cluster status it prints
        procs = json.loads(px("dev", "status", "--dir", d, "--json").stdout)
        assert [p["name"] for p in procs] == ["etcd", "n1", "n2", "n3"]
        assert all(p["running"] for p in procs)
        again = px("--etcd", etcd, "dev", "up", "--dir", d)
        assert again.returncode != 0 and "already running" in again.stderr
        assert (
            px(
                "--etcd", etcd, "volume", "create", "demo", "--size", "64M", "--repl", "3"
            ).returncode
            == 0
        )
        uri = px(
            "--etcd", etcd, "volume", "attach", "demo", "--node", "n1", "--wait"
        ).stdout.strip()
        assert uri == "nbd://127.0.0.1:10809/demo"
        info = subprocess.run(
            ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30
        )
        assert info.stdout.strip() == str(64 << 20)
    finally:
        down = px("dev", "down", "--dir", d)
    assert down.returncode == 0, down.stderr
    for p in procs:
        assert (
            not Path(f"/proc/{p['pid']}").exists()
            or "Z" in Path(f"/proc/{p['pid']}/stat").read_text().split(")")[-1].split()[0]
        )
    assert px("dev", "status", "--dir", d, "--json").stdout.strip() == "[]"
