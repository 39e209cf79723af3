"""The console's pages (GET): overview, nodes, volumes, a volume, a drain plan, the login
form, the live feed and the static files."""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from membership.etcd import EtcdUnavailable
from pxcluster import inputs
from pxcluster.api.middleware import status_for
from pxcluster.console import data, latency
from pxcluster.console.context import CONSOLE, Console
from pxcluster.console.render import page, redirect
from pxcluster.errors import PxcError
from pxcluster.service import drain, snapshots

routes = web.RouteTableDef()

MAX_QUERY = 63  # characters of the volume filter: a name is at most that


def _console(request: web.Request) -> Console:
    return request.app[CONSOLE]


async def failed(request: web.Request, e: Exception, what: str) -> web.Response:
    """A refused action or an unreadable cluster, as a page: the message the API would give,
    with its status."""
    status = status_for(e) or 500
    message = str(e) if isinstance(e, PxcError | EtcdUnavailable) else type(e).__name__
    return page(
        request, "error.html", {"title": "Error", "what": what, "message": message}, status=status
    )


def _common(c: Console, title: str) -> dict[str, Any]:
    return {"title": title}


@routes.get("/", name="console.overview")
async def overview(request: web.Request) -> web.Response:
    c = _console(request)
    try:
        view = await data.overview(c.svc)
    except (PxcError, EtcdUnavailable) as e:
        return await failed(request, e, "read the cluster's state")
    return page(request, "overview.html", _common(c, "Overview") | view)


@routes.get("/nodes", name="console.nodes")
async def nodes(request: web.Request) -> web.Response:
    c = _console(request)
    try:
        vols = await data.volumes(c.svc)
        rows = await data.nodes(c.svc, vols)
    except (PxcError, EtcdUnavailable) as e:
        return await failed(request, e, "read the nodes")
    return page(request, "nodes.html", _common(c, "Nodes") | {"nodes": rows})


@routes.get("/nodes/{name}/drain", name="console.drain_plan")
async def drain_plan(request: web.Request) -> web.Response:
    c = _console(request)
    try:
        name = inputs.node_name(request.match_info["name"])
        _, plan = await drain.make_plan(c.svc, name)
    except (PxcError, EtcdUnavailable) as e:
        return await failed(request, e, "plan the drain")
    bandwidth = min(
        (n.rebuild_bandwidth for n in await c.svc.nodes() if n.rebuild_bandwidth), default=0
    )
    return page(
        request,
        "drain.html",
        _common(c, f"Drain {name}") | {"node": name, "plan": plan.to_dict(bandwidth)},
    )


@routes.get("/volumes", name="console.volumes")
async def volumes(request: web.Request) -> web.Response:
    c = _console(request)
    q = request.query.get("q", "")[:MAX_QUERY]
    health = request.query.get("health", "")
    health = health if health in data.HEALTHS else ""
    sort = request.query.get("sort", "name")
    sort = sort if sort in data.SORT_KEYS else "name"
    desc = request.query.get("desc", "") == "1"
    try:
        vols = await data.volumes(c.svc)
        node_rows = await c.svc.node_list()
    except (PxcError, EtcdUnavailable) as e:
        return await failed(request, e, "read the volumes")
    rows = data.filter_sort(vols, q, health, sort, desc)
    return page(
        request,
        "volumes.html",
        _common(c, "Volumes")
        | {
            "volumes": rows,
            "total": len(vols),
            "q": q,
            "health": health,
            "healths": data.HEALTHS,
            "sort": sort,
            "desc": desc,
            "sort_keys": data.SORT_KEYS,
            "nodes": node_rows,
        },
    )


@routes.get("/volumes/{name}", name="console.volume")
async def volume(request: web.Request) -> web.Response:
    c = _console(request)
    try:
        name = inputs.volume_name(request.match_info["name"])
        view = await c.svc.volume(name)
        v = await c.svc.inspect(view)
        v["console_health"] = data.console_health(v)
        snaps = await snapshots.list_snapshots(c.svc, name)
        node_rows = await c.svc.node_list()
        backups = await c.backups.listing(view)
    except (PxcError, EtcdUnavailable) as e:
        return await failed(request, e, "read the volume")
    names = {n["id"]: n["name"] for n in node_rows}
    history = [
        {
            "from": names.get(f.source, f.source),
            "to": names.get(f.dest, f.dest),
            "kind": f.kind,
            "at": f.detected,
            "epoch": f.epoch,
            "reconciled_chunks": f.reconciled_chunks,
            "done": bool(f.serving),
            **f.timings(),
        }
        for f in c.hub.history(view.record.id)
    ]
    last = v["last_failover"]
    if last is not None and not any(h["at"] == last["at"] for h in history):
        history.append(last)
    history.sort(key=lambda h: h["at"] or 0, reverse=True)
    serving_here = v["attached_node"] == c.node.name
    chart = latency.chart(c.latency.series(name)) if serving_here else {"empty": True}
    serving_node = next((n for n in node_rows if n["name"] == v["attached_node"]), None)
    return page(
        request,
        "volume.html",
        _common(c, f"Volume {name}")
        | {
            "v": v,
            "snapshots": snaps,
            "backups": backups,
            "failovers": history,
            "timeline_max": max((h["serve_s"] or 0 for h in history), default=0) or 1,
            "chart": chart,
            "serving_here": serving_here,
            "serving_node": serving_node,
            "nodes": node_rows,
        },
    )


@routes.get("/login", name="console.login")
async def login_form(request: web.Request) -> web.Response:
    c = _console(request)
    if not c.gate.tokens.any:
        return redirect("/")  # no token configured: nothing to log in to
    return page(request, "login.html", _common(c, "Log in") | {"error": ""})


@routes.post("/login", name="console.login_post")
async def login(request: web.Request) -> web.Response:
    c = _console(request)
    form = await request.post()
    token = form.get("token")
    token = token.strip() if isinstance(token, str) else ""
    role = c.gate.role_of(token)
    if role is None:
        context = _common(c, "Log in") | {"error": "that token is not valid on this node"}
        return page(request, "login.html", context, status=401)
    response = redirect("/")
    if c.gate.tokens.any:
        c.gate.set_session(request, response, token)
    return response


@routes.post("/logout", name="console.logout")
async def logout(request: web.Request) -> web.Response:
    c = _console(request)
    response = redirect("/login" if c.gate.tokens.any else "/")
    c.gate.clear_session(request, response)
    return response


@routes.get("/events", name="console.events")
async def events(request: web.Request) -> web.StreamResponse:
    return await _console(request).hub.stream(request)


_STATIC = {
    "console.css": "text/css",
    "console.js": "text/javascript",
    "favicon.svg": "image/svg+xml",  # named by every page, so browsers ask for no favicon.ico
}
_static_cache: dict[str, bytes] = {}


@routes.get("/static/{file}", name="console.static")
async def static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    kind = _STATIC.get(name)
    if kind is None:  # only the files named above: no path is ever built from the request
        raise web.HTTPNotFound(text="no such file")
    body = _static_cache.get(name)
    if body is None:
        body = _static_cache[name] = (
            resources.files("pxcluster.console").joinpath("static", name).read_bytes()
        )
    return web.Response(
        body=body, content_type=kind, charset="utf-8", headers={"Cache-Control": "max-age=300"}
    )
