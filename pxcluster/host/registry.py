"""What is mapped where on this host: one JSON file under the state directory.

The mapping processes (nbdfuse) outlive the command that started them and the node daemon,
so what they are lives on disk: `device list` reads it, unmap/unmount find what to undo in
it, and the Docker plugin re-adopts its mounts from it after a node restart. Every change is
made under an exclusive lock (flock) and written by rename, so two commands never interleave
and a crash never leaves half a file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from pxcluster.host.errors import HostError

STATE_DIR_ENV = "PXC_HOST_STATE_DIR"
DEFAULT_STATE_DIR = "/run/pxcluster/host"
LOCK_TIMEOUT = 180.0  # a mount waits for an attach (60 s) and a mkfs; past this, something hangs
MAX_FILE = 4 << 20  # a registry this large is not ours: refuse to parse it


@dataclass
class DeviceRecord:
    volume: str
    node: str  # the attach node's name
    method: str  # "kernel" (nbd-client) | "nbdfuse" (nbdfuse + nbdkit retry + loop)
    device: str  # /dev/nbdN or /dev/loopN
    uri: str  # the NBD URI the device is connected to (`volume inspect --json`'s nbd_uri)
    fuse_file: str = ""  # nbdfuse: the FUSE file backing the loop device
    pid: int = 0  # nbdfuse: its process
    mountpoint: str = ""
    fs: str = ""
    attached_here: bool = True  # the map attached it, so unmap detaches it
    owner: str = "cli"  # "cli" | "docker": who made it (the plugin re-adopts its own)
    ids: list[str] = field(default_factory=list)  # docker: the containers using the mount
    created: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def state_dir(explicit: str = "") -> Path:
    return Path(explicit or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


class Registry:
    def __init__(self, directory: Path) -> None:
        # Absolute: the paths recorded under it are compared with what the kernel reports
        # (a loop device's backing file), and the CLI runs from any working directory.
        self.dir = Path(os.path.abspath(directory))
        self.file = directory / "devices.json"

    @contextlib.asynccontextmanager
    async def locked(self, timeout: float = LOCK_TIMEOUT) -> AsyncIterator[None]:
        """Held for a whole map/mount/unmount: one change of this host's devices at a time.
        Polled, never a blocking flock: the node daemon's event loop (the Docker plugin) must
        not stall while a command holds it."""
        with self._lock_file() as f:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise HostError(
                            f"another pxcluster command holds {self.dir / 'lock'} "
                            f"for over {timeout:.0f}s"
                        ) from None
                    await asyncio.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lock_file(self) -> TextIO:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return open(self.dir / "lock", "a")

    def load(self) -> dict[str, DeviceRecord]:
        try:
            with open(self.file, "rb") as f:
                raw = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return {}
        if len(raw) > MAX_FILE:
            raise ValueError(f"{self.file}: over {MAX_FILE} bytes")
        data = json.loads(raw) if raw.strip() else {}
        return {k: DeviceRecord.from_dict(v) for k, v in data.get("devices", {}).items()}

    def get(self, volume: str) -> DeviceRecord | None:
        return self.load().get(volume)

    def put(self, rec: DeviceRecord) -> None:
        devices = self.load()
        devices[rec.volume] = rec
        self._write(devices)

    def remove(self, volume: str) -> None:
        devices = self.load()
        if devices.pop(volume, None) is not None:
            self._write(devices)

    def _write(self, devices: dict[str, DeviceRecord]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.file.with_suffix(".tmp")
        body = {"devices": {k: asdict(v) for k, v in sorted(devices.items())}}
        with open(tmp, "w") as f:
            json.dump(body, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.file)
