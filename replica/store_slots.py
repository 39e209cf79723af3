"""The chunk store's free slots, zeroed before they are handed out.

A slot is zeroed durably before it is handed to a chunk, so no chunk ever shows another
chunk's old data. A free slot is zeroed (durably: safe to hand out), punched (its zeros and
the records that freed it waiting for a sync), or unknown (to zero before use). Slots are
zeroed in batches, the next batch in the background while the current one is handed out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from replica.csumpages import ChecksumPages
from replica.errors import NoSpace
from replica.store_blocks import Blocks

_ZERO_BATCH = 16  # slots zeroed at a time, ahead of need (see SlotPool.take)

__all__ = ["SlotPool"]


class SlotPool:
    def __init__(
        self,
        free: set[int],
        *,
        disk_id: str,
        csums: ChecksumPages,
        blocks: Blocks,
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        self._disk_id = disk_id
        self._csums = csums
        self._blocks = blocks
        self._flush = flush
        self.zeroed: list[int] = []  # zeroed durably: safe to hand out
        self._punched: list[int] = []  # zeroed, durable once the next sync completes
        self._unzeroed = free
        self._refill = asyncio.Lock()
        self._prefill: asyncio.Task[None] | None = None

    async def take(self) -> int:
        """A zeroed slot. Handed back unused (still zero): `put_back`."""
        while not self.zeroed:
            async with self._refill:
                if self.zeroed:
                    break
                if self._prefill is not None:
                    await asyncio.gather(self._prefill, return_exceptions=True)
                if not self._unzeroed and not self._punched:
                    raise NoSpace(f"no free chunk slot on disk {self._disk_id}")
                await self._zero_batch()
                await self._flush()
        slot = self.zeroed.pop()
        if len(self.zeroed) < _ZERO_BATCH and self._unzeroed and self._prefill is None:
            # Zero the next batch in the background: the next sync of any kind (the dirty
            # record of this very allocation, say) makes it durable, so a run of first writes
            # (after a snapshot, into a new volume) rarely waits for a sync of its own.
            self._prefill = asyncio.get_running_loop().create_task(self._zero_ahead())
        return slot

    def put_back(self, slot: int) -> None:
        """A slot from `take` never written: still zeroed, at once reusable."""
        self.zeroed.append(slot)

    def free_after_sync(self, slot: int) -> None:
        """A slot zeroed (or never written since it was) whose freeing record is buffered:
        reusable once a sync made both durable."""
        self._punched.append(slot)

    async def zero(self, slots: list[int]) -> None:
        """Zero slots nobody references in a worker thread, and make them reusable once a sync
        made the zeros durable. Their checksum pages are forgotten first, on the loop, so no
        write-back puts old entries over the zeros."""
        for slot in slots:
            self._csums.drop(slot)
        await asyncio.to_thread(self._clear, slots)
        self._punched.extend(slots)

    async def settle(self) -> None:
        """Wait for the background zeroing, if any (the store closes)."""
        if self._prefill is not None:
            await asyncio.gather(self._prefill, return_exceptions=True)

    @property
    def punches_due(self) -> bool:
        """Slots punched since the latest sync began, whose zeros the next sync makes durable."""
        return bool(self._punched)

    def sync_begins(self) -> list[int]:
        """A sync takes the slots punched so far; it ends in `synced` or `sync_failed`."""
        punched, self._punched = self._punched, []
        return punched

    def synced(self, punched: list[int]) -> None:
        """Their zeros are durable: hand them out again."""
        self.zeroed.extend(punched)

    def sync_failed(self, punched: list[int]) -> None:
        """Their zeros may not be durable: zeroed again before use."""
        self._unzeroed.update(punched)

    async def _zero_ahead(self) -> None:
        try:
            await self._zero_batch()
        finally:
            self._prefill = None

    async def _zero_batch(self) -> None:
        batch = [self._unzeroed.pop() for _ in range(min(_ZERO_BATCH, len(self._unzeroed)))]
        try:
            await self.zero(batch)
        except BaseException:
            self._unzeroed.update(batch)
            raise

    def _clear(self, slots: list[int]) -> None:
        for slot in slots:
            self._blocks.clear(slot)
