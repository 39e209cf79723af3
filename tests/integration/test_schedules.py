"""Snapshot and backup schedules, run by the leader, resumed by a new leader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster


def autos(c: Cluster, vol: str) -> list[str]:
    snaps = c.cli_json("volume", "snapshot", "list", vol)
    return [s["name"] for s in snaps if s["name"].startswith("auto-") and s["state"] == "ready"]


@pytest.mark.timeout(240)
def test_schedules_take_prune_and_survive_leader_loss(cluster3: Cluster, tmp_path: Path) -> None:
    c = cluster3
    root = tmp_path / "scheduled"
    root.mkdir()
    c.cli("volume", "create", "app", "--size", "8M", "--repl", "3")
    c.attach("app", "n1")
    res = c.cli("volume", "update", "app", "--backup-schedule", "every 10s keep 2", check=False)
    assert res.returncode != 0 and "--backup-target" in res.stderr
    res = c.cli("volume", "update", "app", "--snapshot-schedule", "hourly", check=False)
    assert res.returncode != 0 and "invalid schedule" in res.stderr
    info = c.cli_json(
        "volume",
        "update",
        "app",
        "--snapshot-schedule",
        "every 10s keep 2",
        "--backup-schedule",
        "every 10s keep 2",
        "--backup-target",
        f"file://{root}",
    )
    assert info["snapshot_schedule"] == "every 10s keep 2"
    assert info["backup_target"] == f"file://{root}"

    seen: set[str] = set()

    def taken(n: int) -> bool:
        now = autos(c, "app")
        seen.update(now)
        return len(seen) >= n and len(now) <= 2

    c.wait_for(lambda: taken(3), 90, "three scheduled snapshots, at most two kept")
    assert len(autos(c, "app")) <= 2

    # The leader dies: the next one carries on from what etcd says.
    leader = c.cli_json("cluster", "status")["leader"]
    assert leader in c.nodes
    c.kill(leader)
    before = set(seen)
    c.wait_for(lambda: taken(len(before) + 1), 90, "a scheduled snapshot under the new leader")

    backups = c.cli_json("backup", "list", "--target", f"file://{root}")
    assert 1 <= len(backups) <= 2, backups
    assert all(b["volume"] == "app" for b in backups)
    manifests = list((root / "backups").glob("*.json"))
    assert len(manifests) == len(backups)
    json.loads(manifests[0].read_text())
