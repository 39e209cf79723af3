"""Host-side helpers for tests of `volume map|mount`: a private device registry per test, and
a teardown that leaves no loop device, FUSE mount or nbdfuse process behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pxcluster.host import mapper
from pxcluster.host.lifecycle import crash_teardown
from pxcluster.host.registry import Registry


def skip_reason(*tools: str) -> str | None:
    """Why this host cannot run the device tests (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    if mapper.kernel_missing() is not None and mapper.nbdfuse_missing() is not None:
        return f"no block device path: {mapper.nbdfuse_missing()}"
    for tool in ("blkid", "mkfs.ext4", "mount", *tools):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs it)"
    return None


@dataclass
class HostEnv:
    """Hosts simulated on this machine, each with its own device registry: `root/<host>`.
    The default host (PXC_HOST_STATE_DIR for every CLI call) is h1; another host's commands
    pass `*host.on("h2")` (its --state-dir)."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "h1"

    def on(self, name: str) -> tuple[str, str]:
        return ("--state-dir", str(self.root / name))

    def registry(self, name: str = "h1") -> Registry:
        return Registry(self.root / name)

    def crash(self, volume: str, name: str = "h1") -> None:
        """Host `name` dies: its connection is cut, its mount and device vanish."""
        asyncio.run(crash_teardown(self.registry(name), volume))

    def teardown(self) -> None:
        if not self.root.exists():
            return
        for d in sorted(self.root.iterdir()):
            for volume in list(Registry(d).load()):
                try:
                    self.crash(volume, d.name)
                except Exception as e:  # keep tearing down the others
                    print(f"teardown of {volume} on {d.name}: {e}")


def sh(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under root (lost+found left out)."""
    import hashlib

    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith("lost+found"):
            continue
        if p.is_file() and not p.is_symlink():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
