"""Docker volume plugin: Docker's JSON-over-HTTP volume protocol on a unix socket, mapped to
pxcluster volumes through the service layer.

Create/Remove/Get/List manage cluster volumes. Mount goes through the host layer
(pxcluster.host), as `pxcluster volume mount` does: attach on this node, a block device (the
kernel NBD client, or nbdfuse + a loop device where the host has no kernel NBD), ext4 made on
first use only, mounted under <data-dir>/docker/<name>. What is mounted is recorded under
<data-dir>/host, so after a node restart the plugin knows its mounts again (the devices ride
out the restart: they hold I/O and reconnect) and re-mounts any whose device was lost.

Docker finds the plugin by its socket: put it at /run/docker/plugins/pxcluster.sock and use
`docker volume create -d pxcluster -o size=1G -o repl=3 NAME`. The socket is root's only
(Docker's plugin sockets are): whoever can reach it can mount any volume on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from membership.etcd import EtcdUnavailable
from pxcluster import inputs
from pxcluster.api.app import NodeView
from pxcluster.api.body import MAX_BODY, parse_json
from pxcluster.errors import DuplicateName, InvalidArgument, PxcError
from pxcluster.host.fs import mounted_at
from pxcluster.host.lifecycle import Host, crash_teardown
from pxcluster.host.mapper import state_of
from pxcluster.host.registry import Registry
from pxcluster.node.paths import inside
from pxcluster.service.core import Service
from pxcluster.units import parse_size

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
DEFAULT_SIZE = "1G"
ATTACH_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_OPTS = frozenset({"size", "repl", "sync_writes"})


class PluginError(Exception):
    """Answered to Docker as {"Err": message}."""


@dataclass
class Mounted:
    device: str
    path: str
    ids: set[str] = field(default_factory=set)


class VolumePlugin:
    def __init__(self, svc: Service, node_name: str, data_dir: str) -> None:
        if not data_dir:
            raise InvalidArgument("the Docker volume plugin needs --data-dir (mount points)")
        self.svc = svc
        self.node_name = node_name
        self.mount_root = Path(inside(data_dir, "docker"))
        self.host = Host(svc, Registry(Path(inside(data_dir, "host"))))
        self.mounts: dict[str, Mounted] = {}
        # One Mount/Unmount at a time: Docker may mount a volume for two containers at once,
        # and both must see one attach and one kernel device.
        self._lock = asyncio.Lock()

    def mountpoint(self, name: str) -> str:
        return self.mounts[name].path if name in self.mounts else ""

    @staticmethod
    def _name(req: dict[str, Any]) -> str:
        name = req.get("Name")
        # Checked before any path is built from it: a name can never leave --data-dir.
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(
                f"invalid volume name {name!r}: use a DNS label (a-z, 0-9, '-', at most 63)"
            )
        return name

    # --- the protocol

    async def activate(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"Implements": ["VolumeDriver"]}

    async def capabilities(self, _: dict[str, Any]) -> dict[str, Any]:
        # Volumes live in the cluster, not on this host: every node's Docker sees the same.
        return {"Capabilities": {"Scope": "global"}}

    async def create(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        opts = req.get("Opts") or {}
        if not isinstance(opts, dict):
            raise InvalidArgument("Opts must be an object")
        unknown = sorted(set(opts) - _OPTS)
        if unknown:
            raise InvalidArgument(
                f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_OPTS))}"
            )
        size = parse_size(str(opts.get("size", DEFAULT_SIZE)))
        text = str(opts.get("repl", 1)).strip()
        if text not in ("1", "2", "3"):
            raise InvalidArgument(f"invalid repl {inputs.shown(text)}: must be 1, 2 or 3")
        repl = int(text)
        sync = str(opts.get("sync_writes", "false")).lower() in ("1", "true", "yes")
        try:
            await self.svc.create_volume(name, size, repl, sync_writes=sync)
        except DuplicateName:
            # Docker calls Create for a volume it has not seen on this host yet; the cluster
            # volume already being there is the normal case for a global plugin.
            pass
        return {}

    async def remove(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        if name in self.mounts:
            raise PluginError(f"volume {name!r} is mounted here; unmount it first")
        await self.svc.delete_volume(name)
        return {}

    async def path(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"Mountpoint": self.mountpoint(self._name(req))}

    async def get(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        info = await self.svc.inspect(await self.svc.volume(name))
        status = {k: info[k] for k in ("size", "repl", "state", "health", "attached_node")}
        return {"Volume": {"Name": name, "Mountpoint": self.mountpoint(name), "Status": status}}

    async def list_volumes(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "Volumes": [
                {"Name": v.record.name, "Mountpoint": self.mountpoint(v.record.name)}
                for v in await self.svc.volumes()
            ]
        }

    async def mount(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        caller = str(req.get("ID", ""))
        async with self._lock:
            if name not in self.mounts:
                await self.svc.volume(name)  # unknown volume: fail before anything else
                inside(str(self.mount_root), name)  # refuses a name that would leave --data-dir
                rec = await self.host.mount(
                    name, str(self.mount_root / name), None, self.node_name, owner="docker"
                )
                self.mounts[name] = Mounted(rec.device, rec.mountpoint)
            m = self.mounts[name]
            m.ids.add(caller)
            self._remember(name)
            return {"Mountpoint": m.path}

    async def unmount(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        async with self._lock:
            m = self.mounts.get(name)
            if m is None:
                return {}
            m.ids.discard(str(req.get("ID", "")))
            if m.ids:
                self._remember(name)
                return {}  # another container still uses it
            await self.host.unmount(name)  # flush, unmount, unmap, detach
            del self.mounts[name]
            return {}

    def _remember(self, name: str) -> None:
        """The containers using a mount, kept with its device record (a restart forgets
        nothing Docker told us)."""
        rec = self.host.registry.get(name)
        if rec is not None:
            rec.ids = sorted(self.mounts[name].ids)
            self.host.registry.put(rec)

    async def reestablish(self) -> None:
        """After a node restart: adopt the mounts this plugin made (their devices outlived the
        daemon and reconnected), and mount again any whose device or mount was lost."""
        async with self._lock:
            for rec in self.host.registry.load().values():
                if rec.owner != "docker" or not rec.mountpoint:
                    continue
                try:
                    ids = list(rec.ids)
                    if state_of(rec) != "connected" or mounted_at(rec.device) != rec.mountpoint:
                        await crash_teardown(self.host.registry, rec.volume)
                        rec = await self.host.mount(
                            rec.volume,
                            rec.mountpoint,
                            rec.fs or None,
                            self.node_name,
                            owner="docker",
                        )
                    self.mounts[rec.volume] = Mounted(rec.device, rec.mountpoint, set(ids))
                    self._remember(rec.volume)
                    log.info("docker volume %s: mounted at %s", rec.volume, rec.mountpoint)
                except (PxcError, EtcdUnavailable) as e:
                    log.error("docker volume %s: cannot mount it again: %s", rec.volume, e)


ENDPOINTS = {
    "/Plugin.Activate": "activate",
    "/VolumeDriver.Capabilities": "capabilities",
    "/VolumeDriver.Create": "create",
    "/VolumeDriver.Remove": "remove",
    "/VolumeDriver.Mount": "mount",
    "/VolumeDriver.Unmount": "unmount",
    "/VolumeDriver.Path": "path",
    "/VolumeDriver.Get": "get",
    "/VolumeDriver.List": "list_volumes",
}


def build_plugin_app(plugin: VolumePlugin) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)

    def endpoint(method_name: str) -> Any:
        method = getattr(plugin, method_name)

        async def handle(request: web.Request) -> web.Response:
            try:
                raw = await request.read()
                req = parse_json(raw) if raw.strip() else {}
                if not isinstance(req, dict):
                    raise InvalidArgument("request body must be a JSON object")
                reply = await method(req)
            except (PluginError, PxcError, EtcdUnavailable) as e:
                reply = {"Err": str(e)}
            except ValueError as e:
                reply = {"Err": f"request body is not valid JSON: {e}"}
            except Exception as e:
                log.exception("%s failed", request.path)
                reply = {"Err": f"internal error: {type(e).__name__}: {e}"}
            if "Err" not in reply and request.path != "/Plugin.Activate":
                reply["Err"] = ""
            return web.json_response(reply, content_type=CONTENT_TYPE)

        return handle

    for path, name in ENDPOINTS.items():
        app.router.add_post(path, endpoint(name))
    return app


def _prepare_socket_path(socket_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # left by a previous run that did not stop cleanly


async def start_plugin(
    socket_path: str, node_view: NodeView, node_name: str, data_dir: str
) -> web.AppRunner:
    """Serve the plugin on `socket_path`; the caller owns the returned runner (cleanup())."""
    plugin = VolumePlugin(Service(node_view.etcd, node_view.cluster), node_name, data_dir)
    app = build_plugin_app(plugin)
    tasks: list[asyncio.Task[None]] = []

    async def cancel(_: web.Application) -> None:
        # Owned by the plugin's app: a node stopping mid-way does not leave it running.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.on_cleanup.append(cancel)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    _prepare_socket_path(socket_path)
    await web.UnixSite(runner, socket_path).start()
    os.chmod(socket_path, 0o600)
    log.info("Docker volume plugin listening on %s", socket_path)
    tasks.append(asyncio.create_task(plugin.reestablish(), name="docker-plugin-reestablish"))
    return runner
