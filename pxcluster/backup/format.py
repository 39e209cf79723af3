"""The backup format, all of it, in one place.

A target holds (keys relative to the target URL):

- `blocks/<first 2 hex>/<sha256 hex>`: one block of volume data, content-addressed by the
  sha256 of its uncompressed bytes. The object is a 12-byte header, then a zstd frame:

      magic "PXCB" | version u8 (1) | codec u8 (1 = zstd) | flags u16 (0) | length u32

  all big-endian; `length` is the uncompressed length. A reader checks the header, the
  length and the sha256, so a damaged object is detected and never restored as data.
  All-zero blocks are never stored: the manifest says null.
- `backups/<id>.json`: the manifest, written last. A backup without a manifest does not
  exist. The id sorts by time: `YYYYMMDDTHHMMSSmmmZ-<6 hex>` (UTC).
- `inprogress/<id>.json`: a running backup's marker (`Marker`), its heartbeat refreshed every
  few seconds and removed at the end; garbage collection does not run while a fresh one exists.
- `gc/<id>.json`: a running garbage collection's marker; a backup that finishes waits for
  it to end before checking its blocks (docs/BACKUPS.md: why this makes delete safe).

The backup block size is min(1 MiB, chunk size): a volume's chunk size is a power of two of
at least 64 KiB, so a chunk is a whole number of blocks, and only the last chunk of a volume
(and so its last block) may be short.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import zstandard

from pxcluster.backup.errors import BadManifest

FORMAT_VERSION = 1
MAX_BLOCK = 1 << 20
MIN_CHUNK = 64 << 10
MAGIC = b"PXCB"
BLOCK_VERSION = 1
CODEC_ZSTD = 1
HEADER = struct.Struct(">4sBBHI")
ZSTD_LEVEL = 3

BLOCKS = "blocks/"
BACKUPS = "backups/"
INPROGRESS = "inprogress/"
GC = "gc/"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{6}$")


class BadBlock(ValueError):
    """A block object whose bytes do not decode to the data its name promises."""


def block_size_for(chunk_size: int) -> int:
    if chunk_size < MIN_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk size {chunk_size} is not a power of two >= {MIN_CHUNK}")
    return min(MAX_BLOCK, chunk_size)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_length(chunk: int, size: int, chunk_size: int) -> int:
    return min(chunk_size, size - chunk * chunk_size)


def block_key(digest: str) -> str:
    return f"{BLOCKS}{digest[:2]}/{digest}"


def digest_of_key(key: str) -> str | None:
    """The hash a `blocks/..` key names, or None if the key is not a block's."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] + "/" == BLOCKS and _HEX64.match(parts[2]):
        if parts[1] == parts[2][:2]:
            return parts[2]
    return None


def manifest_key(backup_id: str) -> str:
    return f"{BACKUPS}{backup_id}.json"


def marker_key(kind: str, marker_id: str) -> str:
    return f"{kind}{marker_id}.json"


def id_of_key(prefix: str, key: str) -> str | None:
    if key.startswith(prefix) and key.endswith(".json"):
        ident = key[len(prefix) : -len(".json")]
        if is_valid_id(ident):
            return ident
    return None


def new_id(now: float | None = None) -> str:
    t = time.time() if now is None else now
    stamp = datetime.fromtimestamp(t, UTC)
    return f"{stamp:%Y%m%dT%H%M%S}{stamp.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def is_valid_id(backup_id: str) -> bool:
    return bool(_ID.match(backup_id))


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


_zeros: dict[int, bytes] = {}


def is_zero(data: bytes) -> bool:
    # bytes == bytes is a memcmp; a memoryview comparison goes element by element (30x slower).
    zeros = _zeros.get(len(data))
    if zeros is None:
        zeros = bytes(len(data))
        if len(_zeros) < 64:
            _zeros[len(data)] = zeros
    return data == zeros


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # A ZstdCompressor is not safe to share between threads; one per thread is reused.
    c: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def encode_block(data: bytes | memoryview) -> bytes:
    if len(data) > MAX_BLOCK:
        raise ValueError(f"block of {len(data)} bytes is larger than {MAX_BLOCK}")
    header = HEADER.pack(MAGIC, BLOCK_VERSION, CODEC_ZSTD, 0, len(data))
    return header + _compressor().compress(data)


def decode_block(blob: bytes, digest: str) -> bytes:
    """The block's data; BadBlock (with the reason) unless it is exactly what `digest` names."""
    if len(blob) < HEADER.size:
        raise BadBlock(f"object of {len(blob)} bytes is shorter than the block header")
    magic, version, codec, _flags, length = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise BadBlock("bad magic")
    if version != BLOCK_VERSION or codec != CODEC_ZSTD:
        raise BadBlock(f"unknown block version {version} / codec {codec}")
    if length > MAX_BLOCK:
        raise BadBlock(f"header claims {length} bytes")
    try:
        data = zstandard.ZstdDecompressor().decompress(
            memoryview(blob)[HEADER.size :], max_output_size=length
        )
    except zstandard.ZstdError as e:
        raise BadBlock(f"zstd: {e}") from None
    if len(data) != length:
        raise BadBlock(f"decompressed to {len(data)} bytes, header says {length}")
    if sha256_hex(data) != digest:
        raise BadBlock("sha256 of the data does not match the block's name")
    return data


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk allocated in the snapshot: its generation and its blocks (None: all zero)."""

    generation: tuple[int, int]
    blocks: tuple[str | None, ...]

    def to_dict(self, index: int) -> dict[str, Any]:
        return {"index": index, "generation": list(self.generation), "blocks": list(self.blocks)}


@dataclass(frozen=True)
class Totals:
    chunks: int  # chunks listed (allocated in the snapshot)
    blocks: int  # non-zero blocks referenced (a block used twice counts twice)
    unique_blocks: int
    logical_bytes: int  # bytes of the non-zero blocks
    bytes_read: int
    bytes_uploaded: int
    blocks_uploaded: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "chunks": self.chunks,
            "blocks": self.blocks,
            "unique_blocks": self.unique_blocks,
            "logical_bytes": self.logical_bytes,
            "bytes_read": self.bytes_read,
            "bytes_uploaded": self.bytes_uploaded,
            "blocks_uploaded": self.blocks_uploaded,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Totals:
        return cls(
            chunks=int(d["chunks"]),
            blocks=int(d["blocks"]),
            unique_blocks=int(d["unique_blocks"]),
            logical_bytes=int(d["logical_bytes"]),
            bytes_read=int(d["bytes_read"]),
            bytes_uploaded=int(d["bytes_uploaded"]),
            blocks_uploaded=int(d["blocks_uploaded"]),
            seconds=float(d["seconds"]),
        )


@dataclass(frozen=True)
class Manifest:
    id: str
    volume: str
    volume_id: str
    snapshot: str
    created: str  # ISO 8601, UTC
    size: int
    chunk_size: int
    block_size: int
    encrypted: bool
    chunks: dict[int, ChunkEntry]
    totals: Totals
    parent: str | None = None  # the backup this one was incremental to
    format: int = FORMAT_VERSION

    def digests(self) -> set[str]:
        return {d for e in self.chunks.values() for d in e.blocks if d is not None}

    def locations(self) -> dict[str, tuple[int, int]]:
        """Each block's first use: digest -> (chunk, volume offset)."""
        where: dict[str, tuple[int, int]] = {}
        for index in sorted(self.chunks):
            for i, d in enumerate(self.chunks[index].blocks):
                if d is not None and d not in where:
                    where[d] = (index, index * self.chunk_size + i * self.block_size)
        return where

    def summary(self) -> dict[str, Any]:
        """What `backup list` and `backup inspect` show: everything but the block lists."""
        return {
            "id": self.id,
            "volume": self.volume,
            "volume_id": self.volume_id,
            "snapshot": self.snapshot,
            "created": self.created,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "block_size": self.block_size,
            "encrypted": self.encrypted,
            "parent": self.parent,
            "format": self.format,
            "totals": self.totals.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d["chunks"] = [self.chunks[i].to_dict(i) for i in sorted(self.chunks)]
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        fmt = int(d.get("format", 0))
        if fmt != FORMAT_VERSION:
            raise BadManifest(
                f"backup {d.get('id')}: manifest format {fmt}, this version reads {FORMAT_VERSION}"
            )
        block_size = int(d["block_size"])
        chunks: dict[int, ChunkEntry] = {}
        for c in d["chunks"]:
            blocks = tuple(c["blocks"])
            for b in blocks:
                if b is not None and not (isinstance(b, str) and _HEX64.match(b)):
                    raise BadManifest(f"backup {d.get('id')}: bad block hash {b!r}")
            e, s = c["generation"]
            chunks[int(c["index"])] = ChunkEntry((int(e), int(s)), blocks)
        return cls(
            id=str(d["id"]),
            volume=str(d["volume"]),
            volume_id=str(d["volume_id"]),
            snapshot=str(d["snapshot"]),
            created=str(d["created"]),
            size=int(d["size"]),
            chunk_size=int(d["chunk_size"]),
            block_size=block_size,
            encrypted=bool(d["encrypted"]),
            chunks=chunks,
            totals=Totals.from_dict(d["totals"]),
            parent=d.get("parent"),
            format=fmt,
        )

    @classmethod
    def from_json(cls, data: bytes, backup_id: str) -> Manifest:
        try:
            m = cls.from_dict(json.loads(data))
        except BadManifest:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise BadManifest(f"backup {backup_id}: unreadable manifest ({e!r})") from None
        if m.id != backup_id:
            raise BadManifest(f"backup {backup_id}: the manifest says it is {m.id}")
        return m


@dataclass(frozen=True)
class Marker:
    """`inprogress/<id>.json` (a running backup) or `gc/<id>.json` (a running collection)."""

    id: str
    kind: str  # "backup" or "gc"
    volume: str
    volume_id: str
    started: float  # unix time, the writer's clock
    heartbeat: float
    owner: str = field(default="")  # host:pid, for the operator

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "kind": self.kind,
                "volume": self.volume,
                "volume_id": self.volume_id,
                "started": self.started,
                "heartbeat": self.heartbeat,
                "owner": self.owner,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Marker:
        d = json.loads(data)
        return cls(
            id=str(d["id"]),
            kind=str(d["kind"]),
            volume=str(d.get("volume", "")),
            volume_id=str(d.get("volume_id", "")),
            started=float(d["started"]),
            heartbeat=float(d["heartbeat"]),
            owner=str(d.get("owner", "")),
        )


def created_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
