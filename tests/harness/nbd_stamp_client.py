"""Stamped-block workload over libnbd, run with Debian's /usr/bin/python3 (python3-libnbd).

  write URIFILE NBLOCKS SECONDS SEED [SHARE INDEX]
                                      -> lines "ack BLOCK SEQ TOKEN" / "fail BLOCK SEQ TOKEN";
                                         with SHARE, only blocks with BLOCK % SHARE == INDEX
                                         (several writers, each block written by one of them)
  read URI NBLOCKS                    -> lines "blk BLOCK SEQ TOKEN" / "zero BLOCK" / "bad BLOCK"

URIFILE holds the volume's current NBD URI; after a failed write the writer reconnects to
whatever it says then, so it follows a volume that moves. Stdlib + libnbd only: the stamp
format of pxcluster/stamp.py is repeated here, and tests/unit/test_stamp.py checks they agree.
"""

import hashlib
import random
import struct
import sys
import time
import zlib

import nbd

BLOCK = 4096
MAGIC = b"PXCSTAMP"
HEAD = struct.Struct("<8sQQQ")
FILL_AT = HEAD.size + 4


def filler(token):
    seed = hashlib.sha256(token.to_bytes(8, "little")).digest()
    return (seed * ((BLOCK - FILL_AT) // len(seed) + 1))[: BLOCK - FILL_AT]


def make(block, seq, token):
    head = HEAD.pack(MAGIC, block, seq, token)
    return head + struct.pack("<I", zlib.crc32(head)) + filler(token)


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def write(urifile, nblocks, seconds, seed, share=1, index=0):
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    h = None
    seq = 0
    out = sys.stdout
    while time.monotonic() < deadline:
        if h is None:
            try:
                with open(urifile) as f:
                    h = connect(f.read().strip())
            except Exception:
                time.sleep(0.1)
                continue
        seq += 1
        block = rng.randrange(index, nblocks, share)
        token = rng.getrandbits(63)
        try:
            h.pwrite(make(block, seq, token), block * BLOCK)
            out.write(f"ack {block} {seq} {token}\n")
        except Exception as e:
            out.write(f"fail {block} {seq} {token} {type(e).__name__}\n")
            try:
                h.shutdown()
            except Exception:
                pass
            h = None
        out.flush()


def read(uri, nblocks):
    h = connect(uri)
    out = sys.stdout
    for b in range(nblocks):
        data = h.pread(BLOCK, b * BLOCK)
        if not any(data):
            out.write(f"zero {b}\n")
            continue
        magic, block, seq, token = HEAD.unpack_from(data)
        (crc,) = struct.unpack_from("<I", data, HEAD.size)
        if (
            magic != MAGIC
            or block != b
            or crc != zlib.crc32(data[: HEAD.size])
            or data[FILL_AT:] != filler(token)
        ):
            out.write(f"bad {b}\n")
        else:
            out.write(f"blk {b} {seq} {token}\n")
    out.flush()


if __name__ == "__main__":
    if sys.argv[1] == "write":
        extra = [int(a) for a in sys.argv[6:8]]
        write(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), *extra)
    else:
        read(sys.argv[2], int(sys.argv[3]))
