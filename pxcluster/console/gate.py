"""Who may see and use the console: the API's own tokens, carried by a session cookie.

A browser cannot send `Authorization: Bearer`, so `POST /login` puts the token in an
`HttpOnly`, `SameSite=Strict` cookie, and the gate turns that cookie back into the header
before the API's bearer check runs (pxcluster.api.middleware.bearer_auth): that check, not
this module, decides 401 and 403, for the console exactly as for the API. The gate adds what
a cookie needs on top: a CSRF token on every form that changes something (with an Origin
check), and a login page instead of a 401 for a browser without a session."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict

from pxcluster.api.access import MAX_TOKEN, Tokens

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Role = Literal["admin", "read"]

ROUTE_PREFIX = "console."  # every console route's name starts with it
OPEN_ROUTES = frozenset({"console.login", "console.login_post", "console.static"})
CSRF_FIELD = "csrf"
ROLE = web.RequestKey("console_role", str)
CSRF = web.RequestKey("console_csrf", str)
# Headers every console page carries: nothing from elsewhere runs in it, nothing frames it.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Gate:
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        # Per process: CSRF tokens die with it (a form from before a restart is refused once,
        # the page reloads with a fresh one). The session itself, the API token, survives.
        self._secret = secrets.token_bytes(32)

    @staticmethod
    def cookie_name(request: web.Request) -> str:
        # Cookies are not kept apart by port: two nodes on one host (a dev cluster) must not
        # overwrite each other's session.
        return f"pxc_session_{request.url.port or 0}"

    def role_of(self, token: str | None) -> Role | None:
        """What the console shows (action forms or not). The API's bearer check still decides
        every request; this only keeps forms a reader cannot use off its pages."""
        if not self.tokens.any:
            return "admin"
        if not token or len(token) > MAX_TOKEN:
            return None
        given = token.encode("utf-8", "replace")
        is_admin = _same(given, self.tokens.admin)
        is_read = _same(given, self.tokens.read)
        return "admin" if is_admin else "read" if is_read else None

    def csrf_token(self, session: str) -> str:
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    def session_of(self, request: web.Request) -> str:
        return request.cookies.get(self.cookie_name(request), "")

    def set_session(self, request: web.Request, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(
            self.cookie_name(request),
            token,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
        )

    def clear_session(self, request: web.Request, response: web.StreamResponse) -> None:
        response.del_cookie(self.cookie_name(request), path="/")

    def middleware(self) -> Middleware:
        @web.middleware
        async def console_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            route = request.match_info.route.name or ""
            if not route.startswith(ROUTE_PREFIX):
                return await handler(request)  # the API's own routes: untouched
            response = await self._gated(request, handler, route)
            response.headers.update(SECURITY_HEADERS)
            return response

        return console_gate

    async def _gated(
        self, request: web.Request, handler: Handler, route: str
    ) -> web.StreamResponse:
        changes = request.method not in ("GET", "HEAD")
        if changes and not same_origin(request):
            return forbidden("cross-site request refused (its Origin is not this console)")
        if route in OPEN_ROUTES:
            # The login form and the stylesheet and script: they name nothing, and a browser
            # without a session must reach them (as /healthz needs no token). Called directly,
            # past the bearer check.
            return await request.match_info.handler(request)
        header = request.headers.get("Authorization", "")
        session = self.session_of(request)
        if header:
            # A script's bearer token: no cookie, so no CSRF to fear (a cross-site page cannot
            # set this header without a CORS preflight, which is never granted).
            bearer = header.removeprefix("Bearer ")
            role, clone = self.role_of(bearer), request.clone()
            csrf = self.csrf_token(bearer)
        else:
            role = self.role_of(session)
            headers = CIMultiDict(request.headers)
            if session:
                headers["Authorization"] = f"Bearer {session}"
            clone = request.clone(headers=headers)
            csrf = self.csrf_token(session)
            if role is None:
                return self._login_needed(request)
            if changes:
                form = await clone.post()
                given = form.get(CSRF_FIELD)
                if not isinstance(given, str) or not hmac.compare_digest(given, csrf):
                    return forbidden(
                        "this form has expired or did not come from this console: reload the "
                        "page and try again"
                    )
        clone[ROLE] = role or ""
        clone[CSRF] = csrf
        # The API's bearer check runs next (when tokens are configured): a wrong token is a
        # 401, the read token on an action a 403, exactly as on /v1.
        response = await handler(clone)
        if response.status == 401 and not header:
            return self._login_needed(request)
        return response

    def _login_needed(self, request: web.Request) -> web.StreamResponse:
        if request.method in ("GET", "HEAD") and request.match_info.route.name != "console.events":
            response: web.StreamResponse = web.Response(status=303, headers={"Location": "/login"})
        else:
            response = web.Response(status=401, text="log in first: POST /login with the token")
        if self.session_of(request):
            self.clear_session(request, response)  # a stale or wrong token: forget it
        return response


def _same(given: bytes, expected: str | None) -> bool:
    # Constant-time, and both tokens compared every time, as the API's bearer check does.
    return expected is not None and hmac.compare_digest(given, expected.encode())


def same_origin(request: web.Request) -> bool:
    """A request that changes something must come from a page of this console. Browsers send
    Origin on every POST and Sec-Fetch-Site where they know it; a script sends neither (it
    then needs the token itself, or a CSRF token from a page it fetched)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


def forbidden(message: str) -> web.Response:
    return web.Response(status=403, text=message, content_type="text/plain")
