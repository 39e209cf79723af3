"""What draining a node would do: the plan `node drain --dry-run` prints and the check
`node drain` makes before it starts. Pure: it sees records, not etcd."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from membership.records import NodeRecord
from pxcluster.errors import PlacementError
from pxcluster.policy.placement import Candidate, pick_attach_node, place
from pxcluster.service.core import VolumeView


@dataclass(frozen=True)
class ReplicaMove:
    volume: str
    to: str | None  # node name; None: nowhere to go (redundancy would drop)
    bytes: int  # upper bound: the volume's size


@dataclass(frozen=True)
class HandOff:
    volume: str
    to: str | None


@dataclass
class DrainPlan:
    node: str
    moves: list[ReplicaMove] = field(default_factory=list)
    handoffs: list[HandOff] = field(default_factory=list)

    @property
    def bytes_total(self) -> int:
        return sum(m.bytes for m in self.moves if m.to is not None)

    @property
    def losing_redundancy(self) -> list[str]:
        return [m.volume for m in self.moves if m.to is None]

    def estimate_seconds(self, bandwidth: int) -> float | None:
        return None if bandwidth <= 0 else round(self.bytes_total / bandwidth, 1)

    def to_dict(self, bandwidth: int = 0) -> dict[str, Any]:
        return {
            "node": self.node,
            "replicas": [{"volume": m.volume, "to": m.to, "bytes": m.bytes} for m in self.moves],
            "attachments": [{"volume": h.volume, "to": h.to} for h in self.handoffs],
            "bytes_total": self.bytes_total,
            "losing_redundancy": self.losing_redundancy,
            "rebuild_bandwidth": bandwidth or None,
            "estimate_seconds": self.estimate_seconds(bandwidth),
        }


def plan_drain(
    node: NodeRecord, views: list[VolumeView], nodes: list[NodeRecord], alive: set[str]
) -> DrainPlan:
    by_id = {n.id: n for n in nodes}
    free = {n.id: n.capacity - n.used for n in nodes}
    plan = DrainPlan(node.name)
    for v in views:
        if v.target is not None and v.target.node == node.id and v.target.reason == "user":
            states = {n: r.state for n, r in v.replicas.items()}
            to = pick_attach_node(states, by_id, alive, exclude=frozenset({node.id}))
            plan.handoffs.append(HandOff(v.record.name, by_id[to].name if to else None))
        if node.id not in v.replicas:
            continue
        candidates = [Candidate(n, n.id in alive, free[n.id]) for n in nodes if n.id != node.id]
        try:
            (to,) = place(candidates, 1, v.record.size, exclude=frozenset(v.replicas))
        except PlacementError:
            plan.moves.append(ReplicaMove(v.record.name, None, v.record.size))
            continue
        free[to] -= v.record.size
        plan.moves.append(ReplicaMove(v.record.name, by_id[to].name, v.record.size))
    return plan
