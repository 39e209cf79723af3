"""Scrub requests, carried out by the engine that serves the volume
(`pxcluster.engine.scrub`): the report, or the error, is written over the pending request."""

from __future__ import annotations

import logging
import time

from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import ScrubRecord
from pxcluster.engine.errors import VolumeIOError
from pxcluster.engine.scrub import scrub
from pxcluster.engine.volume import VolumeEngine
from pxcluster.errors import PxcError
from pxcluster.service.core import VolumeView

log = logging.getLogger(__name__)


async def apply_scrub(etcd: Etcd, keys: Keys, view: VolumeView, engine: VolumeEngine) -> None:
    rec = view.scrub
    if rec is None or rec.state != "pending":
        return
    key = keys.scrub(view.record.id)
    try:
        report = await scrub(engine)
        done = ScrubRecord.from_dict(
            rec.to_dict() | report.to_dict() | {"state": "done", "finished": time.time()}
        )
        log.info(
            "volume %s: scrubbed %d chunks, repaired %d, unrepairable %d",
            engine.name,
            report.chunks,
            len(report.repaired),
            len(report.unrepairable),
        )
    except (VolumeIOError, PxcError) as e:
        done = ScrubRecord.from_dict(
            rec.to_dict() | {"state": "failed", "error": str(e), "finished": time.time()}
        )
    txn = etcd.txn().value_is(key, rec.encode()).put(key, done.encode())
    await etcd.commit(txn)
