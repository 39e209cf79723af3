"""Group commit: every sync of a chunk store goes through here, one at a time.

Syncs are numbered in order. `flush` asks for the first sync that covers everything applied
so far: a sync started but not yet past its first step covers it (it has not looked at
anything yet); so does the latest sync when the store says nothing was applied since that
sync's first step (`quiet`): a flush right after a durable write, or a second flush, costs no
fdatasync. Otherwise the next sync does. So however many callers flush at once, each sync is
one run of the store's commit step (one journal append and fdatasync).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from replica.store_state import StoreState

__all__ = ["GroupCommit"]


class GroupCommit:
    def __init__(
        self,
        state: StoreState,
        commit: Callable[[int], Awaitable[None]],
        quiet: Callable[[], bool],
    ) -> None:
        """`commit(callers)`: one sync's work, told how many flush callers it serves; its
        first step (up to its first wait) takes what the sync covers. `quiet()`: nothing was
        applied since the first step of the latest sync."""
        self._state = state  # a flush on a closed store fails
        self._commit = commit
        self._quiet = quiet
        self.started = 0  # the number of the latest sync started
        self.done = 0  # the number of the latest sync completed
        self._task: asyncio.Task[None] | None = None
        # The sync task has taken its first step (taken the records, started fdatasync):
        # until then it covers whatever is applied meanwhile, so callers join it.
        self._begun = False
        self._callers = 0  # flush() callers waiting for the next sync
        self._flushes: dict[int, asyncio.Future[None]] = {}  # flush_soon's, by sync number

    async def flush(self) -> None:
        """Return once everything applied before the call is durable. A caller arriving while a
        sync runs waits for the next one, which then covers every such caller."""
        await self._flush_to(self._sync_needed())

    def flush_soon(self) -> asyncio.Future[None]:
        """`flush` as a future, shared by every caller that needs the same sync: a durable
        write started without a coroutine (the engine's `write_begin`) waits on it, and a
        group commit costs one task however many writes it covers."""
        need = self._sync_needed()
        fut = self._flushes.get(need)
        if fut is None:
            fut = self._flushes[need] = asyncio.ensure_future(self._flush_to(need))
            fut.add_done_callback(lambda _: self._flushes.pop(need, None))
        return fut

    async def idle(self) -> None:
        """Wait until no sync runs (the store is closed: none starts again)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def _sync_needed(self) -> int:
        """The number of the first sync that covers everything applied so far."""
        self._state.check_open()
        if self._task is not None and not self._begun:
            # That sync has not looked at anything yet: everything applied before this call
            # (data written, records appended) is in what it will take and fdatasync.
            self._callers += 1
            return self.started
        if self._quiet():
            # Everything applied was applied before the latest sync's first step: that sync
            # covers it (done already, or running). Had it failed, `done` is behind and
            # `_flush_to` starts another.
            return self.started
        self._callers += 1
        return self.started + 1

    async def _flush_to(self, need: int) -> None:
        while self.done < need:
            task = self._task
            if task is None:
                self.started += 1
                self._begun = False
                task = self._task = asyncio.create_task(self._sync(self.started))
            await asyncio.shield(task)

    async def _sync(self, number: int) -> None:
        self._begun = True
        callers, self._callers = self._callers, 0
        try:
            await self._commit(callers)
            self.done = number
        finally:
            self._task = None
