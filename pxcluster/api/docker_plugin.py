"""Docker volume plugin: Docker's JSON-over-HTTP volume protocol on a unix socket, mapped to
pxcluster volumes through the service layer.

Create/Remove/Get/List manage cluster volumes. Mount attaches the volume on this node,
connects the kernel NBD client to the local export, makes an ext4 filesystem if the volume
has none, and mounts it under <data-dir>/docker/<name>. Mount needs /dev/nbd0 (modprobe nbd)
and `nbd-client`; without them it answers an Err saying so, before changing anything.

Docker finds the plugin by its socket: put it at /run/docker/plugins/pxcluster.sock and use
`docker volume create -d pxcluster -o size=1G -o repl=3 NAME`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from aiohttp import web

from membership.etcd import EtcdUnavailable
from pxcluster import inputs
from pxcluster.api.app import NodeView
from pxcluster.api.body import MAX_BODY, parse_json
from pxcluster.errors import DuplicateName, InvalidArgument, PxcError
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


def nbd_client_available() -> str | None:
    """None when the kernel NBD client can be used here, else why not."""
    if not os.path.exists("/dev/nbd0"):
        return "the kernel NBD client is unavailable on this host: no /dev/nbd0 (modprobe nbd)"
    if shutil.which("nbd-client") is None:
        return "the kernel NBD client is unavailable on this host: nbd-client is not installed"
    return None


async def run(*cmd: str, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PluginError(f"{cmd[0]} did not finish in {COMMAND_TIMEOUT:.0f}s") from None
    text = out.decode(errors="replace").strip()
    if check and proc.returncode != 0:
        raise PluginError(f"{' '.join(cmd)} failed ({proc.returncode}): {text}")
    return proc.returncode or 0, text


def free_nbd_device() -> str:
    for i in range(256):
        if not os.path.exists(f"/sys/block/nbd{i}"):
            break
        # The kernel publishes the serving process' pid only while a device is connected.
        if not os.path.exists(f"/sys/block/nbd{i}/pid"):
            return f"/dev/nbd{i}"
    raise PluginError("no free /dev/nbd* device (load nbd with more nbds_max)")


class VolumePlugin:
    def __init__(self, svc: Service, node_name: str, data_dir: str) -> None:
        if not data_dir:
            raise InvalidArgument("the Docker volume plugin needs --data-dir (mount points)")
        self.svc = svc
        self.node_name = node_name
        self.mount_root = Path(inside(data_dir, "docker"))
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
            if name in self.mounts:
                self.mounts[name].ids.add(caller)
                return {"Mountpoint": self.mounts[name].path}
            await self.svc.volume(name)  # unknown volume: fail before anything else
            why = nbd_client_available()
            if why is not None:
                raise PluginError(why)
            m = await self._attach_and_mount(name)
            m.ids.add(caller)
            self.mounts[name] = m
            return {"Mountpoint": m.path}

    async def unmount(self, req: dict[str, Any]) -> dict[str, Any]:
        name = self._name(req)
        async with self._lock:
            m = self.mounts.get(name)
            if m is None:
                return {}
            m.ids.discard(str(req.get("ID", "")))
            if m.ids:
                return {}  # another container still uses it
            await run("umount", m.path)
            await run("nbd-client", "-d", m.device)
            del self.mounts[name]
            await self.svc.detach(name)
            await self.svc.wait_detached(name, ATTACH_TIMEOUT)
            return {}

    async def _attach_and_mount(self, name: str) -> Mounted:
        node = await self.svc.find_node(self.node_name)
        await self.svc.attach(name, node.name)
        device = ""
        try:
            view = await self.svc.wait_attached(name, node.id, ATTACH_TIMEOUT)
            uri = urlparse((await self.svc.inspect(view))["nbd_uri"])
            device = free_nbd_device()
            await run("nbd-client", uri.hostname or node.address, str(uri.port), device, "-N", name)
            code, _ = await run("blkid", "-o", "value", "-s", "TYPE", device, check=False)
            if code == 2:  # blkid: no filesystem found; a new volume reads as zeros
                await run("mkfs.ext4", "-q", device)
            inside(str(self.mount_root), name)  # refuses a name that would leave --data-dir
            path = self.mount_root / name
            path.mkdir(parents=True, exist_ok=True)
            await run("mount", device, str(path))
            return Mounted(device, str(path))
        except BaseException:
            # Nothing half-done: a failed Mount leaves the volume detached, as before.
            with contextlib.suppress(Exception):
                if device:
                    await run("nbd-client", "-d", device, check=False)
                await self.svc.detach(name)
            raise


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
    runner = web.AppRunner(build_plugin_app(plugin), access_log=None)
    await runner.setup()
    _prepare_socket_path(socket_path)
    await web.UnixSite(runner, socket_path).start()
    log.info("Docker volume plugin listening on %s", socket_path)
    return runner
