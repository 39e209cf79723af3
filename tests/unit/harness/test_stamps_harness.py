"""The stamp checker's own guard: a history too thin to prove anything fails the check."""

from __future__ import annotations

import pytest

from tests.harness.stamps import MIN_ACKED, History, check, require_acked


def history(times: list[float], faults: tuple[float, ...] = ()) -> History:
    acked = [(i, i + 1, 1000 + i) for i in range(len(times))]
    return History(acked=acked, ack_times=list(times), faults=list(faults))


def test_an_empty_history_fails_before_any_read() -> None:
    with pytest.raises(AssertionError, match="only 0 writes acknowledged"):
        check(History(), "nbd://127.0.0.1:1/never-read", 16)


def test_too_few_acknowledged_writes_fail() -> None:
    with pytest.raises(AssertionError, match=f"need {MIN_ACKED}"):
        require_acked(history([1.0] * (MIN_ACKED - 1)))
    require_acked(history([1.0] * MIN_ACKED))


def test_a_marked_fault_needs_writes_on_both_sides() -> None:
    before = [float(i) for i in range(MIN_ACKED)]
    after = [100.0 + i for i in range(MIN_ACKED)]
    require_acked(history(before + after, faults=[50.0]))
    with pytest.raises(AssertionError, match="after the fault"):
        require_acked(history(before + before, faults=[50.0]))  # never served again
    with pytest.raises(AssertionError, match="before the fault"):
        require_acked(history(after + after, faults=[50.0]))
    # Several faults: before the first, after the last.
    with pytest.raises(AssertionError, match="after the fault"):
        require_acked(history(before + after, faults=[50.0, 200.0]))


def test_histories_merge_with_their_times_and_shared_marks() -> None:
    a = history([1.0, 2.0], faults=[1.5])
    b = history([3.0], faults=[1.5])
    whole = History()
    whole.extend(a)
    whole.extend(b, seq_shift=1 << 40)
    assert whole.ack_times == [1.0, 2.0, 3.0] and whole.faults == [1.5]
    assert whole.acked[2][1] == 1 + (1 << 40)
    assert whole.acked_between(1.5) == 2
