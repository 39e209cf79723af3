"""The /v1 routes: each handler checks its input, calls pxcluster.service.core (the layer the CLI
uses too) and answers with the JSON the CLI prints with --json."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from membership.records import DrainOp, NodeRecord
from pxcluster import inputs
from pxcluster.api.body import Body
from pxcluster.errors import InvalidArgument, UnknownNode
from pxcluster.service import drain, snapshots, transfer
from pxcluster.service.core import Service

SERVICE = web.AppKey("service", Service)
MAX_WAIT = 600.0
MAX_REPL = 3

routes = web.RouteTableDef()


def _svc(request: web.Request) -> Service:
    return request.app[SERVICE]


def _ok(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status)


# Names in the path are checked as the CLI checks them, before any etcd key is built from one.


def _volume(request: web.Request) -> str:
    return inputs.volume_name(request.match_info["name"])


def _node(request: web.Request) -> str:
    return inputs.node_name(request.match_info["name"])


def _snapshot(request: web.Request) -> str:
    return inputs.snapshot_name(request.match_info["snap"])


# --- cluster and nodes


@routes.get("/v1/cluster")
async def cluster_status(request: web.Request) -> web.Response:
    return _ok(await _svc(request).cluster_status())


@routes.get("/v1/nodes")
async def node_list(request: web.Request) -> web.Response:
    return _ok(await _svc(request).node_list())


async def _node_entry(svc: Service, name: str) -> dict[str, Any]:
    for n in await svc.node_list():
        if name in (n["name"], n["id"]):
            return n
    raise UnknownNode(f"unknown node {name!r}")


@routes.get("/v1/nodes/{name}")
async def node_get(request: web.Request) -> web.Response:
    return _ok(await _node_entry(_svc(request), _node(request)))


@routes.delete("/v1/nodes/{name}")
async def node_remove(request: web.Request) -> web.Response:
    name = _node(request)
    await _svc(request).remove_node(name)
    return _ok({"name": name, "state": "removed"})


@routes.post("/v1/nodes/{name}/cordon")
async def node_cordon(request: web.Request) -> web.Response:
    svc, name = _svc(request), _node(request)
    await Body.read(request, frozenset())
    await svc.set_node_state(name, "cordoned", allowed_from=("active", "cordoned"))
    return _ok(await _node_entry(svc, name))


@routes.post("/v1/nodes/{name}/uncordon")
async def node_uncordon(request: web.Request) -> web.Response:
    svc, name = _svc(request), _node(request)
    await Body.read(request, frozenset())
    await svc.set_node_state(
        name, "active", allowed_from=("active", "cordoned", "draining", "drained")
    )
    return _ok(await _node_entry(svc, name))


@routes.post("/v1/nodes/{name}/drain")
async def node_drain(request: web.Request) -> web.Response:
    svc, name = _svc(request), _node(request)
    body = await Body.read(request, frozenset({"force", "dry_run"}))
    force, dry_run = body.boolean("force", False), body.boolean("dry_run", False)
    if dry_run:
        _, plan = await drain.make_plan(svc, name)
        bandwidth = min(
            (n.rebuild_bandwidth for n in await svc.nodes() if n.rebuild_bandwidth), default=0
        )
        return _ok(plan.to_dict(bandwidth))
    op, _ = await drain.start(svc, name, force=force)
    # Accepted, not done: the leader's drain controller carries it out; GET follows it.
    return _ok(_drain_view(await svc.find_node(name), op), status=202)


def _drain_view(node: NodeRecord, op: DrainOp) -> dict[str, Any]:
    # The op stores the node's id; callers address nodes by name, so both are given.
    return {**op.to_dict(), "node": node.name, "node_id": op.node}


@routes.get("/v1/nodes/{name}/drain")
async def node_drain_status(request: web.Request) -> web.Response:
    svc, name = _svc(request), _node(request)
    node = await svc.find_node(name)
    op = await drain.status(svc, node)
    if op is None:
        raise web.HTTPNotFound(text=f"node {node.name} has no drain")
    return _ok(_drain_view(node, op))


# --- volumes


@routes.get("/v1/volumes")
async def volume_list(request: web.Request) -> web.Response:
    svc = _svc(request)
    return _ok([await svc.inspect(v) for v in await svc.volumes()])


@routes.post("/v1/volumes")
async def volume_create(request: web.Request) -> web.Response:
    svc = _svc(request)
    body = await Body.read(request, frozenset({"name", "size", "repl", "sync_writes"}))
    view = await svc.create_volume(
        body.volume_name("name"),
        body.size("size", maximum=inputs.MAX_VOLUME_SIZE),
        body.integer("repl", 1, low=1, high=MAX_REPL),
        sync_writes=body.boolean("sync_writes", False),
    )
    return _ok(await svc.inspect(view), status=201)


@routes.get("/v1/volumes/{name}")
async def volume_inspect(request: web.Request) -> web.Response:
    svc = _svc(request)
    return _ok(await svc.inspect(await svc.volume(_volume(request))))


@routes.delete("/v1/volumes/{name}")
async def volume_delete(request: web.Request) -> web.Response:
    name = _volume(request)
    await _svc(request).delete_volume(name)
    return _ok({"name": name, "deleted": True})


@routes.patch("/v1/volumes/{name}")
async def volume_update(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"iops_limit", "bw_limit"}))
    iops = body.optional_limit("iops_limit", high=inputs.MAX_IOPS)
    bw = body.optional_rate("bw_limit", maximum=inputs.MAX_BANDWIDTH)
    if iops is None and bw is None:
        raise InvalidArgument("nothing to update: give iops_limit and/or bw_limit")
    return _ok(await svc.inspect(await svc.set_limits(name, iops, bw)))


@routes.post("/v1/volumes/{name}/resize")
async def volume_resize(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"size"}))
    size = body.size("size", maximum=inputs.MAX_VOLUME_SIZE)
    return _ok(await svc.inspect(await svc.resize(name, size)))


@routes.post("/v1/volumes/{name}/attach")
async def volume_attach(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"node", "wait", "timeout"}))
    node_name = body.node_name("node", required=True)
    assert node_name is not None
    wait = body.boolean("wait", False)
    timeout = body.number("timeout", 30.0, low=0.1, high=MAX_WAIT)
    target = await svc.find_node(node_name)
    view = await svc.attach(name, node_name)
    if wait:
        view = await svc.wait_attached(name, target.id, timeout)
    return _ok(await svc.inspect(view))


@routes.post("/v1/volumes/{name}/detach")
async def volume_detach(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"wait", "timeout"}))
    wait = body.boolean("wait", True)
    timeout = body.number("timeout", 30.0, low=0.1, high=MAX_WAIT)
    view = await svc.detach(name)
    if wait:
        view = await svc.wait_detached(name, timeout)
    return _ok(await svc.inspect(view))


@routes.post("/v1/volumes/{name}/failover")
async def volume_failover(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"to", "drill", "wait", "timeout"}))
    to = body.node_name("to", required=False)
    drill = body.boolean("drill", False)
    wait = body.boolean("wait", True)
    timeout = body.number("timeout", 60.0, low=0.1, high=MAX_WAIT)
    dest = await svc.failover(name, to, drill=drill)
    view = await svc.wait_attached(name, dest.id, timeout) if wait else await svc.volume(name)
    return _ok(await svc.inspect(view))


# --- snapshots, clones, reverts, scrub (what `volume snapshot ...`, `volume clone`,
# `volume revert` and `volume scrub` call)


@routes.get("/v1/volumes/{name}/snapshots")
async def snapshot_list(request: web.Request) -> web.Response:
    return _ok(await snapshots.list_snapshots(_svc(request), _volume(request)))


@routes.post("/v1/volumes/{name}/snapshots")
async def snapshot_create(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"name"}))
    return _ok(await snapshots.create(svc, name, body.snapshot_name("name")), status=201)


@routes.delete("/v1/volumes/{name}/snapshots/{snap}")
async def snapshot_delete(request: web.Request) -> web.Response:
    name, snap = _volume(request), _snapshot(request)
    await snapshots.delete(_svc(request), name, snap)
    return _ok({"volume": name, "snapshot": snap, "deleted": True})


@routes.post("/v1/volumes/{name}/revert")
async def volume_revert(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"snapshot"}))
    await snapshots.revert(svc, name, body.snapshot_name("snapshot"))
    return _ok(await svc.inspect(await svc.volume(name)))


@routes.post("/v1/volumes/{name}/clone")
async def volume_clone(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"snapshot", "name", "repl"}))
    snap, new = body.snapshot_name("snapshot"), body.volume_name("name")
    repl = body.optional_integer("repl", low=0, high=MAX_REPL)
    if repl is not None and repl < 1:
        # transfer.clone takes a falsy repl as "the source's": say so rather than guess.
        raise InvalidArgument(f"invalid repl {repl}: must be 1, 2 or 3 (omit it: the source's)")
    return _ok(await transfer.clone(svc, name, snap, new, repl), status=201)


@routes.post("/v1/volumes/{name}/scrub")
async def volume_scrub(request: web.Request) -> web.Response:
    svc, name = _svc(request), _volume(request)
    body = await Body.read(request, frozenset({"timeout"}))
    timeout = body.number("timeout", MAX_WAIT, low=0.1, high=MAX_WAIT)
    # A report listing unrepairable chunks is still a report (the CLI prints it, then exits 1).
    return _ok(await snapshots.scrub(svc, name, timeout=timeout))
