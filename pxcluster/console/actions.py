"""The console's actions (form POSTs). Each form becomes the JSON body the matching /v1
route takes, checked by the same `Body` methods with the same bounds, then the same service
call: a value the API refuses, the console refuses with the same message. Every action ends
in a redirect to the page it came from (POST/redirect/GET) or an error page."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from membership.etcd import EtcdUnavailable
from pxcluster import inputs
from pxcluster.api.body import Body
from pxcluster.api.routes import MAX_REPL
from pxcluster.backup.format import is_valid_id
from pxcluster.console import backups
from pxcluster.console.context import CONSOLE
from pxcluster.console.gate import CSRF_FIELD
from pxcluster.console.render import redirect
from pxcluster.console.views import failed
from pxcluster.errors import InvalidArgument, PxcError
from pxcluster.service import drain, snapshots, transfer
from pxcluster.service.core import Service
from pxcluster.units import format_size

routes = web.RouteTableDef()

SCRUB_TIMEOUT = 120.0  # s a browser waits for a scrub's report
MAX_TARGET_URL = 1024
_INTEGER = re.compile(r"-?\d{1,20}")
# Form fields that the API takes as JSON integers or booleans; every other field is a string,
# as the API takes it (sizes and rates may be strings like 10G there too).
_INTEGERS = frozenset({"repl", "iops_limit"})
_BOOLEANS = frozenset({"sync_writes", "drill", "force"})


async def form_body(request: web.Request, allowed: frozenset[str]) -> Body:
    """The form as the API's JSON body: an empty field is an absent one, a checkbox a
    boolean, a number field an integer when it is one (else left a string, so `Body` refuses
    it by name as it refuses {"repl": "x"})."""
    form = await request.post()
    fields: dict[str, Any] = {}
    for key in form:
        if key == CSRF_FIELD:
            continue
        value = form.get(key)
        if not isinstance(value, str):
            raise InvalidArgument(f"field {inputs.shown(key)} must be text, not a file")
        if key in _BOOLEANS:
            fields[key] = value in ("on", "true", "1")
        elif value.strip() == "":
            continue
        elif key in _INTEGERS and _INTEGER.fullmatch(value.strip()):
            fields[key] = int(value.strip())
        else:
            fields[key] = value.strip()
    unknown = sorted(set(fields) - allowed)
    if unknown:
        # Worded as Body.read words it for a JSON body.
        raise InvalidArgument(
            f"unknown field(s) {', '.join(_field(k) for k in unknown[:5])}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return Body(fields)


def _field(key: str) -> str:
    return key if len(key) <= 60 and key.isprintable() else inputs.shown(key)


Action = Callable[[web.Request, Service], Awaitable[tuple[str, str]]]


def action(path: str, what: str) -> Callable[[Action], Action]:
    """Register a POST that runs `fn` and redirects where it says, or shows why it failed."""

    def register(fn: Action) -> Action:
        async def handler(request: web.Request) -> web.Response:
            try:
                location, message = await fn(request, request.app[CONSOLE].svc)
            except (PxcError, EtcdUnavailable) as e:
                return await failed(request, e, what)
            return redirect(location, message)

        routes.post(path, name=f"console.{fn.__name__}")(handler)
        return fn

    return register


def _volume(request: web.Request) -> str:
    return inputs.volume_name(request.match_info["name"])


def _node(request: web.Request) -> str:
    return inputs.node_name(request.match_info["name"])


# --- nodes


@action("/nodes/{name}/cordon", "cordon the node")
async def node_cordon(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _node(request)
    await form_body(request, frozenset())
    await svc.set_node_state(name, "cordoned", allowed_from=("active", "cordoned"))
    return "/nodes", f"node {name} cordoned: no new replicas or attachments land there"


@action("/nodes/{name}/uncordon", "uncordon the node")
async def node_uncordon(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _node(request)
    await form_body(request, frozenset())
    await svc.set_node_state(
        name, "active", allowed_from=("active", "cordoned", "draining", "drained")
    )
    return "/nodes", f"node {name} is active again"


@action("/nodes/{name}/drain", "drain the node")
async def node_drain(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _node(request)
    body = await form_body(request, frozenset({"force"}))
    op, _ = await drain.start(svc, name, force=body.boolean("force", False))
    return "/nodes", f"drain of {name} started: {op.replicas_total} replica(s) to move"


# --- volumes


@action("/volumes", "create the volume")
async def volume_create(request: web.Request, svc: Service) -> tuple[str, str]:
    body = await form_body(request, frozenset({"name", "size", "repl", "sync_writes"}))
    view = await svc.create_volume(
        body.volume_name("name"),
        body.size("size", maximum=inputs.MAX_VOLUME_SIZE),
        body.integer("repl", 1, low=1, high=MAX_REPL),
        sync_writes=body.boolean("sync_writes", False),
    )
    return f"/volumes/{view.record.name}", f"volume {view.record.name} created"


@action("/volumes/{name}/delete", "delete the volume")
async def volume_delete(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    await form_body(request, frozenset())
    await svc.delete_volume(name)
    return "/volumes", f"volume {name} deleted"


@action("/volumes/{name}/attach", "attach the volume")
async def volume_attach(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"node"}))
    node = body.node_name("node", required=True)
    assert node is not None
    await svc.attach(name, node)
    return f"/volumes/{name}", f"volume {name} attaching on {node}"


@action("/volumes/{name}/detach", "detach the volume")
async def volume_detach(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    await form_body(request, frozenset())
    await svc.detach(name)
    return f"/volumes/{name}", f"volume {name} detaching"


@action("/volumes/{name}/resize", "resize the volume")
async def volume_resize(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"size"}))
    view = await svc.resize(name, body.size("size", maximum=inputs.MAX_VOLUME_SIZE))
    return f"/volumes/{name}", f"volume {name} is now {view.record.size} bytes"


@action("/volumes/{name}/update", "update the volume's limits")
async def volume_update(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"iops_limit", "bw_limit"}))
    iops = body.optional_limit("iops_limit", high=inputs.MAX_IOPS)
    bw = body.optional_rate("bw_limit", maximum=inputs.MAX_BANDWIDTH)
    if iops is None and bw is None:
        raise InvalidArgument("nothing to update: give iops_limit and/or bw_limit")
    await svc.set_limits(name, iops, bw)
    return f"/volumes/{name}", f"limits of {name} updated"


@action("/volumes/{name}/failover", "fail the volume over")
async def volume_failover(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"to", "drill"}))
    drill = body.boolean("drill", False)
    dest = await svc.failover(name, body.node_name("to", required=False), drill=drill)
    # Not waited for: the page follows the move live, phase by phase.
    kind = "failover drill" if drill else "failover"
    return f"/volumes/{name}", f"{kind} of {name} to {dest.name} started"


@action("/volumes/{name}/scrub", "scrub the volume")
async def volume_scrub(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    await form_body(request, frozenset())
    report = await snapshots.scrub(svc, name, timeout=SCRUB_TIMEOUT)
    return f"/volumes/{name}", (
        f"scrub of {name}: {report['chunks']} chunks, {len(report['repaired'])} repaired, "
        f"{len(report['unrepairable'])} unrepairable"
    )


@action("/volumes/{name}/snapshots", "take the snapshot")
async def snapshot_create(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"name"}))
    snap = await snapshots.create(svc, name, body.snapshot_name("name"))
    return f"/volumes/{name}", f"snapshot {snap['name']} of {name} taken"


@action("/volumes/{name}/snapshots/{snap}/delete", "delete the snapshot")
async def snapshot_delete(request: web.Request, svc: Service) -> tuple[str, str]:
    name, snap = _volume(request), inputs.snapshot_name(request.match_info["snap"])
    await form_body(request, frozenset())
    await snapshots.delete(svc, name, snap)
    return f"/volumes/{name}", f"snapshot {snap} of {name} deleted"


@action("/volumes/{name}/revert", "revert the volume")
async def volume_revert(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"snapshot"}))
    snap = body.snapshot_name("snapshot")
    await snapshots.revert(svc, name, snap)
    return f"/volumes/{name}", f"volume {name} reverted to {snap}"


@action("/volumes/{name}/clone", "clone the snapshot")
async def volume_clone(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"snapshot", "name", "repl"}))
    snap, new = body.snapshot_name("snapshot"), body.volume_name("name")
    repl = body.optional_integer("repl", low=0, high=MAX_REPL)
    if repl is not None and repl < 1:
        raise InvalidArgument(f"invalid repl {repl}: must be 1, 2 or 3 (omit it: the source's)")
    await transfer.clone(svc, name, snap, new, repl)
    return f"/volumes/{new}", f"volume {new} cloned from {name}@{snap}"


# --- backups (at the volume's backup target, see console/backups.py)


@action("/volumes/{name}/backup-target", "set the backup target")
async def volume_backup_target(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"target"}))
    url = body.string("target") or ""
    if len(url) > MAX_TARGET_URL:
        raise InvalidArgument(f"a backup target URL has at most {MAX_TARGET_URL} characters")
    view = await svc.set_schedules(name, None, None, url)
    request.app[CONSOLE].backups.forget(view)
    return f"/volumes/{name}", (
        f"backups of {name} go to {url}" if url else f"{name} has no backup target now"
    )


@action("/volumes/{name}/backups", "back up the volume")
async def volume_backup(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    await form_body(request, frozenset())
    c = request.app[CONSOLE]
    view = await svc.volume(name)
    result = await backups.back_up_now(svc, view)
    c.backups.forget(view)
    return f"/volumes/{name}", (
        f"backup {result.id} of {name} done: {format_size(result.bytes_uploaded)} uploaded "
        f"in {result.seconds:.1f}s"
    )


@action("/volumes/{name}/restore", "restore the backup")
async def volume_restore(request: web.Request, svc: Service) -> tuple[str, str]:
    name = _volume(request)
    body = await form_body(request, frozenset({"backup", "name"}))
    backup_id = body.required_string("backup")
    if not is_valid_id(backup_id):
        raise InvalidArgument(f"invalid backup id {inputs.shown(backup_id)}")
    new = body.volume_name("name")
    result = await backups.restore_into(svc, await svc.volume(name), backup_id, new)
    return f"/volumes/{new}", (
        f"backup {backup_id} restored into volume {new}: "
        f"{format_size(result.bytes_written)} written in {result.seconds:.1f}s"
    )
