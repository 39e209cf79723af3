"""One thread that runs a chunk store's blocking syncs (fdatasync, checkpoints) off the loop.

`asyncio.to_thread` costs a database commit more than its fdatasync here: a context copy, an
executor work item, a concurrent future chained to an asyncio one, and that future's
callbacks, on every sync (measured: ~160 us of CPU and ~260 us of wall time per 4 KiB write
and sync on this machine's disk, against ~100 and ~200 through this thread, and ~50 and ~125
inline). A store runs one sync at a time (`GroupCommit`), so one thread is enough: a call is
one queue put, and its result one `call_soon_threadsafe`.

The thread starts on first use and stops at `close`, or when its owner is collected (a store
dropped without closing, as after a crash); calls run in the order made. A caller
that stops waiting (cancelled) does not stop its call: like a sync handed to `to_thread`, it
runs to the end.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["SyncThread"]

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _post(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], r: Any, e: Any) -> None:
    try:
        loop.call_soon_threadsafe(_settle, fut, r, e)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class SyncThread:
    def __init__(self, name: str = "pxc-sync") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the thread; its result, or what it raised."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._start()
        self._jobs.put((fn, loop, fut))
        return await fut

    def close(self) -> None:
        """Stop the thread once the calls already made have run (does not wait for them)."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread = None

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    jobs = self._jobs
                    self._thread = threading.Thread(
                        target=_work, args=(jobs,), name=self._name, daemon=True
                    )
                    self._thread.start()
                    # The thread holds the queue, not this object: dropping it ends the thread.
                    weakref.finalize(self, jobs.put, None)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        fn, loop, fut = job
        try:
            result = fn()
        except BaseException as exc:
            _post(loop, fut, None, exc)
        else:
            _post(loop, fut, result, None)
        del job, fn, fut  # hold nothing of a finished call while waiting for the next
