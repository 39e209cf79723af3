"""Stamped-block workload over libnbd, run with Debian's /usr/bin/python3 (python3-libnbd).

  write URIFILE NBLOCKS SECONDS SEED [SHARE INDEX]
                                      -> lines "ack BLOCK SEQ TOKEN TIME" /
                                         "fail BLOCK SEQ TOKEN TIME ERROR";
                                         with SHARE, only blocks with BLOCK % SHARE == INDEX
                                         (several writers, each block written by one of them);
                                         TIME is time.monotonic() when the reply came (the
                                         clock is system-wide, so the test process can tell
                                         writes acknowledged after a fault it caused); SIGTERM
                                         ends the run after the write in progress
  read URI NBLOCKS                    -> lines "blk BLOCK SEQ TOKEN" / "zero BLOCK" / "bad BLOCK"

URIFILE holds the volume's current NBD URI; after a failed write the writer reconnects to
whatever it says then, so it follows a volume that moves. Stdlib + libnbd only: the stamp
format of pxcluster/tools/stamp.py is repeated here, and tests/unit/tools/test_stamp.py checks
they agree.
"""

import hashlib
import random
import signal
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


STOP = []


def _stop(signum, frame):
    # Finish the write in flight and report it: killed mid-write, an acknowledged write would
    # go unrecorded and read back as a phantom.
    STOP.append(signum)


def write(urifile, nblocks, seconds, seed, share=1, index=0):
    signal.signal(signal.SIGTERM, _stop)
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    h = None
    seq = 0
    out = sys.stdout
    while time.monotonic() < deadline and not STOP:
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
            out.write(f"ack {block} {seq} {token} {time.monotonic():.6f}\n")
        except Exception as e:
            out.write(f"fail {block} {seq} {token} {time.monotonic():.6f} {type(e).__name__}\n")
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
