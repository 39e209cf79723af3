"""The chunk store's on-disk format, all of it in one place.

Layout of a disk (every offset a multiple of 4 KiB):

    0               superblock (one 4 KiB block)
    journal_offset  journal area: records `u32 length | u32 crc32c | u64 generation | msgpack`
    meta_offset     metadata checkpoint area A, then area B (meta_size each)
    csum_offset     a u32 per 4 KiB block of every slot: crc32c(block) ^ crc32c(zero block),
                    so a zeroed (punched) entry describes a zeroed block
    present_offset  a bitmap per slot of the blocks a partial (copy-on-write) entry holds,
                    written with the data so it survives a process crash in the page cache
    data_offset     `slots` chunk slots of chunk_size bytes

The journal is only valid on top of the checkpoint whose seq equals the records' generation:
a record left over from an older checkpoint, a torn record or a corrupt one ends replay.
Checkpoint seq n lives in area n % 2, so writing seq n+1 never touches the valid seq n.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import crc32c
import msgpack

from replica.errors import (
    CorruptSuperblock,
    DiskError,
    ForeignDisk,
    NotFormatted,
    UnsupportedFormat,
)

MAGIC = b"PXCDISK\0"
FORMAT_VERSION = 2
BLOCK = 4096
MIN_CHUNK = 64 << 10
# The metadata area's budget: per chunk slot (a chunk entry and its generation), and per volume
# or snapshot in the base (its entry, with a name or id of at most 64 bytes, and its lists).
META_BYTES_PER_SLOT = 64
META_BYTES_PER_NAME = 256
DEFAULT_CHUNK = 4 << 20

CSUM_SIZE = 4
_SB_HEAD = struct.Struct("<8sII")  # magic, version, body length
_REC_HEAD = struct.Struct("<IIQ")  # body length, crc32c(generation + body), generation
_CKPT_MAGIC = b"PXCCKPT\0"
_CKPT_HEAD = struct.Struct("<8sQII")  # magic, seq, body length, crc32c(head + body)


def _crc(data: bytes | bytearray | memoryview) -> int:
    return int(crc32c.crc32c(data))


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Superblock:
    cluster_id: str
    node_id: str
    disk_id: str
    chunk_size: int
    format_version: int
    journal_offset: int
    journal_size: int
    meta_offset: int
    meta_size: int
    data_offset: int
    slots: int
    csum_offset: int
    present_offset: int

    def present_at(self, slot: int) -> int:
        return self.present_offset + slot * self.present_size

    @property
    def present_size(self) -> int:
        return self.chunk_size // BLOCK // 8

    def meta_area(self, seq: int) -> int:
        return self.meta_offset + (seq % 2) * self.meta_size

    def csum_at(self, slot: int, block: int) -> int:
        """Where the checksum of block `block` of slot `slot` lives."""
        return self.csum_offset + (slot * (self.chunk_size // BLOCK) + block) * CSUM_SIZE

    def slot_offset(self, slot: int) -> int:
        return self.data_offset + slot * self.chunk_size


def layout(
    disk_size: int, *, cluster_id: str, node_id: str, disk_id: str, chunk_size: int
) -> Superblock:
    """Size journal and metadata from the disk; the rest becomes chunk slots."""
    if chunk_size < MIN_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk size {chunk_size} must be a power of two >= {MIN_CHUNK}")
    journal_size = min(max(_align(disk_size // 64, BLOCK), 32 << 10), 16 << 20)
    # A checkpoint holds every chunk's slot and generation plus the dirty sets (~40 bytes
    # per chunk in msgpack); the base leaves room for many small volumes.
    base = (64 << 10) if disk_size < (1 << 30) else (1 << 20)
    meta_size = _align(base + (disk_size // chunk_size) * META_BYTES_PER_SLOT, BLOCK)
    journal_offset = BLOCK
    meta_offset = journal_offset + journal_size
    csum_offset = meta_offset + 2 * meta_size
    csum_size = _align((disk_size // chunk_size) * (chunk_size // BLOCK) * CSUM_SIZE, BLOCK)
    present_offset = csum_offset + csum_size
    present_size = _align((disk_size // chunk_size) * (chunk_size // BLOCK // 8), BLOCK)
    data_offset = _align(present_offset + present_size, min(chunk_size, 1 << 20))
    slots = max(0, (disk_size - data_offset) // chunk_size)
    if slots < 1:
        raise DiskError(f"disk of {disk_size} bytes is too small for one {chunk_size}-byte chunk")
    return Superblock(
        cluster_id=cluster_id,
        node_id=node_id,
        disk_id=disk_id,
        chunk_size=chunk_size,
        format_version=FORMAT_VERSION,
        journal_offset=journal_offset,
        journal_size=journal_size,
        meta_offset=meta_offset,
        meta_size=meta_size,
        data_offset=data_offset,
        slots=slots,
        csum_offset=csum_offset,
        present_offset=present_offset,
    )


def encode_superblock(sb: Superblock) -> bytes:
    body = msgpack.packb(
        {
            "cluster_id": sb.cluster_id,
            "node_id": sb.node_id,
            "disk_id": sb.disk_id,
            "chunk_size": sb.chunk_size,
            "journal_offset": sb.journal_offset,
            "journal_size": sb.journal_size,
            "meta_offset": sb.meta_offset,
            "meta_size": sb.meta_size,
            "data_offset": sb.data_offset,
            "slots": sb.slots,
            "csum_offset": sb.csum_offset,
            "present_offset": sb.present_offset,
        }
    )
    head = _SB_HEAD.pack(MAGIC, sb.format_version, len(body))
    block = bytearray(BLOCK)
    block[: len(head) + len(body)] = head + body
    struct.pack_into("<I", block, BLOCK - 4, _crc(block[: BLOCK - 4]))
    return bytes(block)


def decode_superblock(block: bytes, *, cluster_id: str | None = None) -> Superblock:
    if len(block) < BLOCK:
        raise NotFormatted("disk is smaller than a superblock")
    magic, version, length = _SB_HEAD.unpack_from(block)
    if magic != MAGIC:
        raise NotFormatted("disk has no pxcluster superblock")
    (stored_crc,) = struct.unpack_from("<I", block, BLOCK - 4)
    if stored_crc != _crc(block[: BLOCK - 4]):
        if version != FORMAT_VERSION:
            # A later format may lay its checksum out differently; the version is the news.
            raise UnsupportedFormat(
                f"disk format version {version}, this build reads {FORMAT_VERSION}"
            )
        raise CorruptSuperblock("superblock checksum mismatch")
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(f"disk format version {version}, this build reads {FORMAT_VERSION}")
    try:
        body = msgpack.unpackb(block[_SB_HEAD.size : _SB_HEAD.size + length])
        sb = Superblock(format_version=version, **body)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise CorruptSuperblock(f"superblock unreadable: {e}") from None
    if cluster_id is not None and sb.cluster_id != cluster_id:
        raise ForeignDisk(
            f"disk belongs to cluster {sb.cluster_id!r}, not to cluster {cluster_id!r}"
        )
    return sb


def encode_record(generation: int, body: Any) -> bytes:
    payload = msgpack.packb(body)
    gen = struct.pack("<Q", generation)
    return _REC_HEAD.pack(len(payload), _crc(gen + payload), generation) + payload


def decode_records(area: bytes, generation: int) -> Iterator[tuple[int, Any]]:
    """Yield (end offset, body) of each valid record, stopping at the first that is not."""
    pos = 0
    while pos + _REC_HEAD.size <= len(area):
        length, crc, gen = _REC_HEAD.unpack_from(area, pos)
        start = pos + _REC_HEAD.size
        if length == 0 or start + length > len(area) or gen != generation:
            return
        payload = area[start : start + length]
        if _crc(area[pos + 8 : start] + payload) != crc:
            return
        try:
            body = msgpack.unpackb(payload, strict_map_key=False)
        except (ValueError, msgpack.UnpackException):
            return
        pos = start + length
        yield pos, body


def encode_checkpoint(seq: int, body: Any) -> bytes:
    payload = msgpack.packb(body)
    head = _CKPT_HEAD.pack(_CKPT_MAGIC, seq, len(payload), 0)
    crc = _crc(head[:-4] + payload)
    return _CKPT_HEAD.pack(_CKPT_MAGIC, seq, len(payload), crc) + payload


def decode_checkpoint(area: bytes) -> tuple[int, Any] | None:
    """(seq, body) of a valid checkpoint, None for a torn, blank or corrupt area."""
    if len(area) < _CKPT_HEAD.size:
        return None
    magic, seq, length, crc = _CKPT_HEAD.unpack_from(area)
    end = _CKPT_HEAD.size + length
    if magic != _CKPT_MAGIC or end > len(area):
        return None
    payload = area[_CKPT_HEAD.size : end]
    if _crc(area[: _CKPT_HEAD.size - 4] + payload) != crc:
        return None
    try:
        return seq, msgpack.unpackb(payload, strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        return None


_ZERO_CRC = _crc(bytes(BLOCK))


def _block_csums_py(view: memoryview) -> bytes:
    n = len(view) // BLOCK
    crcs = [_crc(view[i * BLOCK : (i + 1) * BLOCK]) ^ _ZERO_CRC for i in range(n)]
    return struct.pack(f"<{n}I", *crcs)


try:
    from replica._blockcrc import block_crcs as _block_crcs_native
except ImportError:  # built without a C compiler: the same checksums, ~4x the CPU
    _block_csums = _block_csums_py
else:

    def _block_csums(view: memoryview) -> bytes:
        return _block_crcs_native(view, _ZERO_CRC)


def block_csums(data: bytes | bytearray | memoryview) -> bytes:
    """The stored checksums of whole 4 KiB blocks (a short last block is zero-padded)."""
    view = memoryview(data)
    whole = len(view) - len(view) % BLOCK
    out = _block_csums(view[:whole])
    if whole < len(view):
        tail = bytes(view[whole:]) + bytes(BLOCK - (len(view) - whole))
        out += struct.pack("<I", _crc(tail) ^ _ZERO_CRC)
    return out
