"""The namespace harness cleans up after itself and after runs that died."""

from __future__ import annotations

import os

import pytest

from tests.chaos import netns


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.mark.timeout(60)
def test_sweep_removes_a_dead_runs_leftovers_only() -> None:
    why = netns.unavailable()
    if why is not None:
        pytest.skip(f"chaos suite skipped: {why}")
    dead = _dead_pid()
    ns, bridge = f"{netns.PREFIX}{dead}-leftover", f"pxb{dead}"
    netns.run("ip", "netns", "add", ns)
    netns.run("ip", "link", "add", bridge, "type", "bridge")
    net = netns.Network()  # a live run: its bridge must survive the sweep
    try:
        netns.sweep()
        assert ns not in netns._namespaces()
        assert bridge not in netns._links()
        assert net.bridge in netns._links()
    finally:
        net.close()
        netns.remove(dead)
    assert net.bridge not in netns._links()
