"""A randomized fault schedule: `make chaos SEED=N ROUNDS=N [MINUTES=M]` (env CHAOS_SEED,
CHAOS_ROUNDS, CHAOS_MINUTES).

The long run stays out of CI on purpose: the file name is not test_*, so `pytest tests`
(and `make test`) never collects it, and its test is marked slow; run it by path, as `make
chaos` does. CI runs a short bounded round of the same schedule instead
(tests/chaos/test_randomized_round.py: a fixed seed, a few rounds).

Each round picks a fault and its victim from the seed, writes stamped blocks through it,
heals, then requires writes acknowledged again after the fault (a volume that is not served
again within a bounded time fails the run), waits until every replica is in sync and checks
the history; at the end the in-sync replicas are compared chunk by chunk. The seed is printed
first and on any failure: the same seed replays the same choices (timings still vary with
the machine's load).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos import faults
from tests.chaos.netns import NetnsCluster
from tests.chaos.scenario import (
    Workload,
    all_in_sync,
    compare_replicas,
    counts,
    report,
    served,
)
from tests.harness.stamps import History

NBLOCKS = 2048
ROUND_TIMEOUT = 150
SEQ_SHIFT = 1 << 40
Fault = Callable[[NetnsCluster, str, str, random.Random], None]


def _moved(c: NetnsCluster, vol: str, node: str) -> bool:
    info = c.inspect(vol)
    return info["state"] == "attached" and info["attached_node"] not in (None, node)


# How long a round waits for an automatic failover, and, after the fault, for the volume to
# be served and to take writes again: past these the run fails (the volume is stuck).
FAILOVER_TIMEOUT = 40
SERVE_TIMEOUT = 30


def _await_failover(c: NetnsCluster, vol: str, attach: str) -> None:
    """Automatic failover off `attach` within FAILOVER_TIMEOUT, or AssertionError."""
    c.wait_for(lambda: _moved(c, vol, attach), FAILOVER_TIMEOUT, "automatic failover")


def kill9_attach(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    faults.kill9(c, attach)
    _await_failover(c, vol, attach)
    faults.restart(c, attach)


def kill9_replica(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    victim = rng.choice([n for n in c.nodes if n != attach])
    faults.kill9(c, victim)
    time.sleep(rng.uniform(0.5, 4))
    faults.restart(c, victim)


def pause_attach(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    resume = faults.pause(c, attach)
    try:
        _await_failover(c, vol, attach)
        time.sleep(rng.uniform(0, 2))
    finally:
        resume()


def slow_replica(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    victim = rng.choice([n for n in c.nodes if n != attach])
    for _ in range(rng.randint(2, 6)):  # short pauses: slow, not dead
        resume = faults.pause(c, victim)
        time.sleep(rng.uniform(0.1, 0.8))
        resume()
        time.sleep(rng.uniform(0.1, 0.5))


def cut_attach_from_peers(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    heal = faults.partition_attach_from_replicas(c, attach)
    time.sleep(rng.uniform(1, 8))
    heal()


def cut_attach_from_etcd(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    heal = faults.partition_attach_from_etcd(c, attach)
    try:
        _await_failover(c, vol, attach)
    finally:
        heal()


def cut_replica(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    victim = rng.choice([n for n in c.nodes if n != attach])
    heal = (faults.isolate if rng.random() < 0.5 else faults.cut_from_peers)(c, victim)
    time.sleep(rng.uniform(1, 8))
    heal()


def restart_etcd(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    heal = faults.stop_etcd(c)
    time.sleep(rng.uniform(0, 3))
    heal()


def all_down(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    names = list(c.nodes)
    for n in names:
        faults.kill9(c, n)
    rng.shuffle(names)
    for n in names:
        c.start(n, wait=False)
    for n in names:
        c.wait_up(n)


def clean_stop_replica(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    victim = rng.choice([n for n in c.nodes if n != attach])
    c.kill(victim, signal.SIGTERM)
    time.sleep(rng.uniform(1, 4))
    faults.restart(c, victim)


def handoff(c: NetnsCluster, vol: str, attach: str, rng: random.Random) -> None:
    c.cli("volume", "failover", vol)


MENU: dict[str, Fault] = {
    f.__name__: f
    for f in (
        kill9_attach,
        kill9_replica,
        pause_attach,
        slow_replica,
        cut_attach_from_peers,
        cut_attach_from_etcd,
        cut_replica,
        restart_etcd,
        all_down,
        clean_stop_replica,
        handoff,
    )
}


def _seed() -> int:
    raw = os.environ.get("CHAOS_SEED", "")
    return int(raw) if raw else random.SystemRandom().randrange(1, 1 << 31)


SCRUB_EVERY = 5  # rounds between scrubs: the replicas must agree, nothing to repair


def run_schedule(
    c: NetnsCluster,
    tmp: Path,
    seed: int,
    rounds: int,
    *,
    minutes: float = 0,
    replay: str = "",
    seconds: tuple[float, float] = (8, 16),
    menu: dict[str, Fault] | None = None,
) -> dict[str, int]:
    """`rounds` rounds of the schedule drawn from `seed` on a fresh repl-3 volume "rz"; stops
    early after the round that passes `minutes` (if given). Raises AssertionError on a lost,
    phantom, corrupt or unstable block, a volume not served again after a fault, replicas that
    never come back in sync or that diverge. Returns the totals."""
    rng = random.Random(seed)
    choices = menu or MENU
    replay = replay or f"seed {seed}"
    c.cli("volume", "create", "rz", "--size", "32M", "--repl", "3")
    c.attach("rz", "n1")
    totals: dict[str, int] = {}
    whole = History()
    started = time.monotonic()
    rnd = 0
    for rnd in range(1, rounds + 1):
        name = rng.choice(sorted(choices))
        attach = c.inspect("rz")["attached_node"]
        w = Workload(c, "rz", tmp, NBLOCKS, seconds=rng.uniform(*seconds), seed=rng.getrandbits(31))
        try:
            w.start()
            time.sleep(rng.uniform(1, 3))
            choices[name](c, "rz", attach, rng)
            # Healed: the volume must take writes again (Workload.finish waits for them,
            # bounded, and require_acked counts them on both sides of this mark).
            w.fault()
            history = w.finish()
            # One history over all rounds: blocks keep earlier rounds' writes. Seqs restart
            # in each writer, so shift them past every earlier round's.
            whole.extend(history, seq_shift=rnd * SEQ_SHIFT)
            c.wait_for(lambda: all_in_sync(c, "rz"), 120, "every replica in sync")
            c.wait_for(lambda: served(c, "rz"), SERVE_TIMEOUT, "the volume served at its URI")
            result = w.check(whole)
        except BaseException:
            print(f"CHAOS round {rnd} ({name} on {attach}) FAILED; replay: {replay}", flush=True)
            raise
        report(f"round {rnd} {name} (attach {attach})", history, result)
        for k, v in counts(history, result).items():
            totals[k] = totals.get(k, 0) + v
        assert result.ok, f"round {rnd} ({name}): {result}; replay: {replay}"
        if rnd % SCRUB_EVERY == 0:
            scrub = c.cli_json("volume", "scrub", "rz")
            assert not scrub["repaired"] and not scrub["unrepairable"], (rnd, scrub, replay)
            totals["scrubs"] = totals.get("scrubs", 0) + 1
        if minutes and time.monotonic() - started > minutes * 60:
            break
    compare_replicas(c, "rz", tmp)
    totals["rounds"] = rnd
    mins = (time.monotonic() - started) / 60
    line = " ".join(f"{k}={v}" for k, v in totals.items())
    print(f"CHAOS seed {seed} total, {rnd} rounds in {mins:.1f} min: {line}", flush=True)
    return totals


SEED = _seed()
ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "") or "5")
# Optional wall-clock budget: stop after the round that passes it (ROUNDS stays the maximum).
MINUTES = float(os.environ.get("CHAOS_MINUTES", "") or "0")


@pytest.mark.slow
@pytest.mark.timeout(ROUNDS * ROUND_TIMEOUT + 300)
def test_randomized_schedule(ncluster: NetnsCluster, tmp_path: Path) -> None:
    replay = f"make chaos SEED={SEED} ROUNDS={ROUNDS}"
    print(f"\nCHAOS seed {SEED}, {ROUNDS} rounds (replay: {replay})", flush=True)
    run_schedule(ncluster, tmp_path, SEED, ROUNDS, minutes=MINUTES, replay=replay)
