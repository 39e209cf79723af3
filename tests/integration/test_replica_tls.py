"""TLS with client certificates on the replica port."""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replica.client import ReplicaClient
from replica.errors import ReplicaUnavailable
from replica.tls import TlsFiles, client_context
from tests.harness.cluster import Cluster
from tests.harness.etcd import EtcdServer
from tests.harness.replica_proc import TEST_KEY, ReplicaProc
from tests.harness.tls import TestCA


def tool(*cmd: str, timeout: float = 60) -> bytes:
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} is not installed")
    res = subprocess.run(cmd, capture_output=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr.decode()[-500:]}"
    return res.stdout


@pytest.fixture
def tls_cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[tuple[Cluster, TestCA]]:
    ca = TestCA(tmp_path / "pki", "replica-ca")
    c = Cluster(tmp_path, etcd)
    try:
        for i, name in enumerate(("n1", "n2", "n3"), start=1):
            # The address Cluster.add_node gives node i: its certificate must name it.
            address = f"127.0.{c.subnet % 250 + 2}.{i}"
            files = ca.issue(name, ips=(address,))
            extra = (
                "--data-tls-cert",
                str(files.cert),
                "--data-tls-key",
                str(files.key),
                "--data-tls-ca",
                str(ca.path),
            )
            node = c.add_node(name, extra=extra)
            assert node.address == address
        yield c, ca
    finally:
        c.close()


@pytest.mark.timeout(150)
async def test_tls_cluster_serves_a_volume_and_refuses_clients_without_a_cert(
    tls_cluster: tuple[Cluster, TestCA], tmp_path: Path
) -> None:
    c, ca = tls_cluster
    c.cli_json("volume", "create", "secure", "--size", "32M", "--repl", "3")
    uri = c.attach("secure", "n1")
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(4 << 20))
    tool("nbdcopy", str(src), uri)
    out = tool("nbdcopy", uri, "-")
    assert hashlib.sha256(out[: 4 << 20]).digest() == hashlib.sha256(src.read_bytes()).digest()
    # Every write reached the two remote replicas over TLS: all three stay in sync.
    assert set(c.replica_states("secure").values()) == {"in_sync"}
    # Move it: n2's engine now talks TLS to n1 and n3.
    c.cli("volume", "detach", "secure")
    uri2 = c.attach("secure", "n2")
    assert tool("nbdcopy", uri2, "-")[: 4 << 20] == src.read_bytes()

    n2 = c.nodes["n2"]
    port = n2.ports["data"]
    # A client with the right CA and a certificate from it gets through.
    member = ca.issue("member")
    ok = ReplicaClient(
        n2.address,
        port,
        timeout=5,
        key=c.replica_key(),
        tls=client_context(TlsFiles(str(member.cert), str(member.key), str(ca.path))),
    )
    try:
        assert (await ok.stats()) is not None
    finally:
        await ok.close()
    # Verifies the server but presents no certificate: refused.
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cafile=str(ca.path))
    # A certificate from another CA: refused.
    other = TestCA(tmp_path / "other", "other-ca")
    stranger = other.issue("stranger")
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_verify_locations(cafile=str(ca.path))
    foreign.load_cert_chain(str(stranger.cert), str(stranger.key))
    for ctx in (no_cert, foreign, None):  # None: plain TCP against the TLS port
        client = ReplicaClient(
            n2.address, port, timeout=3, connect_timeout=3, tls=ctx, key=c.replica_key()
        )
        try:
            with pytest.raises(ReplicaUnavailable):
                await client.stats()
        finally:
            await client.close()
    # The volume is still served.
    assert tool("nbdinfo", "--size", uri2).strip() == str(32 << 20).encode()


@pytest.mark.timeout(60)
async def test_replica_server_process_with_tls(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki", "ca")
    srv = ca.issue("server", ips=("127.0.0.1",))
    proc = ReplicaProc(
        tmp_path,
        extra_args=(
            "--tls-cert",
            str(srv.cert),
            "--tls-key",
            str(srv.key),
            "--tls-ca",
            str(ca.path),
        ),
    )
    proc.start()
    try:
        cl = ca.issue("client")
        tls = client_context(TlsFiles(str(cl.cert), str(cl.key), str(ca.path)))
        client = ReplicaClient(proc.host, proc.port, timeout=5, tls=tls, key=TEST_KEY)
        try:
            await client.open("v", 1, 8 << 20, 4 << 20)
            await client.write("v", 1, 0, 0, memoryview(b"x" * 4096), seq=1, durable=True)
            assert await client.read("v", 1, 0, 0, 4096) == b"x" * 4096
        finally:
            await client.close()
        # A server certificate that does not name the address dialled is refused by the client.
        wrong_name = ca.issue("elsewhere", ips=("10.9.9.9",))
        (tmp_path / "two").mkdir()
        proc2 = ReplicaProc(
            tmp_path / "two",
            extra_args=(
                "--tls-cert",
                str(wrong_name.cert),
                "--tls-key",
                str(wrong_name.key),
                "--tls-ca",
                str(ca.path),
            ),
        )
        proc2.start()
        try:
            bad = ReplicaClient(proc2.host, proc2.port, timeout=3, tls=tls, key=TEST_KEY)
            try:
                with pytest.raises(ReplicaUnavailable):
                    await bad.stats()
            finally:
                await bad.close()
        finally:
            proc2.kill()
    finally:
        proc.kill()
