"""The rules `pxcluster verify` judges blocks by, on a made-up history."""

from __future__ import annotations

from pxcluster.tools import stamp
from pxcluster.tools.verify import History, Result, check

ZERO = bytes(stamp.BLOCK)


def judge(h: History, blocks: list[bytes], again: list[bytes] | None = None) -> Result:
    r = Result("v", len(blocks), 1.0)
    r.acknowledged = len(h.acked)
    check(h, blocks, blocks if again is None else again, r)
    return r


def test_last_acked_or_a_later_issued_write_is_fine() -> None:
    h = History(acked=[(0, 1, 11), (0, 3, 13), (1, 2, 12)], failed=[(1, 4, 14)])
    r = judge(h, [stamp.make(0, 3, 13), stamp.make(1, 4, 14), ZERO])
    assert r.ok and r.bad_blocks == []
    r = judge(h, [stamp.make(0, 3, 13), stamp.make(1, 2, 12), ZERO])  # the failed write lost
    assert r.ok


def test_lost_phantom_corrupt_unstable() -> None:
    h = History(acked=[(0, 1, 11), (0, 3, 13), (1, 2, 12)], failed=[])
    older = stamp.make(0, 1, 11)
    flipped = bytearray(stamp.make(1, 2, 12))
    flipped[200] ^= 1
    r = judge(h, [older, ZERO, stamp.make(2, 9, 99), bytes(flipped)])
    assert (r.lost, r.phantom, r.corrupt) == (2, 1, 1) and not r.ok
    assert r.bad_blocks == [0, 1, 2, 3]
    r = judge(h, [stamp.make(0, 3, 13), stamp.make(1, 2, 12)], [older, stamp.make(1, 2, 12)])
    assert r.unstable == 1 and r.bad_blocks == [0]


def test_a_stamp_of_another_block_is_a_phantom() -> None:
    h = History(acked=[(0, 1, 11), (1, 2, 11)], failed=[])
    r = judge(h, [stamp.make(1, 2, 11), stamp.make(1, 2, 11)])
    assert r.phantom == 1 and r.bad_blocks == [0]


def test_nothing_acknowledged_is_not_ok() -> None:
    assert not judge(History(), [ZERO]).ok
