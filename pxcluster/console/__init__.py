"""The web console: the cluster at a glance and the everyday actions, in a browser, served by
every node on its API port at `/` (docs/CONSOLE.md).

`install` adds it to the API app: its routes, its gate (a middleware that runs just before
the API's bearer check, for console routes only) and its background helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from pxcluster.api import middleware
from pxcluster.api.access import Tokens
from pxcluster.console import actions, views
from pxcluster.console.backups import BackupLister
from pxcluster.console.context import CONSOLE, Console
from pxcluster.console.gate import Gate
from pxcluster.console.latency import LatencyHistory
from pxcluster.console.live import Hub
from pxcluster.service.core import Service

if TYPE_CHECKING:
    from pxcluster.api.app import NodeView


def install(app: web.Application, node: NodeView, tokens: Tokens) -> None:
    gate, svc = Gate(tokens), Service(node.etcd, node.cluster)
    console = Console(
        node=node,
        svc=svc,
        gate=gate,
        hub=Hub(node.etcd, svc.keys),
        latency=LatencyHistory(node.metrics),
        backups=BackupLister(),
    )
    app[CONSOLE] = console
    # Right after the error middleware, so the gate runs before the bearer check it feeds.
    mws = list(app.middlewares)
    at = mws.index(middleware.errors) + 1 if middleware.errors in mws else 0
    app.middlewares.insert(at, gate.middleware())
    app.router.add_routes(views.routes)
    app.router.add_routes(actions.routes)

    async def start(_: web.Application) -> None:
        console.latency.start()

    async def shutdown(_: web.Application) -> None:
        console.hub.close_streams()

    async def stop(_: web.Application) -> None:
        await console.hub.stop()
        await console.latency.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(stop)
