"""The console from outside, over HTTP: what a browser without a session, with the read
token, from another site, or with bad form values gets. The app runs over a real etcd with
node records written into it (tests/unit/api/api_support.py), so every check ends in the real
service layer."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.harness.etcd import EtcdServer
from tests.unit.api.api_support import READ_TOKEN, TOKEN, Api, open_api

CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


@pytest_asyncio.fixture
async def auth(etcd: EtcdServer) -> AsyncIterator[Api]:
    async for a in open_api(etcd, TOKEN, READ_TOKEN):
        await a.add_node("n1")
        yield a


@pytest_asyncio.fixture
async def open_console(etcd: EtcdServer) -> AsyncIterator[Api]:
    async for a in open_api(etcd, None):
        await a.add_node("n1")
        yield a


async def get(a: Api, path: str, **kw: Any) -> tuple[int, str, Any]:
    resp = await a.client.get(path, allow_redirects=False, **kw)
    return resp.status, await resp.text(), resp


async def post(a: Api, path: str, data: dict[str, str], **kw: Any) -> tuple[int, str, Any]:
    resp = await a.client.post(path, data=data, allow_redirects=False, **kw)
    return resp.status, await resp.text(), resp


async def login(a: Api, token: str) -> str:
    """Log in; the CSRF token of the session."""
    status, _, resp = await post(a, "/login", {"token": token})
    assert status == 303, status
    assert resp.headers["Location"] == "/"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    status, body, _ = await get(a, "/volumes")
    assert status == 200
    found = CSRF.search(body)
    assert found, "the page carries no CSRF token"
    return found.group(1)


async def test_without_a_token_only_the_login_page(auth: Api) -> None:
    for path in ("/", "/nodes", "/volumes", "/volumes/x", "/nodes/n1/drain"):
        status, _, resp = await get(auth, path)
        assert status == 303 and resp.headers["Location"] == "/login", path
    status, body, _ = await get(auth, "/login")
    assert status == 200 and 'name="token"' in body
    assert "n1" not in body  # names nothing of the cluster
    status, _, _ = await get(auth, "/static/console.css")
    assert status == 200
    status, _, _ = await get(auth, "/events")
    assert status == 401
    status, _, _ = await get(auth, "/static/../app.py")
    assert status in (401, 404)
    for path in ("/volumes", "/nodes/n1/cordon"):
        status, _, _ = await post(auth, path, {"name": "v", "size": "1G"})
        assert status == 401, path
    status, body, _ = await post(auth, "/login", {"token": "wrong"})
    assert status == 401 and "not valid" in body
    assert (await auth.call("GET", "/v1/volumes", token=None))[0] == 401


async def test_pages_show_the_cluster_and_carry_security_headers(auth: Api) -> None:
    await login(auth, READ_TOKEN)
    await auth.call("POST", "/v1/volumes", {"name": "vol-a", "size": "1G"})
    for path, expect in (("/", "n1"), ("/nodes", "n1"), ("/volumes", "vol-a")):
        status, body, resp = await get(auth, path)
        assert status == 200 and expect in body, path
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"
    status, body, _ = await get(auth, "/volumes/vol-a")
    assert status == 200 and "vol-a" in body and "Replicas" in body
    status, body, _ = await get(auth, "/volumes/no-such")
    assert status == 404 and "unknown volume" in body


async def test_the_read_token_cannot_act(auth: Api) -> None:
    csrf = await login(auth, READ_TOKEN)
    _, body, _ = await get(auth, "/volumes")
    assert 'id="create-volume"' not in body  # no action forms for a reader
    status, _, _ = await post(auth, "/volumes", {"csrf": csrf, "name": "v1", "size": "1G"})
    assert status == 403
    status, _, _ = await post(auth, "/nodes/n1/cordon", {"csrf": csrf})
    assert status == 403
    assert (await auth.call("GET", "/v1/volumes"))[1] == []
    assert (await auth.call("GET", "/v1/nodes/n1"))[1]["state"] == "active"


async def test_admin_acts_with_a_csrf_token_from_this_console_only(auth: Api) -> None:
    csrf = await login(auth, TOKEN)
    form = {"name": "v1", "size": "1G", "repl": "1"}
    # No CSRF token, a wrong one, another site's Origin, a cross-site fetch: refused.
    assert (await post(auth, "/volumes", form))[0] == 403
    assert (await post(auth, "/volumes", form | {"csrf": "0" * 64}))[0] == 403
    evil = {"Origin": "http://evil.example"}
    assert (await post(auth, "/volumes", form | {"csrf": csrf}, headers=evil))[0] == 403
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert (await post(auth, "/volumes", form | {"csrf": csrf}, headers=cross))[0] == 403
    assert (await auth.call("GET", "/v1/volumes"))[1] == []
    # A login from another site is refused too.
    assert (await post(auth, "/login", {"token": TOKEN}, headers=evil))[0] == 403
    status, _, resp = await post(auth, "/volumes", form | {"csrf": csrf})
    assert status == 303 and resp.headers["Location"] == "/volumes/v1"
    assert [v["name"] for v in (await auth.call("GET", "/v1/volumes"))[1]] == ["v1"]
    status, _, _ = await post(auth, "/nodes/n1/cordon", {"csrf": csrf})
    assert status == 303
    assert (await auth.call("GET", "/v1/nodes/n1"))[1]["state"] == "cordoned"


async def test_the_session_cookie_does_not_open_the_rest_api(auth: Api) -> None:
    await login(auth, TOKEN)
    # The cookie is the console's: /v1 still wants the header (else any site could make a
    # browser call the API with it).
    status, _, _ = await get(auth, "/v1/volumes")
    assert status == 401


async def test_logout_forgets_the_session(auth: Api) -> None:
    csrf = await login(auth, TOKEN)
    status, _, _ = await post(auth, "/logout", {"csrf": csrf})
    assert status == 303
    status, _, resp = await get(auth, "/")
    assert status == 303 and resp.headers["Location"] == "/login"


# Each form value against the JSON body the API takes for it: the console must refuse the
# same values with the same message.
BAD_INPUTS: list[tuple[str, dict[str, str], str, str, dict[str, Any]]] = [
    (
        "/volumes",
        {"name": "Bad_Name", "size": "1G"},
        "POST",
        "/v1/volumes",
        {"name": "Bad_Name", "size": "1G"},
    ),
    (
        "/volumes",
        {"name": "v2", "size": "12X"},
        "POST",
        "/v1/volumes",
        {"name": "v2", "size": "12X"},
    ),
    ("/volumes", {"name": "v2", "size": "2P"}, "POST", "/v1/volumes", {"name": "v2", "size": "2P"}),
    (
        "/volumes",
        {"name": "v2", "size": "1G", "repl": "7"},
        "POST",
        "/v1/volumes",
        {"name": "v2", "size": "1G", "repl": 7},
    ),
    (
        "/volumes",
        {"name": "v2", "size": "1G", "repl": "x"},
        "POST",
        "/v1/volumes",
        {"name": "v2", "size": "1G", "repl": "x"},
    ),
    (
        "/volumes",
        {"name": "v2", "size": "1G", "colour": "red"},
        "POST",
        "/v1/volumes",
        {"name": "v2", "size": "1G", "colour": "red"},
    ),
    (
        "/volumes",
        {"name": "x" * 64, "size": "1G"},
        "POST",
        "/v1/volumes",
        {"name": "x" * 64, "size": "1G"},
    ),
    ("/volumes/v1/resize", {"size": "-5"}, "POST", "/v1/volumes/v1/resize", {"size": "-5"}),
    ("/volumes/v1/update", {"iops_limit": "-1"}, "PATCH", "/v1/volumes/v1", {"iops_limit": -1}),
    (
        "/volumes/v1/update",
        {"iops_limit": "99999999999"},
        "PATCH",
        "/v1/volumes/v1",
        {"iops_limit": 99999999999},
    ),
    ("/volumes/v1/update", {"bw_limit": "fast"}, "PATCH", "/v1/volumes/v1", {"bw_limit": "fast"}),
    ("/volumes/v1/update", {}, "PATCH", "/v1/volumes/v1", {}),
    (
        "/volumes/v1/snapshots",
        {"name": "../etc"},
        "POST",
        "/v1/volumes/v1/snapshots",
        {"name": "../etc"},
    ),
    ("/volumes/v1/attach", {"node": "NOPE!"}, "POST", "/v1/volumes/v1/attach", {"node": "NOPE!"}),
    (
        "/volumes/v1/clone",
        {"snapshot": "s", "name": "c", "repl": "0"},
        "POST",
        "/v1/volumes/v1/clone",
        {"snapshot": "s", "name": "c", "repl": 0},
    ),
    ("/volumes/UPPER/detach", {}, "POST", "/v1/volumes/UPPER/detach", {}),
    ("/nodes/bad_node/cordon", {}, "POST", "/v1/nodes/bad_node/cordon", {}),
]


@pytest.mark.parametrize("console_path,form,method,api_path,body", BAD_INPUTS)
async def test_bad_form_values_are_refused_as_the_api_refuses_them(
    auth: Api,
    console_path: str,
    form: dict[str, str],
    method: str,
    api_path: str,
    body: dict[str, Any],
) -> None:
    await auth.call("POST", "/v1/volumes", {"name": "v1", "size": "1G"})
    csrf = await login(auth, TOKEN)
    api_status, api_answer = await auth.call(method, api_path, body)
    status, page, _ = await post(auth, console_path, form | {"csrf": csrf})
    assert 400 <= api_status < 500, api_answer
    assert status == api_status, (status, page)
    assert api_answer["error"] in html.unescape(page), (api_answer, page)


async def test_an_open_node_has_an_open_console_but_still_wants_csrf(open_console: Api) -> None:
    status, body, _ = await get(open_console, "/")
    assert status == 200 and "n1" in body
    status, _, resp = await get(open_console, "/login")
    assert status == 303 and resp.headers["Location"] == "/"
    form = {"name": "v1", "size": "1G"}
    assert (await post(open_console, "/volumes", form))[0] == 403
    _, body, _ = await get(open_console, "/volumes")
    found = CSRF.search(body)
    assert found
    status, _, _ = await post(open_console, "/volumes", form | {"csrf": found.group(1)})
    assert status == 303
