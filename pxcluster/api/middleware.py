"""Middlewares every API response goes through: typed errors become JSON with the right
status, anything unexpected a logged 500, and, when tokens are configured, every call but the
health probes needs one (the read token for reads, the admin token for everything)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from membership.etcd import EtcdUnavailable
from pxcluster.api.access import Tokens
from pxcluster.api.body import BodyTimeout
from pxcluster.errors import (
    DuplicateName,
    InvalidArgument,
    NodeBusy,
    OperationTimeout,
    PlacementError,
    PxcError,
    UnknownNode,
    UnknownVolume,
    VolumeBusy,
)
from pxcluster.service.snapshots import SnapshotFailed, UnknownSnapshot

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READS = frozenset({"GET", "HEAD"})
# Liveness and readiness probes answer without a token: they say nothing but ok / not ok,
# and load balancers and container runtimes call them without credentials.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

# Most specific first: the first isinstance match wins.
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (BodyTimeout, 408),
    (InvalidArgument, 400),
    (UnknownNode, 404),
    (UnknownVolume, 404),
    (UnknownSnapshot, 404),
    (DuplicateName, 409),
    (VolumeBusy, 409),
    (NodeBusy, 409),
    # The request is well formed; the cluster cannot satisfy it as it is now.
    (PlacementError, 409),
    # The engine or the replicas could not carry out a snapshot, revert, clone read or scrub:
    # the cluster's state, not the request, is at fault (the message says what happened).
    (SnapshotFailed, 409),
    (OperationTimeout, 504),
    (EtcdUnavailable, 503),
    (PxcError, 400),
)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def status_for(exc: Exception) -> int | None:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return None


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # aiohttp's own 404/405/413 carry text bodies; clients get JSON from every route.
        return error(e.status, e.text or e.reason)
    except Exception as e:
        status = status_for(e)
        if status is not None:
            return error(status, str(e))
        log.exception("%s %s failed", request.method, request.path)
        return error(500, f"internal error: {type(e).__name__}: {e}")


def _matches(given: bytes, expected: bytes | None) -> bool:
    # Constant-time: the comparison must not leak how much of the token matched.
    return expected is not None and hmac.compare_digest(given, expected)


def bearer_auth(tokens: Tokens) -> Middleware:
    admin = f"Bearer {tokens.admin}".encode() if tokens.admin else None
    read = f"Bearer {tokens.read}".encode() if tokens.read else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS and request.method in READS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        # Both compared every time: which token matched must not show in the timing either.
        is_admin, is_reader = _matches(given, admin), _matches(given, read)
        if not (is_admin or is_reader):
            resp = error(401, "this call needs 'Authorization: Bearer <token>'")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="pxcluster"'
            return resp
        if request.method not in READS and not is_admin:
            return error(403, "the read-only token cannot change anything: use the admin token")
        return await handler(request)

    return auth
