"""The OpenAPI 3 document of the node API, served at /v1/openapi.json. A test checks that
it lists exactly the routes the app serves, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

VERSION = "0.1.0"

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_NUM = {"type": "number"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR}, ("error",)),
    "Cluster": _obj(
        {
            "cluster": _STR,
            "id": _nullable(_STR),
            "etcd": _STR,
            "leader": _nullable(_STR),
            "nodes_up": _INT,
            "nodes_total": _INT,
            "capacity": _INT,
            "used": _INT,
            "volumes": _INT,
        }
    ),
    "Node": _obj(
        {
            "id": _STR,
            "name": _STR,
            "address": _STR,
            "state": {
                "type": "string",
                "enum": ["active", "cordoned", "draining", "drained", "removed"],
            },
            "up": _BOOL,
            "capacity": _INT,
            "used": _INT,
            "zone": _STR,
            "data_port": _INT,
            "nbd_port": _INT,
            "api_port": _INT,
        },
        ("id", "name", "address", "state", "up", "capacity", "used"),
    ),
    "Replica": _obj(
        {"node": _STR, "node_id": _STR, "state": _STR, "since_epoch": _INT}, ("node", "state")
    ),
    "Volume": _obj(
        {
            "id": _STR,
            "name": _STR,
            "size": _INT,
            "repl": _INT,
            "state": {
                "type": "string",
                "enum": ["detached", "attaching", "attached", "detaching"],
            },
            "health": {"type": "string", "enum": ["healthy", "degraded"]},
            "attached_node": _nullable(_STR),
            "nbd_uri": _nullable(_STR),
            "epoch": _INT,
            "sync_writes": _BOOL,
            "chunk_size": _INT,
            "iops_limit": _INT,
            "bw_limit": _INT,
            "replicas": {"type": "array", "items": _ref("Replica")},
            "last_failover": _nullable({"type": "object"}),
            "rebuilds": {"type": "array", "items": {"type": "object"}},
            "clone_of": _nullable(_ref("CloneOf")),
        },
        (
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
        ),
    ),
    "CloneOf": _obj(
        {
            "volume": _STR,
            "snapshot": _STR,
            "state": {"type": "string", "enum": ["copying", "done"]},
            "chunks_total": _INT,
            "chunks_copied": _INT,
        },
        ("volume", "snapshot", "state", "chunks_total", "chunks_copied"),
    ),
    "Snapshot": _obj(
        {
            "id": _STR,
            "name": _STR,
            "volume": _STR,
            "created": {**_NUM, "description": "Unix time the engine took it; 0 until then"},
            "state": {"type": "string", "enum": ["creating", "ready", "deleting", "failed"]},
        },
        ("id", "name", "volume", "created", "state"),
    ),
    "CreateSnapshot": _obj(
        {"name": {**_STR, "description": "letters, digits, '.', '_', '-', at most 63"}},
        ("name",),
    ),
    "SnapshotDeleted": _obj(
        {"volume": _STR, "snapshot": _STR, "deleted": _BOOL}, ("volume", "snapshot", "deleted")
    ),
    "Revert": _obj(
        {"snapshot": {**_STR, "description": "the snapshot to go back to"}}, ("snapshot",)
    ),
    "Clone": _obj(
        {
            "snapshot": {**_STR, "description": "the source volume's snapshot"},
            "name": {**_STR, "description": "the new volume (a DNS label)"},
            "repl": {**_INT, "minimum": 1, "maximum": 3, "description": "default: the source's"},
        },
        ("snapshot", "name"),
    ),
    "Scrub": _obj(
        {"timeout": {**_NUM, "default": 600, "maximum": 600, "description": "seconds to wait"}}
    ),
    "ScrubReport": _obj(
        {
            "volume": _STR,
            "chunks": _INT,
            "skipped": {"type": "array", "items": _STR},
            "repaired": {
                "type": "array",
                "items": _obj(
                    {"layer": _STR, "chunk": _INT, "node": _STR, "from": _STR, "reason": _STR}
                ),
            },
            "unrepairable": {
                "type": "array",
                "items": {"type": "object"},
                "description": "chunks without a good copy (the CLI exits 1 on any)",
            },
            "seconds": _NUM,
        },
        ("volume", "chunks", "skipped", "repaired", "unrepairable", "seconds"),
    ),
    "DrainPlan": _obj(
        {
            "node": _STR,
            "replicas": {"type": "array", "items": {"type": "object"}},
            "attachments": {"type": "array", "items": {"type": "object"}},
            "bytes_total": _INT,
            "losing_redundancy": {"type": "array", "items": _STR},
            "rebuild_bandwidth": _nullable(_INT),
            "estimate_seconds": _nullable(_NUM),
        }
    ),
    "DrainOp": _obj({"node": _STR, "state": _STR}, ("node", "state")),
    "CreateVolume": _obj(
        {
            "name": {**_STR, "description": "a DNS label: a-z, 0-9, '-', at most 63"},
            "size": {
                "oneOf": [_INT, _STR],
                "description": "bytes, or a string like 512M or 10G",
            },
            "repl": {**_INT, "minimum": 1, "maximum": 3, "default": 1},
            "sync_writes": {**_BOOL, "default": False},
        },
        ("name", "size"),
    ),
    "Update": _obj(
        {
            "iops_limit": {**_INT, "minimum": 0, "description": "read+write ops/s, 0: none"},
            "bw_limit": {
                "oneOf": [_INT, _STR],
                "description": "read+write bytes/s, or a string like 100M; 0: none",
            },
        }
    ),
    "Resize": _obj(
        {"size": {"oneOf": [_INT, _STR], "description": "new size (grow only)"}}, ("size",)
    ),
    "Attach": _obj(
        {
            "node": _STR,
            "wait": {**_BOOL, "default": False, "description": "return once serving"},
            "timeout": {**_NUM, "default": 30},
        },
        ("node",),
    ),
    "Detach": _obj({"wait": {**_BOOL, "default": True}, "timeout": {**_NUM, "default": 30}}),
    "Failover": _obj(
        {
            "to": _nullable({**_STR, "description": "destination node; null: chosen"}),
            "drill": {**_BOOL, "default": False},
            "wait": {**_BOOL, "default": True},
            "timeout": {**_NUM, "default": 60},
        }
    ),
    "Drain": _obj(
        {
            "force": {**_BOOL, "default": False, "description": "drain even if redundancy drops"},
            "dry_run": {**_BOOL, "default": False, "description": "answer the plan only"},
        }
    ),
}

_ERRORS = {
    "400": "invalid input",
    "401": "missing or wrong bearer token (every call but /healthz and /readyz, when the node "
    "has a token)",
    "403": "the read-only token on a call that changes something",
    "404": "unknown node, volume or snapshot",
    "409": "conflicts with the cluster's state (busy, duplicate, cannot place, the engine or "
    "replicas failed the snapshot operation)",
    "503": "etcd unreachable",
    "504": "timed out waiting",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    schema: dict[str, Any] | None,
    *,
    status: str = "200",
    body: str | None = None,
    errors: tuple[str, ...] = ("503",),
    content_type: str = "application/json",
) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "success"}
    if schema is not None:
        ok["content"] = {content_type: {"schema": schema}}
    op: dict[str, Any] = {"summary": summary, "responses": {status: ok}}
    for code in errors:
        op["responses"][code] = {"description": _ERRORS[code], **_json(_ref("Error"))}
    if body is not None:
        op["requestBody"] = {"required": False, **_json(_ref(body))}
    return op


_NAME = [{"name": "name", "in": "path", "required": True, "schema": _STR}]
_SNAP = [*_NAME, {"name": "snap", "in": "path", "required": True, "schema": _STR}]
_MUT = ("400", "401", "403", "404", "409", "503")
_LIST = {"type": "array"}


def _drain_post() -> dict[str, Any]:
    op = _op(
        "Start draining (202), or with dry_run answer the plan (200)",
        _ref("DrainPlan"),
        body="Drain",
        errors=_MUT,
    )
    op["responses"]["202"] = {"description": "drain started", **_json(_ref("DrainOp"))}
    return op


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        # The probes answer without a token (security: none).
        "/healthz": {
            "get": {**_op("The process answers", {"type": "object"}, errors=()), "security": []}
        },
        "/readyz": {
            "get": {
                **_op("The node holds a healthy etcd lease (503 otherwise)", {"type": "object"}),
                "security": [],
            }
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics", _STR, errors=(), content_type="text/plain; version=0.0.4"
            )
        },
        "/v1/openapi.json": {"get": _op("This document", {"type": "object"}, errors=())},
        "/v1/cluster": {"get": _op("Cluster status", _ref("Cluster"))},
        "/v1/nodes": {"get": _op("Every node", {**_LIST, "items": _ref("Node")})},
        "/v1/nodes/{name}": {
            "parameters": _NAME,
            "get": _op("One node", _ref("Node"), errors=("404", "503")),
            "delete": _op("Remove a stopped node that holds no replicas", None, errors=_MUT),
        },
        "/v1/nodes/{name}/cordon": {
            "parameters": _NAME,
            "post": _op("No new replicas or attachments land here", _ref("Node"), errors=_MUT),
        },
        "/v1/nodes/{name}/uncordon": {
            "parameters": _NAME,
            "post": _op("Return the node to service", _ref("Node"), errors=_MUT),
        },
        "/v1/nodes/{name}/drain": {
            "parameters": _NAME,
            "get": _op("The node's drain, as it goes", _ref("DrainOp"), errors=("404", "503")),
            "post": _drain_post(),
        },
        "/v1/volumes": {
            "get": _op("Every volume", {**_LIST, "items": _ref("Volume")}),
            "post": _op(
                "Create a volume and place its replicas",
                _ref("Volume"),
                status="201",
                body="CreateVolume",
                errors=_MUT,
            ),
        },
        "/v1/volumes/{name}": {
            "parameters": _NAME,
            "get": _op(
                "A volume's state, attachment, epoch and replicas",
                _ref("Volume"),
                errors=("404", "503"),
            ),
            "delete": _op("Delete a detached volume", {"type": "object"}, errors=_MUT),
            "patch": _op("Change I/O limits", _ref("Volume"), body="Update", errors=_MUT),
        },
        "/v1/volumes/{name}/resize": {
            "parameters": _NAME,
            "post": _op("Grow the volume, online", _ref("Volume"), body="Resize", errors=_MUT),
        },
        "/v1/volumes/{name}/attach": {
            "parameters": _NAME,
            "post": _op("Attach on a node", _ref("Volume"), body="Attach", errors=(*_MUT, "504")),
        },
        "/v1/volumes/{name}/detach": {
            "parameters": _NAME,
            "post": _op(
                "Flush, mark clean and release the attachment",
                _ref("Volume"),
                body="Detach",
                errors=(*_MUT, "504"),
            ),
        },
        "/v1/volumes/{name}/failover": {
            "parameters": _NAME,
            "post": _op(
                "Move the attachment: hand-off if its node is up, forced if down",
                _ref("Volume"),
                body="Failover",
                errors=(*_MUT, "504"),
            ),
        },
        "/v1/volumes/{name}/snapshots": {
            "parameters": _NAME,
            "get": _op(
                "The volume's snapshots, oldest first",
                {**_LIST, "items": _ref("Snapshot")},
                errors=("404", "503"),
            ),
            "post": _op(
                "Take a crash-consistent snapshot, attached or detached (201 once every "
                "in-sync replica holds it)",
                _ref("Snapshot"),
                status="201",
                body="CreateSnapshot",
                errors=(*_MUT, "504"),
            ),
        },
        "/v1/volumes/{name}/snapshots/{snap}": {
            "parameters": _SNAP,
            "delete": _op(
                "Delete a snapshot (409 while a clone still copies it)",
                _ref("SnapshotDeleted"),
                errors=(*_MUT, "504"),
            ),
        },
        "/v1/volumes/{name}/revert": {
            "parameters": _NAME,
            "post": _op(
                "Rewind a detached volume to a snapshot (409 while attached or while newer "
                "snapshots exist)",
                _ref("Volume"),
                body="Revert",
                errors=(*_MUT, "504"),
            ),
        },
        "/v1/volumes/{name}/clone": {
            "parameters": _NAME,
            "post": _op(
                "A new, independent volume holding a snapshot, usable at once (copied in the "
                "background: see clone_of)",
                _ref("Volume"),
                status="201",
                body="Clone",
                errors=_MUT,
            ),
        },
        "/v1/volumes/{name}/scrub": {
            "parameters": _NAME,
            "post": _op(
                "Check every chunk (head and snapshots) on every in-sync replica and repair "
                "bad copies; answers the report",
                _ref("ScrubReport"),
                body="Scrub",
                errors=(*_MUT, "504"),
            ),
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "pxcluster node API",
            "version": VERSION,
            "description": "Served by every node on its --api-port (on loopback unless "
            "--api-address says otherwise). When the node has a token (--api-token-file, "
            "--api-read-token-file), every call but /healthz and /readyz needs "
            "'Authorization: Bearer <token>': the read-only token for GET, the admin token "
            "for everything.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
