"""A block device for an NBD URI on this host, and its removal.

Two ways, the same guarantees:
- `kernel`: the kernel NBD client (`nbd-client` on a free /dev/nbdN, -persist so it reconnects).
- `nbdfuse`: where the host has no kernel NBD (no /dev/nbd*, as in many containers and VMs):
  libnbd's nbdfuse exposes the export as a file in a private FUSE mount, a loop device turns
  that file into /dev/loopN. nbdfuse runs nbdkit's nbd plugin under the retry filter, because
  nbdfuse alone never reconnects: a node daemon restart would leave the device answering EIO
  forever, where the retry filter holds the I/O and reconnects (the application sees a pause).
  Flushes reach the export: the loop device has a volatile write cache, so a filesystem's
  flush (and a FUA write, which the block layer turns into write + flush) becomes fsync on the
  FUSE file, which nbdfuse sends as NBD_CMD_FLUSH.

The nbdfuse process is started in its own session: it outlives the command that made it and
the node daemon (whose restart it rides out), and belongs to the device until unmap.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

from pxcluster.host.errors import CommandFailed, NoBlockPath
from pxcluster.host.proc import pid_alive, run
from pxcluster.host.registry import DeviceRecord

# How long the retry filter holds I/O while the export is away (a daemon restart takes a few
# seconds; the attach node's lease is 5 s by default). After that the device fails its I/O,
# so a host whose node died for good does not hang its applications forever.
RETRY_SECONDS = 120
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Backend:
    method: str  # "kernel" | "nbdfuse"


def kernel_missing() -> str | None:
    if not os.path.exists("/dev/nbd0"):
        return "no /dev/nbd0 (modprobe nbd)"
    if shutil.which("nbd-client") is None:
        return "nbd-client is not installed"
    return None


def nbdfuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("nbdfuse", "nbdkit", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop devices)"
    return None


def choose(uri: str = "") -> Backend:
    """The kernel NBD client where the host has it (and the URI is one it speaks), else nbdfuse
    plus a loop device; NoBlockPath, before anything is changed, where neither works."""
    kernel = kernel_missing()
    if kernel is None and not urlsplit(uri).scheme.startswith("nbds"):
        return Backend("kernel")
    fuse = nbdfuse_missing()
    if fuse is None:
        return Backend("nbdfuse")
    raise NoBlockPath(
        f"no way to make a block device on this host: kernel NBD client: {kernel}; "
        f"nbdfuse: {fuse} (install libnbd-bin and nbdkit, or load the nbd module)"
    )


def fuse_dir(state: Path, volume: str) -> Path:
    return state / "fuse" / volume


async def map_uri(backend: Backend, uri: str, volume: str, state: Path) -> DeviceRecord:
    if backend.method == "kernel":
        return await _map_kernel(uri, volume)
    return await _map_nbdfuse(uri, volume, state)


async def unmap(rec: DeviceRecord) -> None:
    if rec.method == "kernel":
        await run("nbd-client", "-d", rec.device)
        return
    if rec.device and loop_backing(rec.device) == rec.fuse_file:
        await run("losetup", "-d", rec.device)
    await _stop_nbdfuse(rec)


def state_of(rec: DeviceRecord) -> str:
    """ "connected": the device is there and its connection process runs (it may be holding
    I/O while it reconnects); "disconnected": the device or the process is gone."""
    if rec.method == "kernel":
        name = os.path.basename(rec.device)
        return "connected" if os.path.exists(f"/sys/block/{name}/pid") else "disconnected"
    if pid_alive(rec.pid) and loop_backing(rec.device) == rec.fuse_file:
        return "connected"
    return "disconnected"


def loop_backing(device: str) -> str:
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return ""


# --- kernel


def _free_nbd() -> str:
    for i in range(1024):
        if not os.path.exists(f"/sys/block/nbd{i}"):
            break
        # The kernel publishes the serving process' pid only while a device is connected.
        if not os.path.exists(f"/sys/block/nbd{i}/pid"):
            return f"/dev/nbd{i}"
    raise NoBlockPath("no free /dev/nbd* device (load nbd with a larger nbds_max)")


def kernel_command(uri: str, volume: str, device: str) -> list[str]:
    """nbd-client's arguments for a plain NBD URI (TLS URIs go through nbdfuse)."""
    u = urlsplit(uri)
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket", [""])[0]
        return ["nbd-client", "-N", volume, "-u", sock, device, "-persist"]
    if u.scheme == "nbd":
        host = (u.hostname or "127.0.0.1").strip("[]")
        return ["nbd-client", "-N", volume, host, str(u.port or 10809), device, "-persist"]
    raise NoBlockPath(f"the kernel NBD client cannot use {u.scheme}:// URIs")


async def _map_kernel(uri: str, volume: str) -> DeviceRecord:
    device = _free_nbd()
    await run(*kernel_command(uri, volume, device))
    return DeviceRecord(volume, "", "kernel", device, uri, created=time.time())


# --- nbdfuse


def nbdfuse_command(uri: str, file: Path) -> list[str]:
    return [
        "nbdfuse",
        str(file),
        "--command",
        "nbdkit",
        "-s",
        "--exit-with-parent",
        "--filter=retry",
        "nbd",
        f"uri={uri}",
        f"retries={RETRY_SECONDS}",
        "retry-delay=1",
        "retry-exponential=no",
    ]


async def _map_nbdfuse(uri: str, volume: str, state: Path) -> DeviceRecord:
    d = fuse_dir(state, volume)
    file = d / volume
    log = _prepare_fuse_dir(d, volume)
    try:
        proc = await asyncio.create_subprocess_exec(
            *nbdfuse_command(uri, file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    finally:
        log.close()
    rec = DeviceRecord(volume, "", "nbdfuse", "", uri, str(file), proc.pid, created=time.time())
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not file.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise CommandFailed(
                    f"nbdfuse did not expose {uri} within {START_TIMEOUT:.0f}s "
                    f"(see {d.parent / (volume + '.log')})"
                )
            try:
                await asyncio.wait_for(proc.wait(), 0.05)
            except TimeoutError:
                pass
        # Direct I/O: the loop device writes straight to the FUSE file instead of keeping a
        # second copy of every block in the page cache.
        _, out = await run("losetup", "--find", "--show", "--direct-io=on", str(file))
        rec.device = out.strip()
        return rec
    except BaseException:
        await _stop_nbdfuse(rec)
        raise


def _prepare_fuse_dir(d: Path, volume: str) -> BinaryIO:
    if _mounted(str(d)):
        raise CommandFailed(f"{d} is still mounted from an earlier map; unmap {volume} first")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return open(d.parent / f"{volume}.log", "ab")


def _fuse_mounted(rec: DeviceRecord) -> str:
    """The FUSE mount of an nbdfuse device, if it is still mounted ("" otherwise). Read from
    mountinfo: os.path.ismount says False for a FUSE mount whose process died (ENOTCONN)."""
    if not rec.fuse_file:
        return ""
    d = str(Path(rec.fuse_file).parent)
    return d if _mounted(d) else ""


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].replace("\\040", " ") == path for line in f)


async def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not pid_alive(pid):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


async def _stop_nbdfuse(rec: DeviceRecord) -> None:
    """Unmount the FUSE file (nbdfuse then exits). The loop device may let go of the file a
    moment after `losetup -d` (it finishes in-flight I/O first), so the unmount is retried
    until it succeeds, within STOP_TIMEOUT; an nbdfuse stuck retrying a gone export is killed."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        d = _fuse_mounted(rec)
        if d:
            await run("umount", d, check=False)
        elif not pid_alive(rec.pid):
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    _kill_group(rec.pid, signal.SIGKILL)
    await _wait_exit(rec.pid, STOP_TIMEOUT)
    d = _fuse_mounted(rec)
    if d:
        await run("umount", "-l", d, check=False)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # nbdfuse leads its own session: its nbdkit goes with it
    except (ProcessLookupError, PermissionError):
        pass


async def teardown_dead(rec: DeviceRecord) -> None:
    """A host-death teardown: the connection is cut at once (SIGKILL to nbdfuse and its
    nbdkit), so whatever the filesystem still had unflushed is lost, as it would be with the
    host's power; the loop device and the FUSE mount are then removed."""
    if rec.method == "kernel":
        await run("nbd-client", "-d", rec.device, check=False)
        return
    _kill_group(rec.pid, signal.SIGKILL)
    await _wait_exit(rec.pid, STOP_TIMEOUT)
    d = _fuse_mounted(rec)
    if d:
        await run("umount", "-l", d, check=False)
