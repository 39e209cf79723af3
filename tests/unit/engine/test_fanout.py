"""fan_out_calls: every call starts at once, outcomes are sorted by replica, and calls that wait
progress side by side (none waits for another's reply before it starts or finishes)."""

from __future__ import annotations

import asyncio

import pytest

from pxcluster.engine.fanout import fan_out_calls


async def test_calls_that_finish_in_their_first_step_need_no_wait() -> None:
    started: list[str] = []

    def call(name: str, fail: bool):  # type: ignore[no-untyped-def]
        async def run() -> str:
            started.append(name)
            if fail:
                raise OSError(name)
            return name

        return run

    ok, failed = await fan_out_calls({"a": call("a", False), "b": call("b", True)})
    assert ok == {"a": "a"}
    assert isinstance(failed["b"], OSError)
    assert started == ["a", "b"]


async def test_every_call_has_started_before_the_first_waits() -> None:
    sent: list[str] = []
    replies = {n: asyncio.get_running_loop().create_future() for n in "abc"}

    def call(name: str):  # type: ignore[no-untyped-def]
        async def run() -> str:
            sent.append(name)  # what a remote call does first: its frame leaves
            return await replies[name]

        return run

    job = asyncio.ensure_future(fan_out_calls({n: call(n) for n in "abc"}))
    await asyncio.sleep(0)
    assert sent == ["a", "b", "c"]
    replies["c"].set_result("C")
    replies["a"].set_exception(ConnectionError("a"))
    replies["b"].set_result("B")
    ok, failed = await asyncio.wait_for(job, 5)
    assert ok == {"b": "B", "c": "C"}
    assert list(failed) == ["a"]


async def test_waiting_calls_progress_side_by_side() -> None:
    # Each call waits twice; the second step of one must not wait for another's reply.
    order: list[str] = []
    gates = {n: asyncio.Event() for n in "ab"}

    def call(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            await asyncio.sleep(0)
            order.append(f"{name}1")
            await gates[name].wait()
            order.append(f"{name}2")

        return run

    job = asyncio.ensure_future(fan_out_calls({"a": call("a"), "b": call("b")}))
    for _ in range(5):
        await asyncio.sleep(0)
    gates["a"].set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert "a2" in order and "b2" not in order
    gates["b"].set()
    ok, failed = await asyncio.wait_for(job, 5)
    assert set(ok) == {"a", "b"} and not failed


async def test_cancelling_the_caller_cancels_every_waiting_call() -> None:
    cancelled: list[str] = []

    def call(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return run

    job = asyncio.ensure_future(fan_out_calls({n: call(n) for n in "abc"}))
    for _ in range(3):
        await asyncio.sleep(0)
    await _cancel_and_settle(job)
    assert sorted(cancelled) == ["a", "b", "c"]


async def test_calls_waiting_on_one_reply_each_cost_no_task() -> None:
    replies = {n: asyncio.get_running_loop().create_future() for n in "abc"}

    def call(name: str):  # type: ignore[no-untyped-def]
        async def run() -> str:
            return await replies[name]

        return run

    job = asyncio.ensure_future(fan_out_calls({n: call(n) for n in "abc"}))
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {job, asyncio.current_task()}
    for n, fut in replies.items():
        fut.set_result(n.upper())
    ok, failed = await asyncio.wait_for(job, 5)
    assert ok == {"a": "A", "b": "B", "c": "C"} and not failed


async def test_a_call_that_waits_again_after_its_reply_still_finishes() -> None:
    loop = asyncio.get_running_loop()
    first, reply, later = loop.create_future(), loop.create_future(), loop.create_future()

    async def twice() -> str:
        await first
        return str(await later)

    async def once() -> str:
        return str(await reply)

    job = asyncio.ensure_future(fan_out_calls({"a": twice, "b": once}))
    await asyncio.sleep(0)
    first.set_result("f")
    reply.set_result("r")
    for _ in range(3):
        await asyncio.sleep(0)
    assert not job.done()
    later.set_result("l")
    ok, failed = await asyncio.wait_for(job, 5)
    assert ok == {"a": "l", "b": "r"} and not failed


async def test_cancelling_parked_calls_cancels_what_they_wait_on_and_lets_them_clean_up() -> None:
    loop = asyncio.get_running_loop()
    replies = {n: loop.create_future() for n in "ab"}
    cleaned: list[str] = []

    def call(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            try:
                await replies[name]
            finally:
                await asyncio.sleep(0)  # cleanup that itself waits
                cleaned.append(name)

        return run

    job = asyncio.ensure_future(fan_out_calls({n: call(n) for n in "ab"}))
    await asyncio.sleep(0)
    await _cancel_and_settle(job)
    assert all(f.cancelled() for f in replies.values())
    assert sorted(cleaned) == ["a", "b"]


async def _cancel_and_settle(job: asyncio.Future[object]) -> None:
    """Cancel the fan-out, see it raise CancelledError, and let its calls finish cleaning up."""
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    for _ in range(3):
        await asyncio.sleep(0)
