"""One leader pass reads `volumes/`, `alive/` and `nodes/` once between its four controllers
(controllers/view.py), on a real etcd; the controllers still act on what they read, and
their writes still refuse a view that went stale."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from membership.records import DrainOp, NodeRecord, ReplicaState
from pxcluster.controllers.drain import DrainController
from pxcluster.controllers.repair import RepairController
from pxcluster.controllers.runner import Controller, leader_controllers, run_pass
from pxcluster.controllers.schedules import ScheduleController
from pxcluster.controllers.view import PassView
from pxcluster.service.core import Service
from tests.harness.etcd import CountingEtcd, EtcdServer

NODES = ("n1", "n2", "n3", "n4")


@pytest.fixture
async def svc(etcd: EtcdServer) -> AsyncIterator[Service]:
    """Four up, active nodes (n1..n4, ids = names) and six volumes of two replicas, spread
    over them (v0, v2, v4 on n1 and n2; v1, v3, v5 on n3 and n4) and attached round-robin."""
    client = CountingEtcd(etcd.url, "/pxc/t/")
    await client.connect()
    service = Service(client, "t")
    try:
        used = dict.fromkeys(NODES, 0)

        async def put_nodes() -> None:
            for name in NODES:
                rec = NodeRecord(name, name, "127.0.0.1", 1, 2, 3, capacity=1 << 40)
                rec = dataclasses.replace(rec, used=used[name])
                await client.put(service.keys.node(name), rec.encode())

        await put_nodes()
        for name in NODES:
            await client.put(service.keys.alive(name), b"1")
        for i in range(6):
            view = await service.create_volume(f"v{i}", 1 << 30, 2)
            for n in view.record.replica_nodes:  # as a node's refreshed record would say
                used[n] += 1 << 30
            await put_nodes()
            await service.attach(f"v{i}", NODES[i % len(NODES)])
        client.ranges.clear()
        yield service
    finally:
        await client.close()


def ranges(svc: Service) -> collections.Counter[str]:
    assert isinstance(svc.etcd, CountingEtcd)
    return svc.etcd.ranges


def leader(svc: Service) -> list[Controller]:
    return leader_controllers(svc, replace_after=0.0)


async def test_a_pass_reads_each_prefix_once(svc: Service) -> None:
    await run_pass(leader(svc))
    r = ranges(svc)
    assert r["volumes/"] == 1
    assert r["alive/"] == 1
    assert r["nodes/"] == 1
    # Each on its own (how a pass ran before): once each, but the drain controller (none runs).
    r.clear()
    for c in leader(svc):
        await c.run_pass()
    assert r["volumes/"] == 3


async def test_a_down_node_is_failed_over_and_replaced_in_one_read(svc: Service) -> None:
    await svc.etcd.delete(svc.keys.alive("n1"))
    on_n1 = [v.record.name for v in await svc.volumes() if v.target and v.target.node == "n1"]
    held = [v.record.name for v in await svc.volumes() if "n1" in v.replicas]
    assert on_n1 and held
    ranges(svc).clear()
    await run_pass(leader(svc))
    assert ranges(svc)["volumes/"] == 1
    assert ranges(svc)["alive/"] == 1
    for v in await svc.volumes():
        assert v.target is not None and v.target.node != "n1", v.record.name
        assert "n1" not in v.replicas, v.record.name  # replace_after 0: replaced at once
        assert len(v.replicas) == 2


async def test_running_drains_share_the_pass_read(svc: Service) -> None:
    for name in ("n1", "n2"):
        await svc.set_node_state(name, "draining", allowed_from=("active",))
        op = DrainOp(name, "running", started=time.time())
        await svc.etcd.put(svc.keys.drain_op(name), op.encode())
    ranges(svc).clear()
    await run_pass(leader(svc))
    # Two drains under way and neither done: still one read of volumes/ and nodes/.
    assert ranges(svc)["volumes/"] == 1
    assert ranges(svc)["nodes/"] == 1
    for v in await svc.volumes():
        assert v.target is not None and v.target.node in ("n3", "n4"), v.record.name
        if "n1" in v.replicas:
            # n1's drain gave it a third replica; n2's, later in the same pass, saw the
            # record the view showed gone and left it to the next pass.
            assert len(v.replicas) == 3 and "n2" in v.replicas, v.record.name


async def test_a_drain_started_after_the_view_goes_on(svc: Service) -> None:
    seen = PassView(svc)
    await seen.volumes()
    await seen.nodes()  # n4 active
    await svc.set_node_state("n4", "draining", allowed_from=("active",))
    await svc.etcd.put(svc.keys.drain_op("n4"), DrainOp("n4", "running").encode())
    await DrainController(svc).run_pass(seen)
    kv = await svc.etcd.get(svc.keys.drain_op("n4"))
    assert kv is not None and DrainOp.decode(kv.value).state == "running"  # not cancelled


async def test_a_drain_ends_on_a_read_newer_than_its_view(svc: Service) -> None:
    await svc.detach("v0")
    seen = PassView(svc)
    await seen.volumes()
    await seen.nodes()
    # Not in the view: n5 joins, gets a volume, then is drained (the view would call it empty).
    n5 = NodeRecord("n5", "n5", "127.0.0.1", 1, 2, 3, capacity=1 << 40)
    await svc.etcd.put(svc.keys.node("n5"), n5.encode())
    await svc.etcd.put(svc.keys.alive("n5"), b"1")
    await svc.attach("v0", "n5")
    await svc.set_node_state("n5", "draining", allowed_from=("active",))
    await svc.etcd.put(svc.keys.drain_op("n5"), DrainOp("n5", "running").encode())
    await DrainController(svc).run_pass(seen)
    assert (await svc.find_node("n5")).state == "draining"
    await svc.detach("v0")
    await DrainController(svc).run_pass()
    assert (await svc.find_node("n5")).state == "drained"


async def test_a_replacement_refuses_a_stale_view(svc: Service) -> None:
    await svc.etcd.delete(svc.keys.alive("n1"))
    view = next(v for v in await svc.volumes() if "n1" in v.replicas)
    seen = PassView(svc)
    await seen.volumes()
    # After the view: the other replica, the copy the replacement relies on, goes stale.
    (other,) = [n for n in view.replicas if n != "n1"]
    stale = ReplicaState(other, "stale", view.epoch).encode()
    await svc.etcd.put(svc.keys.replica(view.record.id, other), stale)
    await RepairController(svc, replace_after=0.0).run_pass(seen)
    assert "n1" in (await svc.volume_by_id(view.record.id)).replicas
    # Back in sync: the next pass replaces it.
    fresh = ReplicaState(other, "in_sync", view.epoch).encode()
    await svc.etcd.put(svc.keys.replica(view.record.id, other), fresh)
    await RepairController(svc, replace_after=0.0).run_pass()
    assert "n1" not in (await svc.volume_by_id(view.record.id)).replicas


async def test_a_snapshot_ended_after_the_view_is_not_taken_again(svc: Service) -> None:
    await svc.set_schedules("v0", "every 1h keep 2", None, None)
    vid = (await svc.volume("v0")).record.id
    ctrl = ScheduleController(svc)
    seen = PassView(svc)
    await seen.volumes()
    ctrl._finished[(vid, "snapshot")] = time.monotonic()  # a scheduled one just ended
    await ctrl.run_pass(seen)
    assert not ctrl.running
    await ctrl.run_pass()  # a view read after it: due again (the snapshot is not in etcd)
    assert (vid, "snapshot") in ctrl.running
    task = ctrl.running[(vid, "snapshot")]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
