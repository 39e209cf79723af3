"""map, unmap, mount, unmount: the host steps in order, each undone if a later one fails, so a
failed command leaves the volume and the host as they were."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pxcluster.host import fs, mapper
from pxcluster.host.cluster import attach_here, local_node, release
from pxcluster.host.errors import DeviceInUse, NotMapped, PathBusy
from pxcluster.host.proc import run
from pxcluster.host.registry import DeviceRecord, Registry
from pxcluster.service.core import Service


@dataclass
class Host:
    """This host's device layer: the cluster (through the service) and the registry."""

    svc: Service
    registry: Registry

    # --- map / unmap

    async def map(
        self, name: str, node_name: str | None, *, force: bool = False, owner: str = "cli"
    ) -> DeviceRecord:
        async with self.registry.locked():
            rec, _ = await self._map(name, node_name, force=force, owner=owner)
            return rec

    async def _map(
        self, name: str, node_name: str | None, *, force: bool, owner: str
    ) -> tuple[DeviceRecord, bool]:
        """(the record, mapped by this call)."""
        node = await local_node(self.svc, node_name)
        old = self.registry.get(name)
        if old is not None:
            if old.node == node.name and mapper.state_of(old) == "connected":
                return old, False
            # Left by a crash or a host that lost the export: remove what remains of it.
            await self._drop_stale(old)
        await self.svc.volume(name)  # an unknown volume fails here, before anything changes
        mapper.choose()  # no way to map here: say so before attaching
        uri, attached = await attach_here(self.svc, name, node, force=force)
        try:
            rec = await mapper.map_uri(mapper.choose(uri), uri, name, self.registry.dir)
        except BaseException:
            if attached:
                with contextlib.suppress(Exception):
                    await release(self.svc, name, node.id)
            raise
        rec.node, rec.attached_here, rec.owner = node.name, attached, owner
        self.registry.put(rec)
        return rec, True

    async def _drop_stale(self, rec: DeviceRecord) -> None:
        where = fs.mounted_at(rec.device) if rec.device else ""
        if where:
            raise DeviceInUse(
                f"volume {rec.volume} is still mounted at {where} from a lost connection: "
                f"unmount it (umount -l {where}) first"
            )
        ours = _loop_is_ours(rec)  # read first: a dead FUSE mount changes the backing path
        await mapper.teardown_dead(rec)
        if ours:
            await run("losetup", "-d", rec.device, check=False)
        self.registry.remove(rec.volume)

    async def unmap(self, name: str) -> DeviceRecord:
        async with self.registry.locked():
            rec = self.registry.get(name)
            if rec is None:
                raise NotMapped(f"volume {name} is not mapped on this host")
            where = fs.mounted_at(rec.device)
            if where:
                raise DeviceInUse(
                    f"volume {name} is mounted at {where}: use 'volume unmount {name}'"
                )
            await self._unmap(rec)
            return rec

    async def _unmap(self, rec: DeviceRecord) -> None:
        await mapper.unmap(rec)
        self.registry.remove(rec.volume)
        if rec.attached_here:
            node = await self.svc.find_node(rec.node)
            await release(self.svc, rec.volume, node.id)

    # --- mount / unmount

    async def mount(
        self,
        name: str,
        path: str,
        wanted: str | None,
        node_name: str | None,
        *,
        force: bool = False,
        owner: str = "cli",
    ) -> DeviceRecord:
        target = absolute(path)
        async with self.registry.locked():
            old = self.registry.get(name)
            if old is not None and old.mountpoint and fs.mounted_at(old.device):
                if Path(old.mountpoint) == target:
                    return old
                raise PathBusy(f"volume {name} is already mounted at {old.mountpoint}")
            fs.check_mount_path(target)
            rec, mapped = await self._map(name, node_name, force=force, owner=owner)
            try:
                found = await fs.probe(rec.device)
                kind = fs.check_fs(name, found, wanted)
                if not found:
                    await fs.mkfs(rec.device, kind, name)
                await fs.mount(rec.device, target, kind)
            except BaseException:
                if mapped:
                    with contextlib.suppress(Exception):
                        await self._unmap(rec)
                raise
            rec.mountpoint, rec.fs = str(target), kind
            self.registry.put(rec)
            return rec

    def find(self, name_or_path: str) -> DeviceRecord:
        devices = self.registry.load()
        if name_or_path in devices:
            return devices[name_or_path]
        target = os.path.abspath(name_or_path)
        for rec in devices.values():
            if rec.mountpoint and rec.mountpoint == target:
                return rec
        raise NotMapped(f"{name_or_path}: no volume is mapped or mounted there on this host")

    async def unmount(self, name_or_path: str) -> DeviceRecord:
        async with self.registry.locked():
            rec = self.find(name_or_path)
            where = fs.mounted_at(rec.device)
            if where:
                await fs.unmount(where, rec.volume)
            await self._unmap(rec)
            return rec

    # --- what is here

    def list(self) -> list[dict[str, Any]]:
        return [describe(r) for r in sorted(self.registry.load().values(), key=lambda r: r.volume)]


def _loop_is_ours(rec: DeviceRecord) -> bool:
    return (
        rec.method == "nbdfuse"
        and bool(rec.device)
        and (mapper.loop_backing(rec.device) == rec.fuse_file)
    )


def absolute(path: str) -> Path:
    return Path(os.path.abspath(path))


def describe(rec: DeviceRecord) -> dict[str, Any]:
    return {
        "volume": rec.volume,
        "device": rec.device,
        "mountpoint": fs.mounted_at(rec.device) if rec.device else "",
        "fs": rec.fs,
        "node": rec.node,
        "method": rec.method,
        "state": mapper.state_of(rec),
        "uri": rec.uri,
        "owner": rec.owner,
    }


async def crash_teardown(registry: Registry, name: str) -> None:
    """What a host's death does to its mount, done on purpose (tests, drills): the connection
    is cut first, so nothing more reaches the volume; then the mount, the loop device and the
    FUSE mount go, and the host forgets the device."""
    rec = registry.get(name)
    if rec is None:
        raise NotMapped(f"volume {name} is not mapped on this host")
    ours = _loop_is_ours(rec)  # read first: a dead FUSE mount changes the backing path
    mounted = bool(rec.device) and fs.mounted_at(rec.device) == rec.mountpoint
    await mapper.teardown_dead(rec)
    if mounted:
        await run("umount", "-l", rec.mountpoint, check=False)
    if ours:
        # Detached now, or (if the lazily unmounted filesystem still holds it) as soon as
        # it lets go: losetup -d on a busy loop device sets autoclear.
        await run("losetup", "-d", rec.device, check=False)
    registry.remove(name)
