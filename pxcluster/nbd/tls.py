"""TLS for NBD exposed beyond the node's host: STARTTLS with x509 client certificates.

The certificates live in one directory in the layout libnbd and nbdkit use, so that the URI a
volume is attached under (`nbds://...?tls-certificates=DIR`) works as-is on the node's host:
``ca-cert.pem`` (the CA every client and the server are checked against), ``server-cert.pem``
and ``server-key.pem`` (this node), and for local clients ``client-cert.pem`` and
``client-key.pem``. A client without a certificate from that CA is refused in the TLS
handshake, before it can list or open an export.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pxcluster.errors import InvalidArgument

HANDSHAKE_TIMEOUT = 10.0


def nbd_server_context(directory: str) -> ssl.SSLContext:
    d = Path(directory)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(d / "server-cert.pem", d / "server-key.pem")
        ctx.load_verify_locations(cafile=d / "ca-cert.pem")
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(
            f"--nbd-tls-dir {directory}: needs ca-cert.pem, server-cert.pem, server-key.pem ({e})"
        ) from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
