"""Where a volume's replicas go: distinct nodes, never cordoned/draining/down/full ones,
spread across zones, weighted by free capacity. Pure: it sees records, not etcd."""

from __future__ import annotations

from dataclasses import dataclass

from membership.records import NodeRecord
from pxcluster.errors import PlacementError


@dataclass(frozen=True)
class Candidate:
    node: NodeRecord
    up: bool
    free: int


def place(
    candidates: list[Candidate], repl: int, size: int, *, exclude: frozenset[str] = frozenset()
) -> list[str]:
    """Node ids for `repl` replicas of a volume of `size` bytes, most free space first."""
    reasons: dict[str, str] = {}
    eligible: list[Candidate] = []
    for c in candidates:
        name = c.node.name
        if c.node.id in exclude:
            reasons[name] = "already holds a replica"
        elif not c.up:
            reasons[name] = "down"
        elif c.node.state != "active":
            reasons[name] = c.node.state
        elif c.free < size:
            reasons[name] = "full"
        else:
            eligible.append(c)
    eligible.sort(key=lambda c: (-c.free, c.node.name))
    chosen: list[Candidate] = []
    zones_used: set[str] = set()
    # First pass: one replica per zone; second pass fills up when zones run out.
    for c in eligible:
        if len(chosen) < repl and (not c.node.zone or c.node.zone not in zones_used):
            chosen.append(c)
            zones_used.add(c.node.zone)
    for c in eligible:
        if len(chosen) < repl and c not in chosen:
            chosen.append(c)
    if len(chosen) < repl:
        detail = ", ".join(f"{n}: {r}" for n, r in sorted(reasons.items())) or "no nodes joined"
        raise PlacementError(
            f"cannot place {repl} replicas: only {len(chosen)} eligible node(s) ({detail})"
        )
    return [c.node.id for c in chosen]
