"""`pxcluster verify` writes stamped blocks over its own NBD client, follows the
volume when it moves, and checks every block."""

from __future__ import annotations

import json

import pytest

from tests.harness.cluster import Cluster
from tests.harness.stamps import MIN_ACKED


@pytest.mark.timeout(180)
def test_verify_plain_and_with_a_failover(cluster3: Cluster) -> None:
    c = cluster3
    c.cli("volume", "create", "vv", "--size", "32M", "--repl", "3")
    c.attach("vv", "n1")
    res = c.cli("verify", "vv", "--seconds", "3", "--seed", "5", "--json")
    out = json.loads(res.stdout)
    assert out["ok"] and out["seed"] == 5, out
    # Enough acknowledged writes for the check to mean something (not a rate: a slow machine
    # passes too).
    assert out["acknowledged"] >= MIN_ACKED
    assert out["issued"] == out["acknowledged"] + out["failed"]
    assert out["lost"] == out["phantom"] == out["corrupt"] == out["unstable"] == 0
    assert out["faults"] == [] and out["moves"] == []

    res = c.cli("verify", "vv", "--seconds", "8", "--with-faults", "--json", timeout=120)
    out = json.loads(res.stdout)
    assert out["ok"] and out["acknowledged"] >= MIN_ACKED, out
    assert len(out["faults"]) == 1 and out["faults"][0].startswith("failover to ")
    assert out["moves"], "the writers never followed the volume"
    assert c.inspect("vv")["attached_node"] != "n1"

    text = c.cli("verify", "vv", "--seconds", "1").stdout
    assert "lost 0  phantom 0  corrupt 0" in text, text


@pytest.mark.timeout(120)
def test_verify_refuses_unknown_and_detached_volumes(cluster3: Cluster) -> None:
    c = cluster3
    res = c.cli("verify", "nosuch", "--seconds", "1", check=False)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == "error: unknown volume 'nosuch'", res.stderr
    c.cli("volume", "create", "dv", "--size", "16M", "--repl", "2")
    res = c.cli("verify", "dv", "--seconds", "1", check=False)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "is detached; attach it first" in res.stderr, res.stderr
