"""`bench/scale.py --quick` (issue 8): 20 simulated nodes and 100 volumes against a real etcd,
4 of the nodes stopped at once; its JSON must show the load measured and every volume of the
stopped nodes served again elsewhere, never on two nodes at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")

ROOT = Path(__file__).resolve().parents[2]


def test_scale_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "scale.py"),
            "--quick",
            "--dir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())

    steady = r["steady"]
    # The aim of issue 8: under 1 write/s per node when nothing happens (an idle cluster
    # commits nothing through raft: lease keep-alives are not raft writes in etcd 3.4).
    assert steady["raft_writes_per_node_s"] < 1.0
    assert steady["client_writes_per_node_s"] > 0
    assert steady["keepalives_per_node_s"] > 0  # every node keeps its lease alive
    assert steady["reads_per_s"] > 0

    (kill,) = r["failover"]
    assert len(kill["killed"]) == 4
    assert r["leader"] not in kill["killed"]
    assert kill["volumes_moved"] > 0
    assert kill["all_served"], kill["missing"]
    assert kill["max_s"] is not None and kill["max_s"] < 30

    checks = r["checks"]
    assert checks["no_double_attachment"], checks
    assert checks["etcd_double_attachments"] == []
    assert checks["served_twice"] == []
