"""Fixed newstyle option haggling, without I/O.

`Negotiation` is fed one complete option at a time by the connection and answers with the
bytes to send and what happens next. Keeping it free of sockets lets the server's hot
path (transmission) stay a small, separate state machine.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from pxcluster.nbd import protocol as p
from pxcluster.nbd.export import ExportRegistry

_BASE_TRANSMISSION_FLAGS = (
    p.FLAG_HAS_FLAGS
    | p.FLAG_SEND_FLUSH
    | p.FLAG_SEND_FUA
    | p.FLAG_SEND_TRIM
    | p.FLAG_SEND_WRITE_ZEROES
    | p.FLAG_CAN_MULTI_CONN
)
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096


class Next(enum.Enum):
    CONTINUE = enum.auto()  # more options may follow
    TRANSMIT = enum.auto()  # enter the transmission phase with `Outcome.export`
    STARTTLS = enum.auto()  # send `Outcome.send`, then upgrade the connection to TLS
    CLOSE = enum.auto()  # send `Outcome.send`, then drop the connection


@dataclass(slots=True)
class Outcome:
    next: Next
    send: list[bytes] = field(default_factory=list)
    export_name: str = ""


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


class Negotiation:
    def __init__(
        self, registry: ExportRegistry, max_request: int, *, tls_required: bool = False
    ) -> None:
        self.registry = registry
        self.max_request = max_request
        self.no_zeroes = False
        self.structured = False
        # With TLS required, nothing but STARTTLS and ABORT is answered before TLS is up:
        # a client without the cluster's certificate learns not even the export names.
        self.tls_required = tls_required
        self.tls_active = False

    def tls_started(self) -> None:
        """The spec: what was negotiated in plain text is forgotten once TLS is up."""
        self.tls_active = True
        self.structured = False

    def transmission_flags(self) -> int:
        flags = _BASE_TRANSMISSION_FLAGS
        if self.structured:
            # Every read reply is one chunk, so "do not fragment" is always honoured.
            flags |= p.FLAG_SEND_DF
        return flags

    def client_flags(self, flags: int) -> bool:
        """False if the connection must be dropped (unknown client flags, per the spec)."""
        if flags & ~p.KNOWN_CLIENT_FLAGS:
            return False
        self.no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
        return True

    def option(self, option: int, data: bytes) -> Outcome:
        if option == p.OPT_STARTTLS and self.tls_required:
            if self.tls_active or data:
                return self._error(option, p.REP_ERR_INVALID, "TLS is already up, or data given")
            return Outcome(Next.STARTTLS, [option_reply(option, p.REP_ACK)])
        if self.tls_required and not self.tls_active and option != p.OPT_ABORT:
            if option == p.OPT_EXPORT_NAME:
                return Outcome(Next.CLOSE)  # no error reply exists for it: drop
            return self._error(option, p.REP_ERR_TLS_REQD, "TLS is required (STARTTLS)")
        if option == p.OPT_EXPORT_NAME:
            return self._export_name(data)
        if option in (p.OPT_GO, p.OPT_INFO):
            return self._info(option, data)
        if option == p.OPT_LIST:
            if data:
                return self._error(option, p.REP_ERR_INVALID, "LIST takes no data")
            send = []
            for name in self.registry.names():
                raw = name.encode()
                send.append(option_reply(option, p.REP_SERVER, p.U32.pack(len(raw)) + raw))
            send.append(option_reply(option, p.REP_ACK))
            return Outcome(Next.CONTINUE, send)
        if option == p.OPT_ABORT:
            return Outcome(Next.CLOSE, [option_reply(option, p.REP_ACK)])
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                return self._error(option, p.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            self.structured = True
            return Outcome(Next.CONTINUE, [option_reply(option, p.REP_ACK)])
        return self._error(option, p.REP_ERR_UNSUP, "option not supported")

    def _error(self, option: int, reply_type: int, message: str) -> Outcome:
        return Outcome(Next.CONTINUE, [option_reply(option, reply_type, message.encode())])

    def _export_name(self, data: bytes) -> Outcome:
        # EXPORT_NAME cannot carry an error reply: the spec says to drop the connection.
        try:
            name = data.decode()
        except UnicodeDecodeError:
            return Outcome(Next.CLOSE)
        export = self.registry.get(name)
        if export is None:
            return Outcome(Next.CLOSE)
        reply = p.EXPORT_NAME_REPLY.pack(export.size, self.transmission_flags())
        if not self.no_zeroes:
            reply += p.EXPORT_NAME_PAD
        return Outcome(Next.TRANSMIT, [reply], name)

    def _info(self, option: int, data: bytes) -> Outcome:
        try:
            (name_len,) = p.U32.unpack_from(data, 0)
            if name_len > p.MAX_NAME_LENGTH:
                raise ValueError("name too long")
            name = data[4 : 4 + name_len].decode()
            (count,) = p.U16.unpack_from(data, 4 + name_len)
        except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
            return self._error(option, p.REP_ERR_INVALID, "malformed INFO/GO request")
        if len(data) != 4 + name_len + 2 + 2 * count:
            return self._error(option, p.REP_ERR_INVALID, "INFO/GO length mismatch")
        export = self.registry.get(name)
        if export is None:
            return self._error(option, p.REP_ERR_UNKNOWN, f"unknown export {name!r}")
        send = [
            option_reply(
                option,
                p.REP_INFO,
                p.INFO_EXPORT_REPLY.pack(p.INFO_EXPORT, export.size, self.transmission_flags()),
            ),
            # Sent even when not requested: with a minimum of 1 it restricts nothing, and
            # it tells clients the largest request we take before they hit EOVERFLOW.
            option_reply(
                option,
                p.REP_INFO,
                p.INFO_BLOCK_SIZE_REPLY.pack(
                    p.INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, self.max_request
                ),
            ),
            option_reply(option, p.REP_ACK),
        ]
        if option == p.OPT_GO:
            return Outcome(Next.TRANSMIT, send, name)
        return Outcome(Next.CONTINUE, send)
