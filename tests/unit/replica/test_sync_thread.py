"""The sync thread: calls run off the loop, in order, with their results and errors returned;
it ends when closed or when its owner is dropped."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from replica.sync_thread import SyncThread


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "test-sync"]


async def _gone(timeout: float = 5.0) -> None:
    for t in _sync_threads():
        await asyncio.to_thread(t.join, timeout)
        assert not t.is_alive()


async def test_calls_run_off_the_loop_in_order() -> None:
    st = SyncThread("test-sync")
    seen: list[tuple[int, int]] = []
    loop_thread = threading.get_ident()

    def call(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * 2

    results = await asyncio.gather(*(st.run(lambda i=i: call(i)) for i in range(50)))
    assert results == [i * 2 for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {t for _, t in seen} != {loop_thread} and len({t for _, t in seen}) == 1
    st.close()
    await _gone()


async def test_an_error_reaches_the_caller_and_the_thread_goes_on() -> None:
    st = SyncThread("test-sync")

    def fail() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        await st.run(fail)
    assert await st.run(lambda: "after") == "after"
    st.close()
    await _gone()


async def test_a_cancelled_caller_does_not_stop_its_call() -> None:
    st = SyncThread("test-sync")
    release = threading.Event()
    ran = threading.Event()

    def slow() -> None:
        release.wait(5)
        ran.set()

    waiter = asyncio.ensure_future(st.run(slow))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    assert await st.run(lambda: 1) == 1  # runs after slow, which therefore completed
    assert ran.is_set()
    st.close()
    await _gone()


async def test_dropping_the_owner_ends_the_thread() -> None:
    st = SyncThread("test-sync")
    await st.run(lambda: None)
    assert len(_sync_threads()) == 1
    del st
    gc.collect()
    await _gone()
