"""The bounded chaos set: one fault per scenario, under a stamped workload that follows the
volume, then the history checker and a chunk-by-chunk comparison of the in-sync replicas.
Fixed seeds; each scenario prints a `CHAOS name: issued=.. acknowledged=.. ...` line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos import faults
from tests.chaos.netns import NetnsCluster
from tests.chaos.scenario import Workload, all_in_sync, compare_replicas, report

NBLOCKS = 2048  # 8 MiB: two chunks of 4 MiB


def setup_volume(c: NetnsCluster, name: str, attach: str, size: str = "32M") -> None:
    c.cli("volume", "create", name, "--size", size, "--repl", "3")
    c.attach(name, attach)


def moved_off(c: NetnsCluster, volume: str, node: str) -> bool:
    info = c.inspect(volume)
    return info["state"] == "attached" and info["attached_node"] not in (None, node)


def finish(
    c: NetnsCluster, w: Workload, tmp: Path, name: str, *, in_sync_timeout: float = 90
) -> None:
    history = w.finish()
    c.wait_for(lambda: all_in_sync(c, w.volume), in_sync_timeout, "every replica in sync")
    result = w.check(history)
    chunks = compare_replicas(c, w.volume, tmp)
    report(name, history, result, {"replicas_compared": len(chunks)})
    assert history.acked, "the workload acknowledged nothing"
    assert result.ok, result


@pytest.mark.timeout(240)
def test_kill9_attach_node(ncluster: NetnsCluster, tmp_path: Path) -> None:
    c = ncluster
    setup_volume(c, "k9", "n1")
    w = Workload(c, "k9", tmp_path, NBLOCKS, seconds=12, seed=101)
    w.start()
    time.sleep(3)  # writes in flight when the node dies
    faults.kill9(c, "n1")
    c.wait_for(lambda: moved_off(c, "k9", "n1"), 30, "failover off n1")
    time.sleep(2)
    faults.restart(c, "n1")
    finish(c, w, tmp_path, "kill9-attach")
