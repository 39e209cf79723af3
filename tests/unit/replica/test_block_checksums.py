"""The per-block checksums (disk format 2): the native helper and the Python path agree with
crc32c computed block by block, for every length and alignment a caller passes."""

from __future__ import annotations

import os
import struct

import crc32c
import pytest

from replica import ondisk
from replica.ondisk import BLOCK, block_csums


def expected(data: bytes) -> bytes:
    zero = crc32c.crc32c(bytes(BLOCK))
    out = b""
    for i in range(0, len(data), BLOCK):
        block = data[i : i + BLOCK].ljust(BLOCK, b"\0")
        out += struct.pack("<I", crc32c.crc32c(block) ^ zero)
    return out


@pytest.mark.parametrize(
    "size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 5 * BLOCK + 7, 1 << 20]
)
def test_block_checksums_match_crc32c_per_block(size: int) -> None:
    data = os.urandom(size)
    assert block_csums(data) == expected(data)
    assert block_csums(bytearray(data)) == expected(data)


def test_unaligned_view_and_python_path_agree() -> None:
    raw = os.urandom(9 * BLOCK + 3)
    view = memoryview(raw)[3:]
    assert block_csums(view) == expected(bytes(view))
    assert ondisk._block_csums_py(view) == expected(bytes(view))


def test_a_zero_block_checksums_to_zero() -> None:
    # A slot never written reads as zeros, and its checksum area is zeros: they must agree.
    assert block_csums(bytes(4 * BLOCK)) == bytes(16)


def test_the_native_helper_is_built() -> None:
    # The install builds it (setup.py); without it every write and read pays ~4x the CPU.
    from replica import _blockcrc

    assert _blockcrc.block_crcs(bytes(BLOCK), 0) == struct.pack("<I", crc32c.crc32c(bytes(BLOCK)))
