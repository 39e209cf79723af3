"""TLS with client certificates on the replica port (optional).

Every node holds a certificate signed by the cluster's replica CA (`cluster join --data-tls-cert
F --data-tls-key F --data-tls-ca F`). The server accepts only clients presenting a certificate
signed by that CA; a client verifies the server against the same CA and checks that the
server's certificate names the address it dialled (so each node's certificate carries its
`--address` as a subjectAltName, IP or DNS).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

# A handshake that has not finished by then is a client that is not going to finish it.
HANDSHAKE_TIMEOUT = 10.0


class TlsConfigError(ValueError):
    """The certificate, key or CA files are missing or unusable."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str

    @staticmethod
    def from_options(cert: str, key: str, ca: str) -> TlsFiles | None:
        """None when no option is given; all three or a clear error otherwise."""
        given = [bool(cert), bool(key), bool(ca)]
        if not any(given):
            return None
        if not all(given):
            raise TlsConfigError(
                "--data-tls-cert, --data-tls-key and --data-tls-ca go together: give all three"
            )
        for what, path in (("cert", cert), ("key", key), ("ca", ca)):
            if not Path(path).is_file():
                raise TlsConfigError(f"--data-tls-{what} {path}: no such file")
        return TlsFiles(cert, key, ca)


def _base(protocol: ssl._SSLMethod, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
        ctx.load_verify_locations(cafile=files.ca)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(
            f"replica TLS files unusable ({files.cert}, {files.ca}): {e}"
        ) from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """Listens with the node's certificate; requires a client certificate from the CA."""
    return _base(ssl.PROTOCOL_TLS_SERVER, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """Presents the node's certificate; verifies the server against the CA and its address."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = True
    return ctx
