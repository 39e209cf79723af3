"""The drain plan (pxcluster/policy/drain_plan.py): where each replica of the drained node goes,
which attachments are handed off, and what cannot move without losing redundancy."""

from __future__ import annotations

from membership.records import AttachTarget, NodeRecord, ReplicaState, VolumeRecord
from pxcluster.policy.drain_plan import plan_drain
from pxcluster.service.core import VolumeView

GiB = 1 << 30


def node(i: int, *, free: int = 100 * GiB, state: str = "active") -> NodeRecord:
    return NodeRecord(
        id=f"id{i}",
        name=f"n{i}",
        address=f"127.0.0.{i}",
        data_port=9002,
        nbd_port=10809,
        api_port=9001,
        state=state,
        capacity=100 * GiB,
        used=100 * GiB - free,
    )


def volume(name: str, size: int, on: list[str], attached: str | None = None) -> VolumeView:
    record = VolumeRecord(name, name, size, 4 << 20, len(on), on)
    return VolumeView(
        record=record,
        epoch=1,
        attachment=None,
        target=AttachTarget(attached) if attached else None,
        replicas={n: ReplicaState(n, "in_sync") for n in on},
    )


def test_replicas_move_to_the_nodes_with_most_room_and_attachments_go_to_a_holder() -> None:
    nodes = [node(1), node(2, free=10 * GiB), node(3, free=50 * GiB), node(4, free=80 * GiB)]
    alive = {n.id for n in nodes}
    views = [
        volume("a", 5 * GiB, ["id1", "id2"], attached="id1"),
        volume("b", 5 * GiB, ["id1", "id3"]),
        volume("c", 5 * GiB, ["id2", "id3"]),  # not on n1: untouched
    ]
    plan = plan_drain(nodes[0], views, nodes, alive)
    assert [(m.volume, m.to, m.bytes) for m in plan.moves] == [
        ("a", "n4", 5 * GiB),
        ("b", "n4", 5 * GiB),
    ]
    # The attachment goes to a node already holding an in-sync replica: reads stay local.
    assert [(h.volume, h.to) for h in plan.handoffs] == [("a", "n2")]
    assert plan.bytes_total == 10 * GiB and plan.losing_redundancy == []
    d = plan.to_dict(bandwidth=GiB)
    assert d["estimate_seconds"] == 10.0 and d["replicas"][0] == {
        "volume": "a",
        "to": "n4",
        "bytes": 5 * GiB,
    }


def test_placement_counts_the_room_earlier_moves_took() -> None:
    nodes = [node(1), node(2, free=6 * GiB), node(3, free=7 * GiB)]
    views = [volume("a", 5 * GiB, ["id1"]), volume("b", 5 * GiB, ["id1"])]
    plan = plan_drain(nodes[0], views, nodes, {n.id for n in nodes})
    # n3 had the most room for "a"; after it, only n2 has 5 GiB left for "b".
    assert [(m.volume, m.to) for m in plan.moves] == [("a", "n3"), ("b", "n2")]


def test_a_replica_with_nowhere_to_go_is_named_as_losing_redundancy() -> None:
    nodes = [node(1), node(2), node(3, state="cordoned"), node(4)]
    alive = {"id1", "id2", "id3"}  # n4 is down
    views = [volume("a", GiB, ["id1", "id2"], attached="id1")]
    plan = plan_drain(nodes[0], views, nodes, alive)
    # n2 holds it already, n3 is cordoned, n4 is down: nowhere to place the replica.
    assert [(m.volume, m.to) for m in plan.moves] == [("a", None)]
    assert plan.losing_redundancy == ["a"] and plan.bytes_total == 0
    assert plan.to_dict()["estimate_seconds"] is None


def test_no_node_to_hand_off_to() -> None:
    nodes = [node(1), node(2)]
    views = [volume("a", GiB, ["id1"], attached="id1")]
    plan = plan_drain(nodes[0], views, nodes, {"id1"})  # n2 is down
    assert [(h.volume, h.to) for h in plan.handoffs] == [("a", None)]
