"""The Docker volume plugin protocol, spoken over the unix socket of a real node started with
`cluster join --docker-plugin-socket`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness.cluster import Cluster


class PluginClient:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = str(socket_path)

    def __call__(self, endpoint: str, body: Any = None) -> dict[str, Any]:
        return asyncio.run(self._post(endpoint, body))

    async def _post(self, endpoint: str, body: Any) -> dict[str, Any]:
        connector = aiohttp.UnixConnector(path=self.socket_path)
        async with aiohttp.ClientSession(connector=connector) as session:
            raw = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
            headers = {"Content-Type": "application/vnd.docker.plugins.v1.2+json"}
            async with session.post(
                f"http://plugin{endpoint}", data=raw.encode(), headers=headers
            ) as r:
                assert r.status == 200, await r.text()
                reply: dict[str, Any] = await r.json(content_type=None)
                return reply


@pytest.fixture
def plugin(cluster: Cluster, tmp_path: Path) -> PluginClient:
    sock = tmp_path / "plugins" / "pxcluster.sock"
    cluster.add_node("n1", disk_size=4 << 30, extra=("--docker-plugin-socket", str(sock)))
    return PluginClient(sock)


@pytest.mark.timeout(120)
def test_protocol_maps_to_cluster_volumes(cluster: Cluster, plugin: PluginClient) -> None:
    assert plugin("/Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert plugin("/VolumeDriver.Capabilities", {}) == {
        "Capabilities": {"Scope": "global"},
        "Err": "",
    }
    ok = plugin("/VolumeDriver.Create", {"Name": "reg", "Opts": {"size": "64M", "repl": "1"}})
    assert ok == {"Err": ""}
    info = cluster.inspect("reg")
    assert info["size"] == 64 << 20 and info["repl"] == 1
    # Docker calls Create for volumes it has not seen on this host: an existing one is fine.
    assert plugin("/VolumeDriver.Create", {"Name": "reg", "Opts": {}}) == {"Err": ""}
    assert plugin("/VolumeDriver.Create", {"Name": "dflt"}) == {"Err": ""}
    assert cluster.inspect("dflt")["size"] == 1 << 30

    for bad, why in [
        ({"Name": "../etc"}, "invalid volume name"),
        ({"Name": "x", "Opts": {"color": "red"}}, "unknown option(s) color"),
        ({"Name": "x", "Opts": {"size": "lots"}}, "invalid size"),
        ({"Name": "x", "Opts": {"repl": "9"}}, "must be 1, 2 or 3"),
        ({"Name": "x", "Opts": {"repl": "two"}}, "invalid repl"),
    ]:
        assert why in plugin("/VolumeDriver.Create", bad)["Err"], bad
    assert "not valid JSON" in plugin("/VolumeDriver.Create", "{")["Err"]

    listed = plugin("/VolumeDriver.List", {})
    assert listed["Err"] == ""
    assert listed["Volumes"] == [
        {"Name": "dflt", "Mountpoint": ""},
        {"Name": "reg", "Mountpoint": ""},
    ]
    got = plugin("/VolumeDriver.Get", {"Name": "reg"})
    assert got["Err"] == "" and got["Volume"]["Name"] == "reg"
    assert got["Volume"]["Status"]["state"] == "detached"
    assert "unknown volume 'nope'" in plugin("/VolumeDriver.Get", {"Name": "nope"})["Err"]
    assert plugin("/VolumeDriver.Path", {"Name": "reg"}) == {"Mountpoint": "", "Err": ""}
    assert plugin("/VolumeDriver.Unmount", {"Name": "reg", "ID": "c1"}) == {"Err": ""}
    assert "unknown volume" in plugin("/VolumeDriver.Mount", {"Name": "nope", "ID": "c1"})["Err"]

    assert plugin("/VolumeDriver.Remove", {"Name": "dflt"}) == {"Err": ""}
    assert plugin("/VolumeDriver.Remove", {"Name": "reg"}) == {"Err": ""}
    assert plugin("/VolumeDriver.List", {})["Volumes"] == []
    # The node frees both volumes' chunks (a node stopped while it does so hangs in its stop).
    cluster.wait_for(
        lambda: cluster.log_tail("n1", 50).count("chunks freed") == 2, 20, "chunks freed"
    )


# Mount, Unmount and their re-establishment after a node restart: tests/host/test_docker_plugin.py
