"""The Docker volume plugin's Mount and Unmount, spoken on its unix socket as dockerd does,
through the host layer (nbdfuse + loop here, the kernel NBD client where the host has it), and
its mounts after a node restart."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pxcluster.host.lifecycle import crash_teardown
from pxcluster.host.registry import Registry
from tests.harness.cluster import Cluster
from tests.harness.host import HostEnv
from tests.integration.test_api_docker_plugin import PluginClient


@pytest.fixture
def plugin(host: HostEnv, cluster: Cluster, tmp_path: Path) -> Iterator[PluginClient]:
    sock = tmp_path / "plugins" / "pxcluster.sock"
    n1 = cluster.add_node("n1", disk_size=2 << 30, extra=("--docker-plugin-socket", str(sock)))
    cluster.add_node("n2")
    try:
        yield PluginClient(sock)
    finally:
        registry = Registry(n1.data_dir / "host")
        for volume in list(registry.load()):
            asyncio.run(crash_teardown(registry, volume))


@pytest.mark.timeout(240)
def test_mount_unmount_and_restart(cluster: Cluster, plugin: PluginClient) -> None:
    assert (
        plugin("/VolumeDriver.Create", {"Name": "data", "Opts": {"size": "64M", "repl": "2"}})[
            "Err"
        ]
        == ""
    )
    first = plugin("/VolumeDriver.Mount", {"Name": "data", "ID": "c1"})
    assert first["Err"] == "" and first["Mountpoint"], first
    mnt = Path(first["Mountpoint"])
    assert os.path.ismount(mnt) and cluster.inspect("data")["attached_node"] == "n1"
    second = plugin("/VolumeDriver.Mount", {"Name": "data", "ID": "c2"})
    assert second["Mountpoint"] == first["Mountpoint"]  # one attach for both containers
    assert plugin("/VolumeDriver.Path", {"Name": "data"})["Mountpoint"] == str(mnt)
    (mnt / "hello").write_text("world")
    assert plugin("/VolumeDriver.Unmount", {"Name": "data", "ID": "c1"})["Err"] == ""
    assert (mnt / "hello").read_text() == "world"  # c2 still holds it

    # The node restarts (kill -9): the device holds I/O and reconnects, and the new plugin
    # knows the mount and who uses it.
    cluster.kill("n1")
    cluster.start("n1")
    cluster.wait_for(
        lambda: plugin("/VolumeDriver.Path", {"Name": "data"})["Mountpoint"] == str(mnt),
        60,
        "the plugin to know its mount again",
    )
    (mnt / "after").write_text("restart")
    os.sync()
    assert plugin("/VolumeDriver.Remove", {"Name": "data"})["Err"].endswith("unmount it first")
    assert plugin("/VolumeDriver.Unmount", {"Name": "data", "ID": "c2"})["Err"] == ""
    assert not os.path.ismount(mnt)
    cluster.wait_for(lambda: cluster.inspect("data")["state"] == "detached", 30, "detached")
    again = plugin("/VolumeDriver.Mount", {"Name": "data", "ID": "c3"})
    assert (Path(again["Mountpoint"]) / "hello").read_text() == "world"
    assert (Path(again["Mountpoint"]) / "after").read_text() == "restart"
    assert plugin("/VolumeDriver.Unmount", {"Name": "data", "ID": "c3"})["Err"] == ""


def test_socket_is_root_only(cluster: Cluster, plugin: PluginClient) -> None:
    mode = stat.S_IMODE(os.stat(plugin.socket_path).st_mode)
    assert mode == 0o600, oct(mode)
