"""A real stateful application for tests: Debian's `docker-registry` (the Go distribution
registry) storing on a directory, and OCI images built here from random layers (nothing can be
pulled from outside), pushed and pulled with skopeo."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.etcd import free_port

START_TIMEOUT = 30.0


def build_image(layout: Path, tag: str, layers: int, layer_size: int, seed: int) -> list[str]:
    """An OCI image layout at `layout` (tag `tag`) of `layers` gzipped layers, each one file of
    random bytes; returns its blob digests (config, layers, manifest last)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    rnd = __import__("random").Random(seed)
    layer_descs, diff_ids = [], []
    for i in range(layers):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            payload = rnd.randbytes(layer_size)
            info = tarfile.TarInfo(f"data/layer{i}.bin")
            info.size = len(payload)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
        diff_ids.append("sha256:" + hashlib.sha256(raw.getvalue()).hexdigest())
        gz = gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)
        layer_descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": put(gz),
                "size": len(gz),
            }
        )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": layer_descs,
        }
    ).encode()
    mdigest = put(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    cfg = json.loads(manifest)["config"]["digest"]
    return [cfg, *(d["digest"] for d in layer_descs), mdigest]


class Registry:
    """`docker-registry serve` on 127.0.0.1, storing under `root`."""

    def __init__(self, workdir: Path, root: Path) -> None:
        self.port = free_port("127.0.0.1")
        self.root = root
        self.config = workdir / f"registry-{self.port}.yml"
        self.log = workdir / f"registry-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n"
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"registry did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def signal_kill(self) -> None:
        """SIGKILL, not waited for (see stop)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def push(self, layout: Path, tag: str, repo: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--dest-tls-verify=false",
                f"oci:{layout}:{tag}",
                f"docker://{self.address}/{repo}:{tag}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def pull(self, repo: str, tag: str, layout: Path) -> list[str]:
        """Pull into an OCI layout; returns its blob digests, read from what arrived."""
        subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--src-tls-verify=false",
                f"docker://{self.address}/{repo}:{tag}",
                f"oci:{layout}:{tag}",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        index = json.loads((layout / "index.json").read_text())
        mdigest = index["manifests"][0]["digest"]
        manifest = json.loads((layout / "blobs" / "sha256" / mdigest.split(":")[1]).read_bytes())
        digests = [manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])]
        for d in [*digests, mdigest]:  # every blob is what its digest says
            data = (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == d, d
        return [*digests, mdigest]


def blob_count(root: Path) -> int:
    blobs = root / "docker" / "registry" / "v2" / "blobs"
    return sum(1 for _ in blobs.rglob("data")) if blobs.exists() else 0
