"""The REST API's guards that need no cluster: listen address and exposure rules, token
files, JSON parsing limits, and the header and body timeouts against a slow client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from pxcluster.api import access, body
from pxcluster.api.app import serve
from pxcluster.api.middleware import errors
from pxcluster.errors import InvalidArgument
from tests.harness.etcd import free_port


def test_listen_address_defaults_to_loopback() -> None:
    assert access.listen_address("127.0.3.4", "") == "127.0.3.4"
    assert access.listen_address("::1", "") == "::1"
    assert access.listen_address("10.0.0.5", "") == "127.0.0.1"
    assert access.listen_address("10.0.0.5", "0.0.0.0") == "0.0.0.0"
    with pytest.raises(access.ApiAccessError, match="--api-address"):
        access.listen_address("127.0.0.1", "api.example.com")


def test_off_loopback_needs_the_admin_token_or_insecure() -> None:
    admin, read = access.Tokens(admin="a"), access.Tokens(read="r")
    access.check_exposure("127.0.0.1", access.Tokens(), False)
    access.check_exposure("10.0.0.5", admin, False)
    access.check_exposure("10.0.0.5", access.Tokens(), True)
    for tokens in (access.Tokens(), read):
        with pytest.raises(access.ApiAccessError, match="--api-insecure"):
            access.check_exposure("0.0.0.0", tokens, False)


def test_token_files(tmp_path: Path) -> None:
    f = tmp_path / "t"
    assert access.read_token_file("", "--x") is None
    f.write_text("  tok-1\n")
    assert access.read_token_file(str(f), "--x") == "tok-1"
    for content, message in [
        (b"", "is empty"),
        (b" \n\t", "is empty"),
        (b"two words", "one word"),
        (b"t\x00k", "one word"),
        (b"\xc3\xa9t\xc3\xa9", "ASCII"),
        (b"x" * 5000, "over 4096"),
    ]:
        f.write_bytes(content)
        with pytest.raises(access.ApiAccessError, match=message):
            access.read_token_file(str(f), "--x")
    f.write_text("same")
    with pytest.raises(access.ApiAccessError, match="must differ"):
        access.read_tokens(str(f), str(f))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"a": NaN}', "finite"),
        (b'{"a": -Infinity}', "finite"),
        (b'{"a": ' + b"1" * 21 + b"}", "digits"),
        (b'{"a": -' + b"1" * 4400 + b"}", "digits"),
        (b"{", "not valid JSON"),
    ],
)
def test_json_limits(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        body.parse_json(raw)


def test_json_within_limits() -> None:
    assert body.parse_json(b'{"a": -12345678901234567890, "b": 1e300}') == {
        "a": -12345678901234567890,
        "b": 1e300,
    }


async def echo(request: web.Request) -> web.Response:
    got = await body.Body.read(request, frozenset({"a"}))
    return web.json_response({"a": got.integer("a", 0, low=0, high=10)})


async def test_a_slow_body_is_408_and_slow_headers_are_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(body, "BODY_TIMEOUT", 0.3)
    app = web.Application(middlewares=[errors])
    app.router.add_post("/echo", echo)
    port = free_port()
    runner = await serve(app, "127.0.0.1", port, header_timeout=0.5)
    try:
        # A body promised and never sent: answered, not held forever.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert b" 408 " in status_line, status_line
        writer.close()
        # Headers trickled in: the connection is closed at the header timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)
        assert b" 200 " not in rest
        writer.close()
        # A prompt client is served.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b'POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{"a": 7}')
        await writer.drain()
        assert b" 200 " in await asyncio.wait_for(reader.readline(), 5)
        writer.close()
    finally:
        await runner.cleanup()
