"""Filesystems on a mapped device: probe, make (first use only), mount, unmount, freeze."""

from __future__ import annotations

import os
from pathlib import Path

from pxcluster.host.errors import DeviceInUse, ForeignFilesystem, PathBusy
from pxcluster.host.proc import run

FILESYSTEMS = ("ext4", "xfs")
MKFS_TIMEOUT = 600.0


async def probe(device: str) -> str:
    """What the device holds: a filesystem type, "partition table (gpt)", or "" for nothing.
    Low-level probing (-p), so a cache never hides data written by another host."""
    code, out = await run("blkid", "-p", "-o", "export", device, check=False)
    if code == 2:  # blkid: nothing recognised (a new volume reads as zeros)
        return ""
    if code != 0:
        raise DeviceInUse(f"blkid {device} failed ({code}): {out}")
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    if "TYPE" in fields:
        return fields["TYPE"]
    if "PTTYPE" in fields:
        return f"partition table ({fields['PTTYPE']})"
    return "unknown data"


def check_fs(volume: str, found: str, wanted: str | None) -> str:
    """The filesystem to mount: what the volume holds if it is one we mount (and the one asked
    for, if any), the one asked for (or ext4) on an empty volume; anything else is refused."""
    if not found:
        return wanted or "ext4"
    if found not in FILESYSTEMS:
        raise ForeignFilesystem(
            f"volume {volume} holds {found}, not ext4 or xfs: refusing to mount or format it"
        )
    if wanted is not None and found != wanted:
        raise ForeignFilesystem(
            f"volume {volume} holds an {found} filesystem, not {wanted}: refusing to format "
            f"over it (mount it with --fs {found})"
        )
    return found


def check_mount_path(path: Path) -> None:
    """Only an empty directory that is not a mount point (or a path not there yet)."""
    if os.path.ismount(path):
        raise PathBusy(f"{path} is already a mount point")
    if path.exists():
        if not path.is_dir():
            raise PathBusy(f"{path} is not a directory")
        if any(path.iterdir()):
            raise PathBusy(f"{path} is not empty: mounting there would hide its files")


async def mkfs(device: str, fs: str, label: str) -> None:
    # No discard at mkfs: a new thin volume already reads as zeros, and trimming every
    # chunk only costs time.
    if fs == "ext4":
        await run(
            "mkfs.ext4", "-q", "-E", "nodiscard", "-L", label[:16], device, timeout=MKFS_TIMEOUT
        )
    else:
        await run("mkfs.xfs", "-q", "-K", "-L", label[:12], device, timeout=MKFS_TIMEOUT)


async def mount(device: str, path: Path, fs: str) -> None:
    _make_dir(path)
    # xfs refuses a second filesystem with the same UUID: a clone or a restored backup of a
    # volume mounted on this host is one.
    opts = ["-o", "nouuid"] if fs == "xfs" else []
    await run("mount", "-t", fs, *opts, device, str(path))


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


async def unmount(path: str, volume: str) -> None:
    """sync, then umount; a busy filesystem stays mounted and says so."""
    await run("sync", "-f", path, check=False)
    code, out = await run("umount", path, check=False)
    if code != 0:
        if "busy" in out:
            raise DeviceInUse(
                f"volume {volume} is in use at {path} (a process has files open there); "
                "nothing was changed"
            )
        raise DeviceInUse(f"umount {path} failed ({code}): {out}")


def mounted_at(device: str) -> str:
    """Where the device is mounted on this host ("" if nowhere), from /proc/self/mountinfo."""
    try:
        real = os.path.realpath(device)
        st = os.stat(real)
    except OSError:
        return ""
    want = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[2] == want:
                return parts[4].replace("\\040", " ")
    return ""


async def freeze(path: str) -> None:
    await run("fsfreeze", "--freeze", path)


async def thaw(path: str) -> None:
    await run("fsfreeze", "--unfreeze", path)
