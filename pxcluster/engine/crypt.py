"""Encryption at rest for a volume: AES-256-XTS per 4 KiB block, the block number as tweak.

The engine encrypts before data leaves the attach node, so replicas, rebuild traffic and
backups hold only ciphertext. A block that was never written (or was trimmed) reads as zeros
from the replicas; an all-zero ciphertext block is taken to be such a hole and reads as zeros
(a real ciphertext is all zeros with probability 2^-32768).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 4096
KEY_BYTES = 64  # AES-256-XTS takes two 256-bit keys
_ZERO = bytes(BLOCK)


def derive_key(material: bytes, volume_id: str) -> bytes:
    """A 64-byte XTS key from operator key material (HKDF-SHA512, the volume id as salt), so
    one key file can serve many volumes without two of them sharing a key."""
    if len(material) < 16:
        raise ValueError("key material must be at least 16 bytes")
    prk = hmac.new(volume_id.encode(), material, hashlib.sha512).digest()
    okm = hmac.new(prk, b"pxcluster volume xts\x01", hashlib.sha512).digest()
    if okm[:32] == okm[32:]:  # XTS refuses equal halves; astronomically unlikely
        raise ValueError("degenerate key")
    return okm


def random_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


class BlockCipher:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an XTS key is {KEY_BYTES} bytes, not {len(key)}")
        self._alg = algorithms.AES(key)

    def _tweak(self, block: int) -> modes.XTS:
        return modes.XTS(block.to_bytes(16, "little"))

    def encrypt(self, first_block: int, data: bytes | bytearray | memoryview) -> bytes:
        """`data` is whole blocks starting at block `first_block`."""
        out = bytearray(len(data))
        view = memoryview(data)
        for i in range(0, len(data), BLOCK):
            enc = Cipher(self._alg, self._tweak(first_block + i // BLOCK)).encryptor()
            out[i : i + BLOCK] = enc.update(view[i : i + BLOCK]) + enc.finalize()
        return bytes(out)

    def decrypt(self, first_block: int, data: bytes) -> bytes:
        out = bytearray(len(data))
        view = memoryview(data)
        for i in range(0, len(data), BLOCK):
            chunk = view[i : i + BLOCK]
            if chunk == _ZERO:
                continue  # a hole: plaintext zeros (out is zero-filled already)
            dec = Cipher(self._alg, self._tweak(first_block + i // BLOCK)).decryptor()
            out[i : i + BLOCK] = dec.update(chunk) + dec.finalize()
        return bytes(out)
