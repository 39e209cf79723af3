"""Middlewares every API response goes through: typed errors become JSON with the right
status, anything unexpected a logged 500, and mutating calls need the bearer token if set."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from membership.etcd import EtcdUnavailable
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
from pxcluster.snapshots import SnapshotFailed, UnknownSnapshot

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Most specific first: the first isinstance match wins.
STATUS: tuple[tuple[type[Exception], int], ...] = (
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


def bearer_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in MUTATING:
            given = request.headers.get("Authorization", "").encode()
            # Constant-time: the comparison must not leak how much of the token matched.
            if not hmac.compare_digest(given, expected):
                resp = error(401, "this call needs 'Authorization: Bearer <token>'")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="pxcluster"'
                return resp
        return await handler(request)

    return auth
