"""The OpenAPI document lists exactly the routes the app serves, and is well formed."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from membership.etcd import Etcd
from pxcluster.api.app import ApiConfig, build_app
from pxcluster.node.metrics import Metrics
from tests.unit.api.api_support import Api, FakeNode, api

__all__ = ["api"]

METHODS = {"get", "post", "put", "patch", "delete"}


def served(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp answers HEAD for every GET; implied by it
            continue
        if (route.name or "").startswith("console."):  # the web console's HTML pages
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str), info
        out.add((route.method.lower(), path))
    return out


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [value["$ref"]] if "$ref" in value else [r for v in value.values() for r in refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs(v)]
    return []


async def test_document_matches_routes_and_is_valid(api: Api) -> None:
    status, doc = await api.call("GET", "/v1/openapi.json")
    assert status == 200
    doc = json.loads(json.dumps(doc))  # round-trips as plain JSON
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert isinstance(doc["paths"], dict) and doc["paths"]

    app = build_app(FakeNode("n1", "c", Etcd("http://127.0.0.1:1"), Metrics()), ApiConfig())
    routes, paths = served(app), documented(doc)
    assert routes - paths == set(), "served but not documented"
    assert paths - routes == set(), "documented but not served"

    schemas = doc["components"]["schemas"]
    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    for path, item in doc["paths"].items():
        params = {p["name"] for p in item.get("parameters", [])}
        assert params == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path
        for method in set(item) & METHODS:
            op = item[method]
            assert op["summary"] and op["responses"], (method, path)
            assert all(code.isdigit() for code in op["responses"]), (method, path)
