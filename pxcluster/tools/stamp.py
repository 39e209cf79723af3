"""Stamped 4 KiB blocks: each write says which block, which write and which token it is, so a
reader can tell a lost write, a phantom (never issued) and garbage apart.

Layout: magic | block u64 | seq u64 | token u64 | crc32 u32 | filler derived from the token.
The same format is spoken by tests/harness/nbd_stamp_client.py (system Python, stdlib only).
"""

from __future__ import annotations

import hashlib
import struct
import zlib

BLOCK = 4096
MAGIC = b"PXCSTAMP"
_HEAD = struct.Struct("<8sQQQ")
_CRC = struct.Struct("<I")
_FILL_AT = _HEAD.size + _CRC.size


def _filler(token: int) -> bytes:
    seed = hashlib.sha256(token.to_bytes(8, "little")).digest()
    reps = (BLOCK - _FILL_AT) // len(seed) + 1
    return (seed * reps)[: BLOCK - _FILL_AT]


def make(block: int, seq: int, token: int) -> bytes:
    head = _HEAD.pack(MAGIC, block, seq, token)
    return head + _CRC.pack(zlib.crc32(head)) + _filler(token)


def parse(data: bytes) -> tuple[int, int, int] | None:
    """(block, seq, token) for a well-formed stamp; None for an all-zero (never written) block.
    Raises ValueError for anything else: that is garbage."""
    if not any(data):
        return None
    magic, block, seq, token = _HEAD.unpack_from(data)
    (crc,) = _CRC.unpack_from(data, _HEAD.size)
    if magic != MAGIC or crc != zlib.crc32(data[: _HEAD.size]):
        raise ValueError("not a stamp")
    if data[_FILL_AT:BLOCK] != _filler(token):
        raise ValueError("stamp with a corrupt body")
    return block, seq, token
