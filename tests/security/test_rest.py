"""A real node's REST port attacked from outside with real HTTP requests: missing, wrong and
read-only tokens, malformed, deep and oversized bodies, numbers no limit can hold, names that
are paths. Each attack gets a 4xx JSON answer; the node keeps serving and nothing changes."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.cluster import Cluster, NodeProc
from tests.harness.etcd import EtcdServer

ADMIN = "adm1n-t0ken-for-tests"
READ = "read-0nly-token-for-tests"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, NodeProc]]:
    """One node with an admin and a read-only token, shared by the module's tests."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (scripts/install.sh installs it)")
    tmp = tmp_path_factory.mktemp("rest")
    etcd = EtcdServer(tmp / "etcd")
    etcd.start()
    (tmp / "admin.token").write_text(ADMIN + "\n")
    (tmp / "read.token").write_text(READ + "\n")
    c = Cluster(tmp, etcd, name="sec")
    try:
        node = c.add_node(
            "n1",
            disk_size=256 << 20,
            extra=(
                "--api-token-file",
                str(tmp / "admin.token"),
                "--api-read-token-file",
                str(tmp / "read.token"),
            ),
        )
        yield c, node
    finally:
        c.close()
        etcd.stop()


async def call(
    node: NodeProc,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    url = f"http://{node.address}:{node.ports['api']}{path}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.request(method, url, data=data, headers=sent) as resp:
            text = await resp.read()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text.decode(errors="replace")


READS = ["/v1/cluster", "/v1/nodes", "/v1/nodes/n1", "/v1/volumes", "/v1/openapi.json", "/metrics"]
CHANGES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/volumes", {"name": "evil", "size": "1M"}),
    ("DELETE", "/v1/volumes/vol", None),
    ("PATCH", "/v1/volumes/vol", {"iops_limit": 1}),
    ("POST", "/v1/nodes/n1/cordon", None),
    ("DELETE", "/v1/nodes/n1", None),
]


async def volume(node: NodeProc) -> dict[str, Any]:
    status, vol = await call(node, "GET", "/v1/volumes/vol", token=READ)
    if status == 404:
        status, vol = await call(
            node, "POST", "/v1/volumes", token=ADMIN, body={"name": "vol", "size": "1M"}
        )
        assert status == 201, vol
    assert vol["name"] == "vol", vol
    return vol  # type: ignore[no-any-return]


async def test_no_token_or_a_wrong_one_gets_nothing(secured: tuple[Cluster, NodeProc]) -> None:
    _, node = secured
    await volume(node)
    wrong = [None, "", "nope", ADMIN[:-1], ADMIN + "x", READ.upper(), f"{ADMIN} {ADMIN}"]
    for token in wrong:
        for path in [*READS, "/v1/volumes/vol", "/v1/nothing-here"]:
            status, err = await call(node, "GET", path, token=token)
            assert status == 401 and "Bearer" in err["error"], (token, path, status, err)
            assert "vol" not in json.dumps(err) and "n1" not in json.dumps(err)
        for method, path, body in CHANGES:
            status, err = await call(node, method, path, token=token, body=body)
            assert status == 401, (token, method, path, status, err)
    for scheme in (f"Basic {ADMIN}", f"bearer{ADMIN}", ADMIN):
        status, _ = await call(node, "GET", "/v1/volumes", headers={"Authorization": scheme})
        assert status == 401, scheme
    # The probes stay open and name nothing.
    for path in ("/healthz", "/readyz"):
        status, answer = await call(node, "GET", path)
        assert status == 200 and "n1" not in json.dumps(answer), (path, answer)


async def test_the_read_token_reads_and_changes_nothing(
    secured: tuple[Cluster, NodeProc],
) -> None:
    c, node = secured
    before = await volume(node)
    for path in READS:
        status, _ = await call(node, "GET", path, token=READ)
        assert status == 200, path
    for method, path, body in CHANGES:
        status, err = await call(node, method, path, token=READ, body=body)
        assert status == 403 and "read-only" in err["error"], (method, path, status, err)
    status, after = await call(node, "GET", "/v1/volumes/vol", token=READ)
    assert status == 200 and after == before
    names = [v["name"] for v in c.cli_json("volume", "list")]
    assert names == ["vol"] and c.node_state("n1")["state"] == "active"


async def test_malformed_and_deep_bodies_are_400(secured: tuple[Cluster, NodeProc]) -> None:
    _, node = secured
    await volume(node)
    bodies = [
        b"[" * 30000 + b"]" * 30000,
        b'{"name": ' * 10000 + b"1" + b"}" * 10000,
        b"{not json",
        b'{"name": "x", "size": "1M"',
        b"\xff\xfe\x00garbage",
        b'{"name": "x", "size": NaN}',
        b'{"name": "x", "size": Infinity}',
        b"[1, 2]",
        b'"just a string"',
        b'{"name": "x", "size": "1M", "name2": {"deep": [[[[[]]]]]}}',
        b'{"name": ["x"], "size": "1M"}',
        b'{"name": "x", "size": {"$gt": 0}}',
    ]
    for raw in bodies:
        status, err = await call(node, "POST", "/v1/volumes", token=ADMIN, raw=raw)
        assert status == 400 and err["error"], (raw[:40], status, err)
    status, err = await call(node, "POST", "/v1/volumes", token=ADMIN, raw=b" " * (70 << 10))
    assert status in (400, 413) and err["error"], (status, err)
    status, err = await call(
        node,
        "POST",
        "/v1/volumes",
        token=ADMIN,
        raw=b'{"name": "x", "size": "' + b"1" * (70 << 10) + b'"}',
    )
    assert status in (400, 413), (status, err)
    status, listed = await call(node, "GET", "/v1/volumes", token=READ)
    assert status == 200 and [v["name"] for v in listed] == ["vol"]


async def test_huge_numbers_are_400_and_metrics_keep_working(
    secured: tuple[Cluster, NodeProc],
) -> None:
    _, node = secured
    before = await volume(node)
    huge = "1" + "0" * 400
    attacks: list[tuple[str, str, bytes]] = [
        ("PATCH", "/v1/volumes/vol", f'{{"iops_limit": {huge}}}'.encode()),
        ("PATCH", "/v1/volumes/vol", b'{"iops_limit": 1e75}'),
        ("PATCH", "/v1/volumes/vol", b'{"iops_limit": 1000000001}'),
        ("PATCH", "/v1/volumes/vol", b'{"iops_limit": -1}'),
        ("PATCH", "/v1/volumes/vol", f'{{"bw_limit": {huge}}}'.encode()),
        ("PATCH", "/v1/volumes/vol", b'{"bw_limit": 1e400}'),
        ("PATCH", "/v1/volumes/vol", b'{"bw_limit": "99999999999999999999P"}'),
        ("PATCH", "/v1/volumes/vol", b'{"iops_limit": ' + b"9" * 5000 + b"}"),
        ("POST", "/v1/volumes/vol/resize", f'{{"size": {huge}}}'.encode()),
        ("POST", "/v1/volumes/vol/resize", b'{"size": 10000000000000000000}'),
        ("POST", "/v1/volumes/vol/resize", b'{"size": "2P"}'),
        ("POST", "/v1/volumes", f'{{"name": "big", "size": "1M", "repl": {huge}}}'.encode()),
        ("POST", "/v1/volumes", b'{"name": "big", "size": 1e400}'),
        ("POST", "/v1/volumes/vol/attach", b'{"node": "n1", "timeout": 1e400}'),
        ("POST", "/v1/volumes/vol/attach", f'{{"node": "n1", "timeout": {huge}}}'.encode()),
        ("POST", "/v1/volumes/vol/attach", b'{"node": "n1", "timeout": -1e308}'),
        ("POST", "/v1/volumes/vol/clone", b'{"snapshot": "s", "name": "c", "repl": 1e400}'),
        ("POST", "/v1/volumes/vol/scrub", f'{{"timeout": {huge}}}'.encode()),
    ]
    for method, path, raw in attacks:
        status, err = await call(node, method, path, token=ADMIN, raw=raw)
        assert status == 400 and err["error"], (method, path, raw[:60], status, err)
        assert len(err["error"]) < 400, err
    status, after = await call(node, "GET", "/v1/volumes/vol", token=READ)
    assert status == 200 and after == before
    status, text = await call(node, "GET", "/metrics", token=READ)
    assert status == 200 and "pxc_" in text
    # The largest values taken are still rendered.
    status, vol = await call(
        node,
        "PATCH",
        "/v1/volumes/vol",
        token=ADMIN,
        body={"iops_limit": 10**9, "bw_limit": 1 << 50},
    )
    assert status == 200 and vol["iops_limit"] == 10**9, vol
    status, _ = await call(node, "GET", "/metrics", token=ADMIN)
    assert status == 200
    status, _ = await call(
        node, "PATCH", "/v1/volumes/vol", token=ADMIN, body={"iops_limit": 0, "bw_limit": 0}
    )
    assert status == 200


async def test_names_that_are_not_names_are_400(secured: tuple[Cluster, NodeProc]) -> None:
    _, node = secured
    await volume(node)
    for method, path, body in [
        ("POST", "/v1/volumes", {"name": "a" * 64, "size": "1M"}),
        ("POST", "/v1/volumes", {"name": "vol\n", "size": "1M"}),
        ("POST", "/v1/volumes", {"name": "Vol", "size": "1M"}),
        ("GET", "/v1/volumes/..%2F..%2Fetc", None),
        ("GET", "/v1/volumes/" + "v" * 5000, None),
        ("GET", "/v1/volumes/Bad_Name", None),
        ("POST", "/v1/volumes/vol/snapshots", {"name": "../../x"}),
        ("POST", "/v1/volumes/vol/snapshots", {"name": "s" * 64}),
        ("POST", "/v1/volumes/vol/attach", {"node": "n1/../n2"}),
        ("POST", "/v1/volumes/vol/clone", {"snapshot": "s", "name": "New"}),
        ("DELETE", "/v1/volumes/vol/snapshots/a%20b", None),
        ("GET", "/v1/nodes/N1", None),
    ]:
        status, err = await call(node, method, path, token=ADMIN, body=body)
        assert status == 400 and "invalid" in err["error"], (method, path[:40], status, err)
        assert len(err["error"]) < 400, err


def join(c: Cluster, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    disk = tmp / "j.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    cmd = [sys.executable, "-m", "pxcluster.cli", "--etcd", c.etcd.url, "--cluster", c.name]
    cmd += ["cluster", "join", "--name", "j1", "--address", "127.0.0.1", "--disk", str(disk)]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=30)


def refused(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and all(n in lines[0] for n in needles), lines


def test_join_refuses_empty_tokens_and_an_open_api_off_loopback(
    secured: tuple[Cluster, NodeProc], tmp_path: Path
) -> None:
    c, _ = secured
    empty, blank, token = tmp_path / "empty", tmp_path / "blank", tmp_path / "token"
    empty.write_bytes(b"")
    blank.write_text(" \n\n")
    token.write_text("some-token\n")
    refused(join(c, tmp_path, "--api-token-file", str(empty)), "--api-token-file", "empty")
    refused(join(c, tmp_path, "--api-token-file", str(blank)), "--api-token-file", "empty")
    refused(join(c, tmp_path, "--api-read-token-file", str(empty)), "empty")
    refused(join(c, tmp_path, "--api-address", "0.0.0.0"), "--api-token-file", "--api-insecure")
    refused(join(c, tmp_path, "--api-address", "::"), "--api-token-file")
    refused(
        join(c, tmp_path, "--api-address", "0.0.0.0", "--api-read-token-file", str(token)),
        "--api-token-file",
    )
    refused(join(c, tmp_path, "--address", "10.9.8.7", "--api-address", "10.9.8.7"), "off loopback")
    assert [n["name"] for n in c.cli_json("node", "list")] == ["n1"]  # nothing joined


def _junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.randrange(-(10**30), 10**30)
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if kind == 2:
        return "".join(rng.choice("aZ09-_./%\\\x00 é") for _ in range(rng.randrange(0, 80)))
    if kind == 3:
        return rng.choice(["1M", "10G", "0", "-1", "1e400", "999999999999999999999P", "nan"])
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5:
        return rng.choice([1, 2, 3, 4, 0, 2**63, -(2**63)])
    if kind == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(FIELDS): _junk(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


FIELDS = [
    "name",
    "size",
    "repl",
    "sync_writes",
    "node",
    "to",
    "iops_limit",
    "bw_limit",
    "snapshot",
    "snapshot_schedule",
    "timeout",
    "drill",
    "encrypted",
    "wait",
    "force",
]
FUZZ_ROUTES = [
    ("POST", "/v1/volumes"),
    ("PATCH", "/v1/volumes/fz"),
    ("POST", "/v1/volumes/fz/resize"),
    ("POST", "/v1/volumes/fz/attach"),
    ("POST", "/v1/volumes/fz/detach"),
    ("POST", "/v1/volumes/fz/snapshots"),
    ("POST", "/v1/volumes/fz/revert"),
    ("POST", "/v1/volumes/fz/clone"),
    ("POST", "/v1/volumes/nosuch/failover"),
    ("PATCH", "/v1/volumes/nosuch"),
]


async def test_two_thousand_fuzzed_bodies_get_answers_never_a_500(
    secured: tuple[Cluster, NodeProc],
) -> None:
    _, node = secured
    rng = random.Random(2128)
    status, _ = await call(
        node, "POST", "/v1/volumes", token=ADMIN, body={"name": "fz", "size": "1M"}
    )
    assert status in (201, 409)
    base = f"http://{node.address}:{node.ports['api']}"
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    seen: dict[int, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for i in range(2000):
            method, path = rng.choice(FUZZ_ROUTES)
            if i % 4 == 0:
                data = rng.randbytes(rng.randrange(0, 300))
            else:
                body = (
                    _junk(rng)
                    if rng.random() < 0.2
                    else {rng.choice(FIELDS): _junk(rng) for _ in range(rng.randrange(1, 6))}
                )
                data = json.dumps(body).encode()
            async with session.request(method, base + path, data=data, headers=headers) as r:
                await r.read()
                seen[r.status] = seen.get(r.status, 0) + 1
                assert r.status < 500, (method, path, data[:200], r.status)
    assert sum(n for s, n in seen.items() if 400 <= s < 500) > 1000, seen
    status, health = await call(node, "GET", "/healthz")
    assert status == 200, health
    status, _ = await call(node, "GET", "/metrics", token=READ)
    assert status == 200
