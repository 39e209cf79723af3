"""What one leader pass reads of etcd, read once and shared by every controller of the pass.

`PassView` reads `volumes/`, `alive/` and `nodes/` each at most once, on first use, so a pass
reads only what its controllers ask for. The runner opens one per pass and hands it to each
controller's `run_pass`; a controller called alone (a test) opens its own. At 2,000 volumes
`volumes/` is 14,000 keys (2 MB); before, three of the four controllers read it for itself on
every pass, and the drain controller once more per running drain (bench/scale.py).

A view is one moment's picture, and it ages during the pass, also by the writes the earlier
controllers of the same pass made. No controller writes on its word alone: every write is an
etcd transaction guarded on what the decision read (the target `value_is` the one seen, a
replica key `absent`/`present`, the volume record and replica states unchanged since the view:
`guard_volume` below), so a write whose premise went stale fails and the next pass decides
again from a new view. Decisions that no guard can cover re-read first (a drain's end,
DrainController; a snapshot taken after the view was read, ScheduleController).
"""

from __future__ import annotations

import time

from membership.etcd import Txn
from membership.records import NodeRecord, ReplicaState, VolumeRecord
from pxcluster.service.core import Service, VolumeView


class PassView:
    """The cluster as one pass sees it. Results are shared between controllers: read them,
    never change them."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._volumes: list[VolumeView] | None = None
        self._alive: set[str] | None = None
        self._nodes: list[NodeRecord] | None = None
        self.volumes_read_at: float | None = None  # time.monotonic() when the read was sent

    # Controllers of a pass run one after another, so a first use is never concurrent with
    # another (two would only cost a second read); a failed read is not kept, the next
    # controller tries again.

    async def volumes(self) -> list[VolumeView]:
        if self._volumes is None:
            sent = time.monotonic()
            self._volumes = await self.service.volumes()
            self.volumes_read_at = sent
        return self._volumes

    async def alive(self) -> set[str]:
        if self._alive is None:
            self._alive = await self.service.alive()
        return self._alive

    async def nodes(self) -> list[NodeRecord]:
        if self._nodes is None:
            self._nodes = await self.service.nodes()
        return self._nodes


async def guard_volume(service: Service, view: VolumeView) -> Txn | None:
    """A transaction that commits only while the volume's record and replica states are still
    those `view` shows; None when etcd already says otherwise (the volume changed since the
    view was read: the caller skips it, the next pass sees it anew). Costs two reads, so it is
    for the rare writes that change a volume's replica set."""
    etcd, keys = service.etcd, service.keys
    vid = view.record.id
    record = await etcd.get(keys.volume(vid))
    if record is None or VolumeRecord.decode(record.value) != view.record:
        return None
    replicas = await etcd.get_prefix(keys.replicas_prefix(vid))
    seen = {keys.split(kv.key)[-1]: kv for kv in replicas}
    if seen.keys() != view.replicas.keys() or any(
        ReplicaState.decode(kv.value) != view.replicas[n] for n, kv in seen.items()
    ):
        return None
    txn = etcd.txn().unchanged(keys.volume(vid), record.mod_revision)
    for kv in seen.values():
        txn.unchanged(kv.key, kv.mod_revision)
    return txn
