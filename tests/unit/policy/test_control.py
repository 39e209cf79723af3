"""Pure parts of the control path: sizes, placement, records."""

from __future__ import annotations

import pytest

from membership.keys import Keys
from membership.records import NodeRecord, VolumeRecord
from pxcluster.errors import InvalidArgument, PlacementError
from pxcluster.policy.placement import Candidate, place
from pxcluster.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("512M", 512 << 20), ("10G", 10 << 30), ("4096", 4096), ("1g", 1 << 30), ("2GiB", 2 << 30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12Q", "", "-1G", "0", "1.5G", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(64 << 20) == "64M"
    assert format_size(1536 << 20) == "1536M"
    assert format_size(1000) == "1000"


def node(name: str, *, state: str = "active", zone: str = "") -> NodeRecord:
    return NodeRecord(name + "-id", name, "127.0.0.1", 1, 2, 3, zone=zone, state=state)


def test_place_prefers_free_space_and_distinct_nodes() -> None:
    cands = [
        Candidate(node("a"), True, 10),
        Candidate(node("b"), True, 30),
        Candidate(node("c"), True, 20),
    ]
    assert place(cands, 2, 5) == ["b-id", "c-id"]


def test_place_spreads_zones_first() -> None:
    cands = [
        Candidate(node("a", zone="z1"), True, 30),
        Candidate(node("b", zone="z1"), True, 20),
        Candidate(node("c", zone="z2"), True, 10),
    ]
    assert place(cands, 2, 5) == ["a-id", "c-id"]
    assert sorted(place(cands, 3, 5)) == ["a-id", "b-id", "c-id"]


def test_place_explains_every_refusal() -> None:
    cands = [
        Candidate(node("a"), False, 100),
        Candidate(node("b", state="cordoned"), True, 100),
        Candidate(node("c", state="draining"), True, 100),
        Candidate(node("d"), True, 1),
        Candidate(node("e"), True, 100),
    ]
    with pytest.raises(PlacementError) as e:
        place(cands, 2, 50)
    msg = str(e.value)
    for part in ("a: down", "b: cordoned", "c: draining", "d: full", "only 1 eligible"):
        assert part in msg


def test_records_round_trip_and_ignore_unknown_fields() -> None:
    v = VolumeRecord("id1", "v", 1 << 30, 4 << 20, 3, ["a", "b", "c"], sync_writes=True)
    assert VolumeRecord.decode(v.encode()) == v
    raw = v.to_dict() | {"future_field": 1}
    assert VolumeRecord.from_dict(raw) == v


def test_keys_live_under_the_cluster_prefix() -> None:
    k = Keys("c1")
    assert k.volume("v") == b"/pxc/c1/volumes/v"
    assert k.replica("v", "n") == b"/pxc/c1/volumes/v/replicas/n"
    assert k.split(k.attachment("v")) == ["volumes", "v", "attachment"]
