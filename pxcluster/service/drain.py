"""`node drain`: plan, start and follow a drain. The leader's DrainController does the work
(pxcluster/controllers/drain.py); this is the operator's side, through etcd."""

from __future__ import annotations

import time

from membership.records import DrainOp, NodeRecord
from pxcluster.errors import NodeBusy, PlacementError
from pxcluster.policy.drain_plan import DrainPlan, plan_drain
from pxcluster.service.core import Service


async def make_plan(svc: Service, name: str) -> tuple[NodeRecord, DrainPlan]:
    node = await svc.find_node(name)
    plan = plan_drain(node, await svc.volumes(), await svc.nodes(), await svc.alive())
    return node, plan


async def status(svc: Service, node: NodeRecord) -> DrainOp | None:
    kv = await svc.etcd.get(svc.keys.drain_op(node.id))
    return None if kv is None else DrainOp.decode(kv.value)


async def start(svc: Service, name: str, *, force: bool) -> tuple[DrainOp, DrainPlan]:
    """Start (or, if one runs, rejoin) the drain of `name`. Refuses up front when the other
    nodes cannot keep every volume's replication factor, unless `force`."""
    node, plan = await make_plan(svc, name)
    current = await status(svc, node)
    if node.state == "draining" and current is not None and current.state == "running":
        return current, plan
    if node.state == "drained":
        raise NodeBusy(f"node {node.name} is already drained")
    if plan.losing_redundancy and not force:
        vols = ", ".join(plan.losing_redundancy)
        raise PlacementError(
            f"cannot drain {node.name}: no other eligible node for a replica of {vols}; "
            "add a node, or pass --force to drain anyway with fewer replicas"
        )
    op = DrainOp(
        node=node.id,
        state="running",
        force=force,
        started=time.time(),
        replicas_total=len(plan.moves),
        attachments_total=len(plan.handoffs),
        bytes_total=plan.bytes_total,
        message="lowering redundancy of " + ", ".join(plan.losing_redundancy)
        if plan.losing_redundancy
        else "",
    )
    await svc.set_node_state(name, "draining", allowed_from=("active", "cordoned", "draining"))
    await svc.etcd.put(svc.keys.drain_op(node.id), op.encode())
    return op, plan
