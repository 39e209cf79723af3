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


def pick_attach_node(
    replica_states: dict[str, str],
    nodes: dict[str, NodeRecord],
    alive: set[str],
    *,
    exclude: frozenset[str] = frozenset(),
) -> str | None:
    """Where a volume should be served next: an up, active node holding an in-sync replica
    (reads stay local), else any up, active node. None when no node qualifies."""

    def usable(node_id: str) -> bool:
        n = nodes.get(node_id)
        return n is not None and node_id in alive and n.state == "active" and node_id not in exclude

    holders = sorted(
        (n for n, st in replica_states.items() if st == "in_sync" and usable(n)),
        key=lambda n: nodes[n].name,
    )
    if holders:
        return holders[0]
    others = sorted((n for n in nodes if usable(n)), key=lambda n: nodes[n].name)
    return others[0] if others else None
