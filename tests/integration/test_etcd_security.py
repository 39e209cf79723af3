"""Etcd client TLS (with client certificates) and etcd users, against a real etcd."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster, pxcluster
from tests.harness.etcd import EtcdServer
from tests.harness.tls import CertFiles, TestCA

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed")


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def nbd_size(uri: str) -> int:
    if shutil.which("nbdinfo") is None:
        pytest.skip("nbdinfo is not installed")
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca = TestCA(tmp / "pki", "etcd-ca")
        self.server = self.ca.issue("etcd-server", ips=("127.0.0.1",), dns=("localhost",))
        self.client = self.ca.issue("pxc-client")
        self.other_ca = TestCA(tmp / "pki-other", "other-ca")
        self.stranger = self.other_ca.issue("stranger")

    def client_args(self, client: CertFiles | None = None, ca: Path | None = None) -> list[str]:
        c = client or self.client
        return [
            "--etcd-cacert",
            str(ca or self.ca.path),
            "--etcd-cert",
            str(c.cert),
            "--etcd-key",
            str(c.key),
        ]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def tls_etcd(tmp_path: Path, pki: Pki) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd", tls=(pki.server.cert, pki.server.key, pki.ca.path))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_tls_node_joins_and_serves_a_volume(tmp_path: Path, pki: Pki, tls_etcd: EtcdServer) -> None:
    assert tls_etcd.url.startswith("https://")
    c = Cluster(tmp_path, tls_etcd, global_args=tuple(pki.client_args()))
    try:
        c.add_node("n1")
        info = c.cli_json("volume", "create", "tlsvol", "--size", "16M", "--repl", "1")
        assert info["state"] == "detached"
        uri = c.attach("tlsvol", "n1")
        assert nbd_size(uri) == 16 << 20
        assert c.inspect("tlsvol")["attached_node"] == "n1"
    finally:
        c.close()


@pytest.mark.timeout(90)
def test_tls_refusals_are_one_line(tmp_path: Path, pki: Pki, tls_etcd: EtcdServer) -> None:
    url = tls_etcd.url
    # The right client certificate, but a CA that did not sign etcd's certificate.
    wrong_ca = pxcluster(
        url,
        "t",
        "node",
        "list",
        check=False,
        global_args=tuple(pki.client_args(ca=pki.other_ca.path)),
    )
    assert "unreachable" in one_error_line(wrong_ca)
    # Verifies etcd, but presents no client certificate (etcd has --client-cert-auth).
    no_cert = pxcluster(
        url, "t", "node", "list", check=False, global_args=("--etcd-cacert", str(pki.ca.path))
    )
    one_error_line(no_cert)
    # A client certificate from another CA.
    stranger = pxcluster(
        url, "t", "node", "list", check=False, global_args=tuple(pki.client_args(pki.stranger))
    )
    one_error_line(stranger)
    # TLS files against a plain http URL, half a pair, a missing file: refused before dialling.
    http = pxcluster(
        url.replace("https://", "http://"),
        "t",
        "node",
        "list",
        check=False,
        global_args=tuple(pki.client_args()),
    )
    assert "https://" in one_error_line(http)
    half = pxcluster(
        url, "t", "node", "list", check=False, global_args=("--etcd-cert", str(pki.client.cert))
    )
    assert "--etcd-key" in one_error_line(half)
    missing = pxcluster(
        url, "t", "node", "list", check=False, global_args=("--etcd-cacert", "/nonexistent/ca")
    )
    assert "no such file" in one_error_line(missing)
    # cluster join reports it the same way and exits.
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    join = pxcluster(
        url,
        "t",
        "cluster",
        "join",
        "--name",
        "x",
        "--address",
        "127.0.0.1",
        "--disk",
        str(disk),
        check=False,
        global_args=tuple(pki.client_args(ca=pki.other_ca.path)),
        timeout=30,
    )
    assert "cannot join" in one_error_line(join)


@pytest.fixture
def auth_etcd(etcd: EtcdServer, tmp_path: Path) -> tuple[EtcdServer, Path]:
    if shutil.which("etcdctl") is None:
        pytest.skip("etcdctl is not installed")
    etcd.etcdctl("user", "add", "root:s3cret-pw", "--interactive=false")
    etcd.etcdctl("auth", "enable")
    pw = tmp_path / "etcd-password"
    pw.write_text("s3cret-pw\n")
    pw.chmod(0o600)
    return etcd, pw


@pytest.mark.timeout(150)
def test_auth_user_password_node_and_cli(
    tmp_path: Path, auth_etcd: tuple[EtcdServer, Path]
) -> None:
    etcd, pw = auth_etcd
    creds = ("--etcd-user", "root", "--etcd-password-file", str(pw))
    c = Cluster(tmp_path, etcd, global_args=creds)
    try:
        c.add_node("n1")
        c.cli_json("volume", "create", "authvol", "--size", "16M", "--repl", "1")
        assert nbd_size(c.attach("authvol", "n1")) == 16 << 20
        # etcd restarts and forgets every token: the node authenticates again and keeps
        # working (its agent still attaches volumes, its lease still renews).
        etcd.stop()
        etcd.start()
        c.cli_json("volume", "create", "after", "--size", "16M", "--repl", "1")
        assert nbd_size(c.attach("after", "n1")) == 16 << 20
        assert c.node_state("n1")["up"]
    finally:
        c.close()
    url = etcd.url
    # The password from the environment works as well.
    env_ok = subprocess.run(
        [*_cli(url), "--etcd-user", "root", "node", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**_env(), "PXC_ETCD_PASSWORD": "s3cret-pw"},
    )
    assert env_ok.returncode == 0, env_ok.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    bad = pxcluster(
        url,
        "t",
        "node",
        "list",
        check=False,
        global_args=("--etcd-user", "root", "--etcd-password-file", str(wrong)),
    )
    assert "refused user 'root'" in one_error_line(bad)
    anonymous = pxcluster(url, "t", "node", "list", check=False)
    assert "--etcd-user" in one_error_line(anonymous)
    no_password = pxcluster(
        url, "t", "node", "list", check=False, global_args=("--etcd-user", "root")
    )
    assert "password" in one_error_line(no_password)


def _cli(url: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "pxcluster.cli", "--etcd", url, "--cluster", "t"]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PXC_")}
