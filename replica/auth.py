"""Mutual authentication on the replica port: a challenge-response over the cluster key.

Every node of a cluster holds the same random key (32 bytes, created with the cluster and kept
in etcd; a standalone replica server reads it from a file). Before its first request a client
proves it holds the key, and the server proves it back, without the key crossing the wire
(in the manner of DRBD's ``shared-secret`` with ``cram-hmac-alg``):

    server -> {"id": 0, "op": "challenge", "v": 1, "nonce": Ns}
    client -> {"id": 0, "op": "auth", "nonce": Nc, "mac": HMAC(key, "client" | Ns | Nc)}
    server -> {"id": 0, "ok": true, "mac": HMAC(key, "server" | Nc | Ns)}

Fresh nonces on both sides make a recorded exchange worthless on another connection. Frames
before the exchange completes are bounded to ``PREAUTH_MAX_FRAME`` bytes and the exchange to
``AUTH_TIMEOUT`` seconds, so a stranger can pin neither memory nor a connection slot. The
exchange authenticates the connection, not each frame: on a network where an attacker can
inject into a live TCP stream, add TLS (replica/tls.py), which also encrypts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from replica.errors import AuthFailed

KEY_BYTES = 32
NONCE_BYTES = 32
VERSION = 1
PREAUTH_MAX_FRAME = 512  # a challenge or an auth frame is about 120 bytes
AUTH_TIMEOUT = 5.0

_CLIENT = b"pxc replica client\0"
_SERVER = b"pxc replica server\0"


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def check_key(key: bytes) -> bytes:
    if len(key) < 16:
        raise AuthFailed(f"the cluster key has {len(key)} bytes; at least 16 are needed")
    return key


def read_key_file(path: str) -> bytes:
    """A key file holds the key as hex (what ``write_key_file`` writes)."""
    try:
        text = Path(path).read_text().strip()
        return check_key(bytes.fromhex(text))
    except (OSError, ValueError) as e:
        raise AuthFailed(f"cluster key file {path}: {e}") from None


def write_key_file(path: str, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")


def client_mac(key: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(key, _CLIENT + server_nonce + client_nonce, hashlib.sha256).digest()


def server_mac(key: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(key, _SERVER + client_nonce + server_nonce, hashlib.sha256).digest()


def verify(expected: bytes, got: object) -> bool:
    return type(got) is bytes and hmac.compare_digest(expected, got)


def valid_nonce(n: object) -> bool:
    return type(n) is bytes and len(n) == NONCE_BYTES
