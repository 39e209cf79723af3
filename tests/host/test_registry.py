"""The stateful-container scenario from end to end: a Docker registry storing on a mounted
3-replica volume; a snapshot and a backup of it; its node killed -9 during a second push and
its host's mount torn down; the volume mounted on another host, fsck clean, the first image
pulled with the same digests; the restored backup and the cloned snapshot each serve it too.

Each step is timed (printed at the end; the README quotes a run)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster
from tests.harness.host import HostEnv, sh, wait_for
from tests.harness.registry import Registry, blob_count, build_image
from tests.harness.s3 import S3_BUCKET

pytestmark = pytest.mark.skipif(
    shutil.which("docker-registry") is None or shutil.which("skopeo") is None,
    reason="docker-registry and skopeo are not installed (scripts/install.sh installs them)",
)


class Timer:
    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.steps.append((what, time.monotonic() - t0))

    def report(self) -> str:
        return "\n".join(f"| {what} | {s:.1f} s |" for what, s in self.steps)


@pytest.mark.timeout(600)
def test_registry_on_a_volume_survives_its_host(
    host: HostEnv, hcluster3: Cluster, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    c = hcluster3
    t = Timer()
    registries: list[Registry] = []
    try:
        _scenario(c, host, tmp_path, t, registries)
    finally:
        for r in registries:
            r.stop(kill=True)
        print("\nregistry scenario timings:\n" + t.report())


def _scenario(c: Cluster, host: HostEnv, tmp: Path, t: Timer, registries: list[Registry]) -> None:
    first = build_image(tmp / "img-a", "v1", layers=3, layer_size=2 << 20, seed=1)
    second = tmp / "img-b"
    build_image(second, "v2", layers=4, layer_size=12 << 20, seed=2)
    backups = f"s3://{S3_BUCKET}/registry-{tmp.name}"  # a real S3 server (s3_env)

    def serve(root: Path) -> Registry:
        r = Registry(tmp, root)
        registries.append(r)
        r.start()
        return r

    def fsck_then_mount(volume: str, path: Path, node: str, on: str) -> None:
        """Checked before it is mounted (fsck -fn: read only, must be clean), then mounted."""
        dev = c.cli("volume", "map", volume, "--node", node, *host.on(on)).stdout.strip()
        sh("fsck.ext4", "-fn", dev)
        c.cli("volume", "mount", volume, str(path), "--node", node, *host.on(on))

    with t.step("create a 3-replica volume, mount it (mkfs.ext4 on first use)"):
        c.cli("volume", "create", "reg", "--size", "512M", "--repl", "3")
        m1 = tmp / "m1"
        c.cli("volume", "mount", "reg", str(m1), "--node", "n1")
    with t.step("start the registry on it, push image A (3 x 2 MiB layers)"):
        r1 = serve(m1)
        push = r1.push(tmp / "img-a", "v1", "app/a")
        out, _ = push.communicate(timeout=120)
        assert push.returncode == 0, out
    with t.step("snapshot (fsfreeze around it)"):
        sh("fsfreeze", "--freeze", str(m1))
        try:
            c.cli("volume", "snapshot", "create", "reg", "--name", "s1")
        finally:
            sh("fsfreeze", "--unfreeze", str(m1))
    with t.step("backup of the snapshot (S3)"):
        b = c.cli_json("backup", "create", "reg", "--snapshot", "s1", "--target", backups)
    with t.step("kill -9 the serving node during a second push; its host's mount torn down"):
        push = r1.push(second, "v2", "app/b")
        before = blob_count(m1)
        wait_for(lambda: blob_count(m1) > before, 60, "the second push storing blobs")
        c.kill("n1")
        # The registry dies with its host. It may be in the middle of a write to the
        # filesystem of the dead node's device, uninterruptible until the host's mount is
        # torn down: signal it, tear down, and only then wait for it.
        r1.signal_kill()
        push.kill()
        host.crash("reg")
        r1.stop(kill=True)
        push.wait(10)
    with t.step("n1's lease expires (seen down)"):
        wait_for(lambda: not c.node_state("n1")["up"], 30, "n1 down")
    m2 = tmp / "m2"
    with t.step("volume mount on n2: take over, replay the journal"):
        c.cli("volume", "mount", "reg", str(m2), "--node", "n2", *host.on("h2"), timeout=120)
    with t.step("fsck -fn after the takeover (unmount, map, fsck, mount)"):
        c.cli("volume", "unmount", "reg", *host.on("h2"))
        fsck_then_mount("reg", m2, "n2", "h2")
    with t.step("registry on n2's host serves image A with the same digests"):
        r2 = serve(m2)
        assert r2.pull("app/a", "v1", tmp / "pull-2") == first
    with t.step("restore the backup to a new volume"):
        c.cli("backup", "restore", b["id"], "--target", backups, "--name", "reg-restored")
    with t.step("mount the restored volume on n3 (fsck first); it serves image A"):
        m3 = tmp / "m3"
        fsck_then_mount("reg-restored", m3, "n3", "h3")
        assert serve(m3).pull("app/a", "v1", tmp / "pull-3") == first
    with t.step("clone the snapshot; mount it on n3 (fsck first); it serves image A"):
        c.cli("volume", "clone", "reg", "--snapshot", "s1", "--name", "reg-clone", "--repl", "2")
        m4 = tmp / "m4"
        fsck_then_mount("reg-clone", m4, "n3", "h3")
        assert serve(m4).pull("app/a", "v1", tmp / "pull-4") == first
    for r in registries:
        r.stop()
    with t.step("unmount all three"):
        c.cli("volume", "unmount", "reg", *host.on("h2"))
        c.cli("volume", "unmount", str(m3), *host.on("h3"))
        c.cli("volume", "unmount", str(m4), *host.on("h3"))
    assert c.cli_json("device", "list", *host.on("h3")) == []
