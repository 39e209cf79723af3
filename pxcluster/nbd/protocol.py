"""The NBD wire format in one place: magics, flags, option/command numbers, struct layouts.

Only what the server speaks is here (fixed newstyle handshake, simple and structured
replies). Numbers follow NetworkBlockDevice/nbd doc/proto.md. All integers are big-endian.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

# --- handshake -------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC: Final = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
HANDSHAKE_FLAGS: Final = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
KNOWN_CLIENT_FLAGS: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# Transmission flags.
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- transmission ----------------------------------------------------------------------
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_ERROR: Final = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) | 2

# NBD error numbers are fixed by the protocol; they happen to equal Linux errno values, but
# the table below keeps the mapping explicit so a non-Linux errno never leaks onto the wire.
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

ERRNO_TO_NBD: Final[dict[int, int]] = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

# --- struct layouts --------------------------------------------------------------------
# Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
GREETING: Final = struct.Struct(">QQH")
CLIENT_FLAGS: Final = struct.Struct(">I")
# Option request header: IHAVEOPT, option, length.
OPTION_HEADER: Final = struct.Struct(">QII")
# Option reply header: magic, option, reply type, length.
OPTION_REPLY: Final = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME success: size, transmission flags (then 124 zeroes unless NO_ZEROES).
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
EXPORT_NAME_PAD: Final = bytes(124)
# NBD_REP_INFO payloads.
INFO_EXPORT_REPLY: Final = struct.Struct(">HQH")
INFO_BLOCK_SIZE_REPLY: Final = struct.Struct(">HIII")
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")

# Request: magic, command flags, type, cookie, offset, length.
REQUEST: Final = struct.Struct(">IHHQQI")
# Simple reply: magic, error, cookie.
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
# Structured reply chunk header: magic, flags, type, cookie, payload length.
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")
# NBD_REPLY_TYPE_OFFSET_DATA header = chunk header + offset, data follows.
STRUCTURED_READ: Final = struct.Struct(">IHHQIQ")
# NBD_REPLY_TYPE_ERROR = chunk header + error + message length, message follows.
STRUCTURED_ERROR: Final = struct.Struct(">IHHQIIH")

MAX_NAME_LENGTH: Final = 4096
# Bigger than any valid option this server understands (INFO with a 4 KiB name and a few
# info requests); anything longer is hostile or broken and the connection is dropped
# rather than buffering it.
MAX_OPTION_LENGTH: Final = 16384
