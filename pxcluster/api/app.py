"""Builds the aiohttp application a node serves on its API port.

`NodeView` is all the API sees of the node daemon, so the API can grow without the daemon's
wiring changing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from membership.etcd import Etcd
from pxcluster.api import middleware, openapi
from pxcluster.api.routes import SERVICE, routes
from pxcluster.metrics import Metrics
from pxcluster.service import Service


class NodeView(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def cluster(self) -> str: ...

    @property
    def etcd(self) -> Etcd: ...

    @property
    def metrics(self) -> Metrics: ...

    def lease_healthy(self) -> bool: ...

    def refresh_metrics(self) -> None:
        """Update gauges read at scrape time (capacity, lease health)."""
        ...


@dataclass(frozen=True)
class ApiConfig:
    token: str | None = None  # bearer token required for mutating calls, when set


def build_app(node: NodeView, config: ApiConfig) -> web.Application:
    mws: list[Middleware] = [middleware.errors]
    if config.token:
        mws.append(middleware.bearer_auth(config.token))
    app = web.Application(middlewares=mws)
    app[SERVICE] = Service(node.etcd, node.cluster)
    document = openapi.document()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": node.name})

    async def readyz(_: web.Request) -> web.Response:
        ok = node.lease_healthy()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        node.refresh_metrics()
        return web.Response(body=node.metrics.render(), content_type="text/plain", charset="utf-8")

    async def openapi_json(_: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/metrics", metrics, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/v1/openapi.json", openapi_json, allow_head=False)
    app.router.add_routes(routes)
    return app
