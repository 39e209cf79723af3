"""The cluster side of a host device: attach the volume on this host's node (taking it over
from a dead node), mark its consumer as a device here, detach it when the device goes."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

from membership.records import AttachTarget, NodeRecord
from pxcluster.errors import InvalidArgument, NodeBusy, VolumeBusy
from pxcluster.service.core import Service

ATTACH_TIMEOUT = 60.0
NODE_ENV = "PXC_NODE"


async def local_node(svc: Service, name: str | None) -> NodeRecord:
    """The node on this host: --node, else $PXC_NODE, else the node named as this host, else the
    only node whose NBD socket is on this host."""
    name = name or os.environ.get(NODE_ENV) or None
    if name:
        return await svc.find_node(name)
    nodes = await svc.nodes()
    host = socket.gethostname()
    for n in nodes:
        if n.name == host:
            return n
    here = [n for n in nodes if _socket_here(n)]
    if len(here) == 1:
        return here[0]
    raise InvalidArgument(
        "which node is on this host? pass --node N (or set PXC_NODE)"
        + (f": {len(here)} nodes have their NBD socket here" if here else "")
    )


def _socket_here(n: NodeRecord) -> bool:
    return bool(n.data_dir) and os.path.exists(os.path.join(n.data_dir, "nbd.sock"))


async def attach_here(
    svc: Service, name: str, node: NodeRecord, *, force: bool
) -> tuple[str, bool]:
    """Attach NAME on `node` for a device on its host; returns (NBD URI, attached by us).

    Attached elsewhere: refused while that node is up (its host may still have the volume
    mounted) unless `force`; once the node is down (its lease expired) the volume is taken
    over, fenced by the epoch bump, and the new engine reconciles what the old one left dirty
    before it serves."""
    view = await svc.volume(name)
    attached_by_us = False
    target = view.target
    if target is None or target.reason != "user":
        await svc.attach(name, node.name)
        attached_by_us = True
    elif target.node != node.id:
        alive = await svc.alive()
        other = {n.id: n.name for n in await svc.nodes()}.get(target.node, target.node)
        if target.node in alive and not force:
            raise VolumeBusy(
                f"volume {name} is attached on {other}, which is up: unmount it there first, "
                "or pass --force to take it over"
            )
        if node.id not in alive:
            raise NodeBusy(f"node {node.name} is down")
        await svc.failover(name, node.name)
        attached_by_us = True
    await _mark_host_consumer(svc, name, node.id)
    served = await svc.wait_attached(name, node.id, ATTACH_TIMEOUT)
    uri = (await svc.inspect(served))["nbd_uri"]
    if not uri:
        raise VolumeBusy(f"volume {name} is attached on {node.name} but has no NBD URI")
    return str(uri), attached_by_us


async def _mark_host_consumer(svc: Service, name: str, node_id: str) -> None:
    """Tell the leader a device on this host consumes the volume, so its automatic failover
    leaves it (the consumer would not follow). Guarded on the target read: if it moved
    meanwhile, the wait for the attachment says so."""
    for _ in range(10):
        view = await svc.volume(name)
        t = view.target
        if t is None or t.node != node_id or t.consumer == "host":
            return
        keys = svc.keys
        marked: AttachTarget = replace(t, consumer="host")
        txn = (
            svc.etcd.txn()
            .value_is(keys.target(view.record.id), t.encode())
            .put(keys.target(view.record.id), marked.encode())
        )
        if await svc.etcd.commit(txn):
            return
    raise VolumeBusy(f"volume {name} kept changing while attaching; try again")


async def release(svc: Service, name: str, node_id: str) -> None:
    """Detach NAME if it is still attached on `node_id` (flush, mark clean, release)."""
    view = await svc.volume(name)
    if view.target is not None and view.target.node == node_id:
        await svc.detach(name)
        await svc.wait_detached(name, ATTACH_TIMEOUT)
