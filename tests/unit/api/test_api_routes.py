"""The /v1 handlers against a real etcd: shapes, status codes, validation, auth."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from membership.records import HydrationRecord
from pxcluster.api import middleware
from pxcluster.service import transfer
from pxcluster.service.core import Service
from tests.harness.etcd import EtcdServer
from tests.unit.api.api_support import (
    CLUSTER,
    READ_TOKEN,
    Api,
    FakeSnapshotReader,
    api,
    api_auth,
    fake_engine,
)

__all__ = ["api", "api_auth"]  # fixtures, imported for pytest

INSPECT_KEYS = {
    "id",
    "name",
    "size",
    "repl",
    "state",
    "attached_node",
    "nbd_uri",
    "epoch",
    "sync_writes",
    "replicas",
}


async def three_nodes(a: Api) -> None:
    for n in ("n1", "n2", "n3"):
        await a.add_node(n)


async def test_volume_lifecycle(api: Api) -> None:
    await three_nodes(api)
    status, vol = await api.call("POST", "/v1/volumes", {"name": "db", "size": "64M", "repl": 3})
    assert status == 201, vol
    assert INSPECT_KEYS <= set(vol)
    assert vol["size"] == 64 << 20 and vol["repl"] == 3 and vol["state"] == "detached"
    assert sorted(r["node"] for r in vol["replicas"]) == ["n1", "n2", "n3"]
    assert all(set(r) >= {"node", "state"} for r in vol["replicas"])
    status, vol2 = await api.call(
        "POST", "/v1/volumes", {"name": "logs", "size": 1 << 20, "sync_writes": True}
    )
    assert status == 201 and vol2["size"] == 1 << 20 and vol2["sync_writes"] is True
    status, listed = await api.call("GET", "/v1/volumes")
    assert status == 200 and [v["name"] for v in listed] == ["db", "logs"]
    status, got = await api.call("GET", "/v1/volumes/db")
    assert status == 200 and got["id"] == vol["id"]

    status, err = await api.call("POST", "/v1/volumes", {"name": "db", "size": "1M"})
    assert status == 409 and "already exists" in err["error"]

    status, att = await api.call("POST", "/v1/volumes/db/attach", {"node": "n2"})
    assert status == 200 and att["state"] == "attaching"  # no daemon here to serve it
    status, err = await api.call("DELETE", "/v1/volumes/db")
    assert status == 409 and "detach it first" in err["error"]
    status, err = await api.call("POST", "/v1/volumes/db/attach", {"node": "n3"})
    assert status == 409, err
    status, det = await api.call("POST", "/v1/volumes/db/detach", {"wait": False})
    assert status == 200 and det["state"] == "detached"
    status, out = await api.call("DELETE", "/v1/volumes/db")
    assert status == 200 and out == {"name": "db", "deleted": True}
    status, err = await api.call("GET", "/v1/volumes/db")
    assert status == 404 and err["error"] == "unknown volume 'db'"


async def test_failover_of_a_detached_volume_is_a_conflict(api: Api) -> None:
    await three_nodes(api)
    await api.call("POST", "/v1/volumes", {"name": "v", "size": "1M", "repl": 2})
    status, err = await api.call("POST", "/v1/volumes/v/failover", {"to": None})
    assert status == 409 and "not attached" in err["error"]
    status, err = await api.call("POST", "/v1/volumes/v/failover", {"to": 3})
    assert status == 400 and "'to'" in err["error"]


BAD_CREATE: list[tuple[Any, str]] = [
    (b"{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"name": "x", "size": "1M", "color": "red"}, "unknown field(s) color"),
    ({"size": "1M"}, "'name' is required"),
    ({"name": "x"}, "'size' is required"),
    ({"name": "x", "size": True}, "'size' must be"),
    ({"name": "x", "size": "12X"}, "invalid size"),
    ({"name": "x", "size": 1000}, "multiple of 512"),
    ({"name": "x", "size": -512}, "multiple of 512"),
    ({"name": "x", "size": "1M", "repl": "2"}, "'repl' must be an integer"),
    ({"name": "x", "size": "1M", "repl": True}, "'repl' must be an integer"),
    ({"name": "x", "size": "1M", "repl": 4}, "must be 1, 2 or 3"),
    ({"name": "x", "size": "1M", "sync_writes": "yes"}, "'sync_writes' must be true or false"),
    ({"name": "Bad_Name", "size": "1M"}, "invalid volume name"),
    ({"name": "../etc", "size": "1M"}, "invalid volume name"),
    ({"name": 7, "size": "1M"}, "'name' must be a string"),
]


@pytest.mark.parametrize(("body", "message"), BAD_CREATE)
async def test_bad_create_input_is_400_json(api: Api, body: Any, message: str) -> None:
    await api.add_node("n1")
    status, err = await api.call("POST", "/v1/volumes", body)
    assert status == 400, err
    assert message in err["error"]


async def test_bad_input_elsewhere(api: Api) -> None:
    await three_nodes(api)
    await api.call("POST", "/v1/volumes", {"name": "v", "size": "1M"})
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/v1/volumes/v/attach", {}, 400),
        ("POST", "/v1/volumes/v/attach", {"node": ""}, 400),
        ("POST", "/v1/volumes/v/attach", {"node": "nope"}, 404),
        ("POST", "/v1/volumes/v/attach", {"node": "n1", "timeout": 0}, 400),
        ("POST", "/v1/volumes/v/attach", {"node": "n1", "timeout": "5"}, 400),
        ("POST", "/v1/volumes/nope/attach", {"node": "n1"}, 404),
        ("POST", "/v1/volumes/v/detach", {"wait": 1}, 400),
        ("POST", "/v1/nodes/n1/drain", {"force": "yes"}, 400),
        ("POST", "/v1/nodes/n1/cordon", {"x": 1}, 400),
        ("POST", "/v1/nodes/nope/cordon", None, 404),
        ("GET", "/v1/nodes/nope", None, 404),
        ("DELETE", "/v1/volumes/nope", None, 404),
        ("GET", "/v1/nothing-here", None, 404),
        ("PUT", "/v1/volumes", {}, 405),
    ]
    for method, path, body, want in cases:
        status, err = await api.call(method, path, body)
        assert status == want, (method, path, body, status, err)
        assert isinstance(err, dict) and err["error"], (method, path, err)


async def test_placement_refusal_is_409(api: Api) -> None:
    await api.add_node("n1")
    await api.add_node("n2", up=False)
    status, err = await api.call("POST", "/v1/volumes", {"name": "v", "size": "1M", "repl": 2})
    assert status == 409 and err["error"]


async def test_nodes_cluster_cordon_and_drain(api: Api) -> None:
    await three_nodes(api)
    await api.add_node("n4", up=False)
    status, cl = await api.call("GET", "/v1/cluster")
    assert status == 200
    assert cl["cluster"] == "apitest" and cl["nodes_up"] == 3 and cl["nodes_total"] == 4
    status, nodes = await api.call("GET", "/v1/nodes")
    assert status == 200 and [n["name"] for n in nodes] == ["n1", "n2", "n3", "n4"]
    assert {"id", "name", "address", "state", "up", "capacity", "used"} <= set(nodes[0])
    assert [n["up"] for n in nodes] == [True, True, True, False]

    status, n = await api.call("POST", "/v1/nodes/n2/cordon")
    assert status == 200 and n["name"] == "n2" and n["state"] == "cordoned"
    status, n = await api.call("POST", "/v1/nodes/n2/uncordon", {})
    assert status == 200 and n["state"] == "active"

    await api.call("POST", "/v1/volumes", {"name": "r3", "size": "1M", "repl": 3})
    status, plan = await api.call("POST", "/v1/nodes/n1/drain", {"dry_run": True})
    assert status == 200 and plan["node"] == "n1"
    assert plan["losing_redundancy"] == ["r3"]
    status, n = await api.call("GET", "/v1/nodes/n1")
    assert n["state"] == "active"  # a dry run changes nothing
    status, err = await api.call("POST", "/v1/nodes/n1/drain", {})
    assert status == 409 and "--force" in err["error"]
    status, err = await api.call("GET", "/v1/nodes/n1/drain")
    assert status == 404
    status, op = await api.call("POST", "/v1/nodes/n1/drain", {"force": True})
    assert status == 202 and op["node"] == "n1" and op["state"] == "running"
    status, op = await api.call("GET", "/v1/nodes/n1/drain")
    assert status == 200 and op["state"] == "running"
    status, n = await api.call("GET", "/v1/nodes/n1")
    assert n["state"] == "draining"

    status, err = await api.call("DELETE", "/v1/nodes/n1")
    assert status == 409 and "up" in err["error"]
    status, out = await api.call("DELETE", "/v1/nodes/n4")
    assert status == 200 and out == {"name": "n4", "state": "removed"}


async def test_tokens_guard_every_call_but_the_probes(api_auth: Api) -> None:
    a = api_auth
    await a.add_node("n1")
    body = {"name": "v", "size": "1M"}
    for token in (None, "wrong", "s3cret-token-but-longer"):
        status, err = await a.call("POST", "/v1/volumes", body, token=token)
        assert status == 401 and "Bearer" in err["error"], (token, err)
        for path in ("/v1/volumes", "/v1/cluster", "/metrics", "/v1/openapi.json", "/v1/x"):
            status, err = await a.call("GET", path, token=token)
            assert status == 401 and "Bearer" in err["error"], (token, path, err)
    status, _ = await a.call("DELETE", "/v1/volumes/v", token=None)
    assert status == 401
    # The read token reads, and changes nothing.
    status, listed = await a.call("GET", "/v1/volumes", token=READ_TOKEN)
    assert status == 200 and listed == []
    status, _ = await a.call("GET", "/metrics", token=READ_TOKEN)
    assert status == 200
    status, err = await a.call("POST", "/v1/volumes", body, token=READ_TOKEN)
    assert status == 403 and "read-only" in err["error"]
    status, listed = await a.call("GET", "/v1/volumes", token=READ_TOKEN)
    assert status == 200 and listed == []
    # The admin token does everything.
    status, _ = await a.call("POST", "/v1/volumes", body)
    assert status == 201
    status, listed = await a.call("GET", "/v1/volumes")
    assert status == 200 and [v["name"] for v in listed] == ["v"]
    for path in ("/healthz", "/readyz"):
        status, answer = await a.call("GET", path, token=None)
        assert status == 200 and "n1" not in str(answer), (path, answer)


async def test_etcd_down_is_503(api: Api, etcd: EtcdServer) -> None:
    etcd.stop()
    status, err = await api.call("GET", "/v1/volumes")
    assert status == 503 and "etcd" in err["error"]


async def test_unexpected_error_is_logged_500_json(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(_: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = web.Application(middlewares=[middleware.errors])
    app.router.add_get("/x", broken)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/x")
        assert resp.status == 500
        assert (await resp.json())["error"] == "internal error: RuntimeError: bug"
    assert any("GET /x failed" in r.getMessage() for r in caplog.records)


async def test_resize_and_limits(api: Api) -> None:
    await api.add_node("n1")
    await api.call("POST", "/v1/volumes", {"name": "v", "size": "1M"})
    status, vol = await api.call("POST", "/v1/volumes/v/resize", {"size": "2M"})
    assert status == 200 and vol["size"] == 2 << 20
    status, err = await api.call("POST", "/v1/volumes/v/resize", {"size": "1M"})
    assert status == 400 and "shrinking" in err["error"]
    status, vol = await api.call("PATCH", "/v1/volumes/v", {"iops_limit": 500, "bw_limit": "10M"})
    assert status == 200 and (vol["iops_limit"], vol["bw_limit"]) == (500, 10 << 20)
    status, vol = await api.call("PATCH", "/v1/volumes/v", {"bw_limit": "0"})
    assert status == 200 and (vol["iops_limit"], vol["bw_limit"]) == (500, 0)
    for body, message in [
        ({}, "nothing to update"),
        ({"iops_limit": -1}, "0 (unlimited) or positive"),
        ({"iops_limit": "5"}, "'iops_limit' must be an integer"),
        ({"bw_limit": "fast"}, "invalid size"),
    ]:
        status, err = await api.call("PATCH", "/v1/volumes/v", body)
        assert status == 400 and message in err["error"], (body, err)


# --- snapshots, clones, reverts, scrub (a FakeEngine plays the serving engine)

SNAP_KEYS = {"id", "name", "volume", "created", "state"}


async def test_snapshot_create_list_revert_delete(api: Api) -> None:
    await three_nodes(api)
    await api.call("POST", "/v1/volumes", {"name": "db", "size": "4M", "repl": 3})
    status, listed = await api.call("GET", "/v1/volumes/db/snapshots")
    assert status == 200 and listed == []
    async with fake_engine(api, fail={"bad"}) as engine:
        status, a = await api.call("POST", "/v1/volumes/db/snapshots", {"name": "a"})
        assert status == 201, a
        assert set(a) == SNAP_KEYS and a["name"] == "a" and a["volume"] == "db"
        assert a["state"] == "ready" and a["created"] > 0
        status, err = await api.call("POST", "/v1/volumes/db/snapshots", {"name": "a"})
        assert status == 409 and "already has a snapshot" in err["error"]
        status, b = await api.call("POST", "/v1/volumes/db/snapshots", {"name": "b"})
        assert status == 201, b
        status, listed = await api.call("GET", "/v1/volumes/db/snapshots")
        assert status == 200 and [x["name"] for x in listed] == ["a", "b"]
        assert listed[0] == a

        # The engine failing a snapshot: 409 with its reason, and the request is withdrawn.
        status, err = await api.call("POST", "/v1/volumes/db/snapshots", {"name": "bad"})
        assert status == 409 and "replica n2 refused" in err["error"], err
        status, listed = await api.call("GET", "/v1/volumes/db/snapshots")
        assert [x["name"] for x in listed] == ["a", "b"]

        status, err = await api.call("POST", "/v1/volumes/db/revert", {"snapshot": "a"})
        assert status == 409 and "newer than 'a' (b)" in err["error"], err
        status, out = await api.call("DELETE", "/v1/volumes/db/snapshots/b")
        assert status == 200 and out == {"volume": "db", "snapshot": "b", "deleted": True}
        status, err = await api.call("DELETE", "/v1/volumes/db/snapshots/b")
        assert status == 404 and err["error"] == "volume 'db' has no snapshot 'b'"
        # Until the node lets go of the volume it served for the delete, a revert is a 409
        # "try again" (as with the CLI); then it goes through.
        await engine.settle()
        status, vol = await api.call("POST", "/v1/volumes/db/revert", {"snapshot": "a"})
        assert status == 200, vol
        assert INSPECT_KEYS <= set(vol) and vol["name"] == "db" and vol["state"] == "detached"

        # Refused while attached for clients.
        await api.call("POST", "/v1/volumes/db/attach", {"node": "n1"})
        status, err = await api.call("POST", "/v1/volumes/db/revert", {"snapshot": "a"})
        assert status == 409 and "detach it before reverting" in err["error"]
        await api.call("POST", "/v1/volumes/db/detach", {"wait": False})
        status, out = await api.call("DELETE", "/v1/volumes/db/snapshots/a")
        assert status == 200
        status, listed = await api.call("GET", "/v1/volumes/db/snapshots")
        assert listed == []


async def test_snapshot_create_without_an_engine_times_out_504(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pxcluster.service import snapshots

    real = snapshots.create

    async def quick(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return await real(*args, **{**kwargs, "timeout": 0.3})

    monkeypatch.setattr(snapshots, "create", quick)
    await api.add_node("n1")
    await api.call("POST", "/v1/volumes", {"name": "v", "size": "1M"})
    status, err = await api.call("POST", "/v1/volumes/v/snapshots", {"name": "s"})
    assert status == 504 and "not done after" in err["error"], err


async def test_clone(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    @contextlib.asynccontextmanager
    async def reader(svc: Service, volume: str, snapshot: str) -> AsyncIterator[Any]:
        yield FakeSnapshotReader(8)

    monkeypatch.setattr(transfer, "open_reader", reader)
    await three_nodes(api)
    await api.call("POST", "/v1/volumes", {"name": "src", "size": "32M", "repl": 2})
    async with fake_engine(api):
        await api.call("POST", "/v1/volumes/src/snapshots", {"name": "gold"})
        status, cl = await api.call(
            "POST", "/v1/volumes/src/clone", {"snapshot": "gold", "name": "cl"}
        )
        assert status == 201, cl
        assert INSPECT_KEYS <= set(cl) and cl["name"] == "cl"
        assert cl["size"] == 32 << 20 and cl["repl"] == 2  # the source's
        # The shape and what the request named; the chunk count is the (fake) reader's.
        clone_of = cl["clone_of"]
        assert set(clone_of) == {"volume", "snapshot", "state", "chunks_total", "chunks_copied"}
        assert (clone_of["volume"], clone_of["snapshot"]) == ("src", "gold")
        assert clone_of["state"] == "copying" and clone_of["chunks_copied"] == 0
        assert isinstance(clone_of["chunks_total"], int)
        status, got = await api.call("GET", "/v1/volumes/cl")
        assert status == 200 and got["clone_of"]["state"] == "copying"
        status, cl3 = await api.call(
            "POST", "/v1/volumes/src/clone", {"snapshot": "gold", "name": "cl3", "repl": 3}
        )
        assert status == 201 and cl3["repl"] == 3

        status, err = await api.call(
            "POST", "/v1/volumes/src/clone", {"snapshot": "gold", "name": "cl"}
        )
        assert status == 409 and "already exists" in err["error"], err
        status, err = await api.call("DELETE", "/v1/volumes/src/snapshots/gold")
        assert status == 409 and "still copying" in err["error"], err

        # The copies finish: the snapshot may go.
        svc = Service(api.etcd, CLUSTER)
        for name in ("cl", "cl3"):
            view = await svc.volume(name)
            assert view.hydration is not None
            done = HydrationRecord.from_dict(view.hydration.to_dict() | {"state": "done"})
            await api.etcd.put(svc.keys.hydration(view.record.id), done.encode())
        status, got = await api.call("GET", "/v1/volumes/cl")
        done_of = got["clone_of"]
        assert done_of["state"] == "done" and done_of["chunks_copied"] == done_of["chunks_total"]
        status, _ = await api.call("DELETE", "/v1/volumes/src/snapshots/gold")
        assert status == 200


async def test_clone_when_no_replica_serves_the_snapshot_is_409(api: Api) -> None:
    # The fake nodes' data ports answer nothing: the snapshot cannot be read.
    await api.add_node("n1")
    await api.call("POST", "/v1/volumes", {"name": "src", "size": "1M"})
    async with fake_engine(api):
        await api.call("POST", "/v1/volumes/src/snapshots", {"name": "s"})
        status, err = await api.call(
            "POST", "/v1/volumes/src/clone", {"snapshot": "s", "name": "c"}
        )
    assert status == 409 and "no replica could serve snapshot 's'" in err["error"], err
    status, err = await api.call("GET", "/v1/volumes/c")
    assert status == 404  # nothing created


async def test_scrub(api: Api) -> None:
    await three_nodes(api)
    await api.call("POST", "/v1/volumes", {"name": "v", "size": "4M", "repl": 3})
    repaired = [{"layer": "head", "chunk": 1, "node": "n3", "from": "n1", "reason": "crc"}]
    async with fake_engine(api, report={"chunks": 4, "repaired": repaired}):
        # What the route answers around the engine's report (its contents are the fake's):
        # 200, the report's shape, the volume it was asked for.
        status, rep = await api.call("POST", "/v1/volumes/v/scrub")
        assert status == 200, rep
        assert set(rep) == {"volume", "chunks", "skipped", "repaired", "unrepairable", "seconds"}
        assert rep["volume"] == "v" and isinstance(rep["chunks"], int)
        assert all(isinstance(rep[k], list) for k in ("skipped", "repaired", "unrepairable"))
        assert isinstance(rep["seconds"], int | float) and rep["seconds"] >= 0
        # A timeout in the body is taken (one the engine beats is no error).
        status, rep = await api.call("POST", "/v1/volumes/v/scrub", {"timeout": 5})
        assert status == 200 and rep["volume"] == "v"

    # Nobody carries it out: bounded by the timeout; a second one meanwhile is refused.
    status, err = await api.call("POST", "/v1/volumes/v/scrub", {"timeout": 0.2})
    assert status == 504 and "not done after" in err["error"], err
    status, err = await api.call("POST", "/v1/volumes/v/scrub", {"timeout": 0.2})
    assert status == 409 and "already running" in err["error"], err


async def test_snapshot_routes_bad_input(api: Api) -> None:
    await three_nodes(api)
    await api.call("POST", "/v1/volumes", {"name": "v", "size": "1M"})
    cases: list[tuple[str, str, Any, int, str]] = [
        ("GET", "/v1/volumes/nope/snapshots", None, 404, "unknown volume 'nope'"),
        ("POST", "/v1/volumes/nope/snapshots", {"name": "s"}, 404, "unknown volume"),
        ("POST", "/v1/volumes/v/snapshots", {}, 400, "'name' is required"),
        ("POST", "/v1/volumes/v/snapshots", {"name": 3}, 400, "'name' must be a string"),
        ("POST", "/v1/volumes/v/snapshots", {"name": "a/b"}, 400, "invalid snapshot name"),
        ("POST", "/v1/volumes/v/snapshots", {"name": "s", "x": 1}, 400, "unknown field(s) x"),
        ("POST", "/v1/volumes/v/snapshots", b"[", 400, "not valid JSON"),
        ("DELETE", "/v1/volumes/v/snapshots/nope", None, 404, "no snapshot 'nope'"),
        ("DELETE", "/v1/volumes/nope/snapshots/s", None, 404, "unknown volume"),
        ("POST", "/v1/volumes/v/revert", {}, 400, "'snapshot' is required"),
        ("POST", "/v1/volumes/v/revert", {"snapshot": "nope"}, 404, "no snapshot 'nope'"),
        ("POST", "/v1/volumes/v/revert", {"snapshot": "s", "wait": 1}, 400, "unknown field"),
        ("POST", "/v1/volumes/v/clone", {"name": "c"}, 400, "'snapshot' is required"),
        ("POST", "/v1/volumes/v/clone", {"snapshot": "s"}, 400, "'name' is required"),
        ("POST", "/v1/volumes/v/clone", {"snapshot": "nope", "name": "c"}, 404, "no snapshot"),
        ("POST", "/v1/volumes/nope/clone", {"snapshot": "s", "name": "c"}, 404, "unknown volume"),
        ("POST", "/v1/volumes/v/clone", {"snapshot": "s", "name": "c", "repl": 0}, 400, "repl"),
        ("POST", "/v1/volumes/v/clone", {"snapshot": "s", "name": "c", "repl": "2"}, 400, "repl"),
        ("POST", "/v1/volumes/v/scrub", {"timeout": 0}, 400, "between 0.1 and 600"),
        ("POST", "/v1/volumes/v/scrub", {"timeout": 601}, 400, "between 0.1 and 600"),
        ("POST", "/v1/volumes/v/scrub", {"timeout": "5"}, 400, "must be a number"),
        ("POST", "/v1/volumes/v/scrub", {"repair": False}, 400, "unknown field"),
        ("POST", "/v1/volumes/nope/scrub", None, 404, "unknown volume"),
        ("PUT", "/v1/volumes/v/snapshots", {}, 405, ""),
    ]
    for method, path, body, want, message in cases:
        status, err = await api.call(method, path, body)
        assert status == want, (method, path, body, status, err)
        assert isinstance(err, dict) and message in err["error"], (method, path, err)


async def test_token_guards_snapshot_routes(api_auth: Api) -> None:
    a = api_auth
    await a.add_node("n1")
    await a.call("POST", "/v1/volumes", {"name": "v", "size": "1M"})
    for method, path, body in [
        ("POST", "/v1/volumes/v/snapshots", {"name": "s"}),
        ("DELETE", "/v1/volumes/v/snapshots/s", None),
        ("POST", "/v1/volumes/v/revert", {"snapshot": "s"}),
        ("POST", "/v1/volumes/v/clone", {"snapshot": "s", "name": "c"}),
        ("POST", "/v1/volumes/v/scrub", None),
    ]:
        status, err = await a.call(method, path, body, token=None)
        assert status == 401 and "Bearer" in err["error"], (method, path, err)
        status, err = await a.call(method, path, body, token=READ_TOKEN)
        assert status == 403, (method, path, err)
    for path in ("/v1/volumes/v/snapshots", "/v1/volumes/v"):
        status, _ = await a.call("GET", path, token=None)
        assert status == 401
        status, _ = await a.call("GET", path, token=READ_TOKEN)
        assert status == 200
