"""Which async S3 client for backup targets: aiobotocore or obstore, against a real SeaweedFS.

    .venv/bin/python bench/backup_clients.py [--rounds 3] [--objects 64] [--heads 2000]

Each round, for each client: PUT `objects` objects of 1 MiB (8 in flight), GET them back
(8 in flight), then `heads` HEADs of small objects (32 in flight; half exist, half do not, as
the backup's "does the target hold this block?" question). The best of the rounds (after an untimed
warm-up) is printed.
Both clients run in one process against one server, alternating, so noise hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.s3 import SeaweedS3

MiB = 1 << 20
BUCKET = "pxc-bench"


async def bounded(n: int, jobs: list[Callable[[], Awaitable[Any]]]) -> None:
    sem = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


class Botocore:
    name = "aiobotocore"

    async def __aenter__(self) -> Botocore:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        self._cm = get_session().create_client(
            "s3",
            endpoint_url=os.environ["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            config=AioConfig(max_pool_connections=64, s3={"addressing_style": "path"}),
        )
        self.c = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(None, None, None)

    async def put(self, key: str, data: bytes) -> None:
        await self.c.put_object(Bucket=BUCKET, Key=key, Body=data)

    async def get(self, key: str) -> bytes:
        r = await self.c.get_object(Bucket=BUCKET, Key=key)
        async with r["Body"] as body:
            return bytes(await body.read())

    async def head(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            await self.c.head_object(Bucket=BUCKET, Key=key)
            return True
        except ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise


class Obstore:
    name = "obstore"

    async def __aenter__(self) -> Obstore:
        from obstore.store import S3Store

        self.s = S3Store(
            BUCKET,
            endpoint=os.environ["AWS_ENDPOINT_URL"],
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "pool_max_idle_per_host": "64"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        await obstore.put_async(self.s, key, data, use_multipart=False)

    async def get(self, key: str) -> bytes:
        import obstore

        r = await obstore.get_async(self.s, key)
        return bytes(await r.bytes_async())

    async def head(self, key: str) -> bool:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            await obstore.head_async(self.s, key)
            return True
        except (NotFoundError, FileNotFoundError):
            return False


async def round_for(client: Any, tag: str, objects: int, heads: int) -> dict[str, float]:
    payloads = [os.urandom(MiB) for _ in range(objects)]
    keys = [f"{client.name}/{tag}/big/{i}" for i in range(objects)]
    t = time.perf_counter()
    await bounded(
        8, [lambda k=k, p=p: client.put(k, p) for k, p in zip(keys, payloads, strict=True)]
    )
    put_s = time.perf_counter() - t
    got: dict[str, bytes] = {}

    async def fetch(k: str) -> None:
        got[k] = await client.get(k)

    t = time.perf_counter()
    await bounded(8, [lambda k=k: fetch(k) for k in keys])
    get_s = time.perf_counter() - t
    assert all(got[k] == p for k, p in zip(keys, payloads, strict=True))
    small = [f"{client.name}/{tag}/small/{i}" for i in range(heads // 2)]
    await bounded(16, [lambda k=k: client.put(k, b"x") for k in small])
    probe = small + [k + "-absent" for k in small]
    found = 0

    async def head(k: str) -> None:
        nonlocal found
        hit = await client.head(k)
        found += hit  # after the await: `found += await ...` would lose updates

    t = time.perf_counter()
    await bounded(32, [lambda k=k: head(k) for k in probe])
    head_s = time.perf_counter() - t
    assert found == len(small), (client.name, found, len(small))
    # One at a time too: a restore's or a verify's latency per object.
    t = time.perf_counter()
    for k in keys[:16]:
        await client.get(k)
    get1_ms = (time.perf_counter() - t) / 16 * 1000
    return {
        "put MiB/s (8 in flight)": objects / put_s,
        "get MiB/s (8 in flight)": objects / get_s,
        "get 1 MiB, one at a time, ms": get1_ms,
        "HEAD/s (32 in flight)": len(probe) / head_s,
    }


async def main_async(rounds: int, objects: int, heads: int) -> None:
    best: dict[str, dict[str, float]] = {}
    # SeaweedFS grows its volumes on the first writes: a warm-up that neither client is timed on.
    for cls in (Botocore, Obstore):
        async with cls() as client:
            await round_for(client, "warmup", 16, 64)
    for r in range(rounds):
        for cls in (Botocore, Obstore) if r % 2 == 0 else (Obstore, Botocore):
            async with cls() as client:
                res = await round_for(client, f"r{r}", objects, heads)
            b = best.setdefault(cls.name, {})
            for k, v in res.items():
                better = min if k.endswith("ms") else max
                b[k] = better(b.get(k, v), v)
            print(f"round {r} {cls.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    print()
    metrics = list(next(iter(best.values())))
    print("| metric | " + " | ".join(best) + " |")
    print("| --- | " + " | ".join("---" for _ in best) + " |")
    for m in metrics:
        print(f"| {m} | " + " | ".join(f"{best[c][m]:.1f}" for c in best) + " |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--objects", type=int, default=64)
    p.add_argument("--heads", type=int, default=2000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pxc-s3bench-") as d:
        server = SeaweedS3(Path(d))
        server.start()
        try:
            server.create_bucket(BUCKET)
            os.environ.update(server.env())
            asyncio.run(main_async(a.rounds, a.objects, a.heads))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
