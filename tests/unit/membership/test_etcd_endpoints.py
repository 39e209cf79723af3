"""Nodes given the same etcd member list start on different members (by their name), so reads
and watches are shared between the members; a client without a name starts on the first."""

from __future__ import annotations

from membership.etcd import Etcd

MEMBERS = "http://127.0.0.1:2379,http://127.0.0.2:2379,http://127.0.0.3:2379"


def test_nodes_spread_over_the_members_by_name() -> None:
    starts = {Etcd(MEMBERS, spread_by=f"n{i}")._current for i in range(1, 31)}
    assert starts == {0, 1, 2}


def test_a_node_always_starts_on_the_same_member() -> None:
    assert Etcd(MEMBERS, spread_by="n7")._current == Etcd(MEMBERS, spread_by="n7")._current


def test_without_a_name_the_first_member_comes_first() -> None:
    assert Etcd(MEMBERS)._current == 0
    assert Etcd("http://127.0.0.1:2379", spread_by="n5")._current == 0
