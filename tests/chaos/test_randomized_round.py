"""A short, bounded round of the randomized fault schedule (tests/chaos/randomized.py), so CI
runs the schedule itself: a fixed seed, a few short rounds. It fails as the long run does: on
a lost, phantom, corrupt or unstable block, on a volume not served again (no writes
acknowledged after a fault within the bound), or on replicas that diverge.

The long run (`make chaos SEED=N ROUNDS=N`) stays out of CI: it takes ~15 s a round."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.netns import NetnsCluster
from tests.chaos.randomized import run_schedule

SEED = 20261127
ROUNDS = 4


@pytest.mark.timeout(240)
def test_randomized_round(ncluster: NetnsCluster, tmp_path: Path) -> None:
    totals = run_schedule(ncluster, tmp_path, SEED, ROUNDS, seconds=(4, 6))
    assert totals["rounds"] == ROUNDS and totals["lost"] == 0, totals
