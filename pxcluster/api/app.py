"""Builds the aiohttp application a node serves on its API port.

`NodeView` is all the API sees of the node daemon, so the API can grow without the daemon's
wiring changing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from membership.etcd import Etcd
from pxcluster import console
from pxcluster.api import middleware, openapi
from pxcluster.api.access import Tokens
from pxcluster.api.body import MAX_BODY
from pxcluster.api.routes import SERVICE, routes
from pxcluster.node.metrics import Metrics
from pxcluster.service.core import Service


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


# s a connection may take to send a request's line and headers (and may idle between
# requests): aiohttp's keep-alive timer runs from the connection's start, so it also closes a
# client that trickles its headers to hold connections open.
HEADER_TIMEOUT = 15.0


@dataclass(frozen=True)
class ApiConfig:
    token: str | None = None  # admin bearer token: every call (when any token is set)
    read_token: str | None = None  # read-only bearer token: GET and HEAD

    @property
    def tokens(self) -> Tokens:
        return Tokens(self.token or None, self.read_token or None)


def build_app(node: NodeView, config: ApiConfig) -> web.Application:
    mws: list[Middleware] = [middleware.errors]
    if config.tokens.any:
        mws.append(middleware.bearer_auth(config.tokens))
    app = web.Application(middlewares=mws, client_max_size=MAX_BODY)
    app[SERVICE] = Service(node.etcd, node.cluster)
    document = openapi.document()

    async def healthz(_: web.Request) -> web.Response:
        # Answered without a token: it names nothing.
        return web.json_response({"ok": True})

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
    console.install(app, node, config.tokens)  # the web console at /, behind the same tokens
    return app


async def serve(
    app: web.Application, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT
) -> web.AppRunner:
    """Listen on host:port; the caller cleans the runner up."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
