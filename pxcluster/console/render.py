"""Pages are Jinja templates rendered on the server: the first paint holds every name and
number, so the console works (and is tested) without JavaScript; console.js only swaps in
fresh copies of the live parts."""

from __future__ import annotations

import datetime
import time
from typing import Any
from urllib.parse import quote, unquote

import jinja2
from aiohttp import web

from pxcluster.console.context import CONSOLE
from pxcluster.console.gate import CSRF, CSRF_FIELD, ROLE
from pxcluster.units import format_size

FLASH_COOKIE = "pxc_flash"
MAX_FLASH = 300  # characters: a message, not a page


def _size(n: Any) -> str:
    return format_size(int(n)) if isinstance(n, int) and n > 0 else "0"


def _rate(n: Any) -> str:
    return f"{format_size(int(n))}/s" if isinstance(n, int) and n > 0 else "unlimited"


def _pct(done: Any, total: Any) -> float:
    if not isinstance(total, int | float) or total <= 0 or not isinstance(done, int | float):
        return 0.0
    return max(0.0, min(100.0, 100.0 * done / total))


def _when(t: Any) -> str:
    if not isinstance(t, int | float) or t <= 0:
        return "-"
    stamp = datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    ago = max(0.0, time.time() - t)
    if ago < 120:
        return f"{stamp} ({ago:.0f}s ago)"
    if ago < 7200:
        return f"{stamp} ({ago / 60:.0f}m ago)"
    return stamp


def _secs(s: Any) -> str:
    if not isinstance(s, int | float):
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("pxcluster.console", "templates"),
    autoescape=True,  # every name on a page came from etcd or a form: escaped, always
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(size=_size, rate=_rate, when=_when, secs=_secs)
_env.globals.update(pct=_pct, CSRF_FIELD=CSRF_FIELD)


def page(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    c = request.app[CONSOLE]
    role = request.get(ROLE, "")
    flash = unquote(request.cookies.get(FLASH_COOKIE, ""))[:MAX_FLASH]
    html = _env.get_template(template).render(
        **({"title": "pxcluster"} | context),
        node_name=c.node.name,
        cluster=c.node.cluster,
        role=role,
        can_act=role == "admin",
        csrf=request.get(CSRF, ""),
        flash=flash,
        path=request.path,
    )
    response = web.Response(text=html, content_type="text/html", status=status)
    if flash:
        response.del_cookie(FLASH_COOKIE, path="/")
    return response


def redirect(location: str, message: str = "") -> web.Response:
    """After an action: back to a page (POST/redirect/GET), with a one-time message."""
    response = web.Response(status=303, headers={"Location": location})
    if message:
        response.set_cookie(
            FLASH_COOKIE, quote(message[:MAX_FLASH]), httponly=True, samesite="Strict", path="/"
        )
    return response


def fragment(template: str, context: dict[str, Any]) -> str:
    return _env.get_template(template).render(**context)
