"""The floor of a chunk copy between two processes: the least any rebuild can do per chunk on
this machine, with none of ours (no framing, checksums, generations, dirty log, etcd).

A sender process reads 4 MiB chunks of a page-cached file and sends each, behind an 8-byte
index, on one of `streams` loopback connections; the receiver receives it into a page-aligned
buffer, writes it with O_DIRECT straight from there, fdatasyncs and answers one byte. Both ends
use plain blocking sockets in threads, the cheapest way Python has to move bytes.

`bench/rebuild_bench.py --floor` runs it in the same run as the disk references and the
rebuild, so the rebuild's rate can be read against what the copy itself allows.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import socket
import threading
import time
from multiprocessing.queues import Queue
from pathlib import Path

CHUNK = 4 << 20
_INDEX = 8


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _receive(path: Path, chunks: int, streams: int, ports: Queue[int]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with open(path, "wb") as f:
        f.truncate(chunks * CHUNK)
    fd = os.open(path, os.O_RDWR)
    dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    ports.put(listener.getsockname()[1])

    def serve(conn: socket.socket) -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
        view = memoryview(buf)
        index = bytearray(_INDEX)
        while _recv_exactly(conn, memoryview(index)) and _recv_exactly(conn, view):
            os.pwrite(dfd, buf, int.from_bytes(index, "little") * CHUNK)
            os.fdatasync(fd)
            conn.sendall(b"k")
        conn.close()

    threads = []
    for _ in range(streams):
        conn, _addr = listener.accept()
        t = threading.Thread(target=serve, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    os.close(dfd)
    os.close(fd)


def copy_floor_mib_s(directory: Path, size: int, *, streams: int = 8) -> float:
    """MiB/s of copying `size` bytes (whole chunks) from a cached file to another process's
    file, durable chunk by chunk, `streams` chunks in flight (the rebuild's default)."""
    chunks = max(1, size // CHUNK)
    source, target = directory / "floor-src.img", directory / "floor-dst.img"
    with open(source, "wb") as f:
        for _ in range(chunks):
            f.write(os.urandom(CHUNK))
    with open(source, "rb") as f:  # in the page cache, as a source replica's recent writes are
        while f.read(CHUNK):
            pass
    ports: Queue[int] = multiprocessing.Queue()
    receiver = multiprocessing.Process(target=_receive, args=(target, chunks, streams, ports))
    receiver.start()
    try:
        port = ports.get(timeout=30)
        src = os.open(source, os.O_RDONLY)
        next_chunk = iter(range(chunks))
        lock = threading.Lock()
        errors: list[BaseException] = []

        def send() -> None:
            try:
                stream()
            except BaseException as e:  # reported by the caller, not lost in a thread
                errors.append(e)

        def stream() -> None:
            with socket.create_connection(("127.0.0.1", port)) as conn:
                while True:
                    with lock:
                        i = next(next_chunk, None)
                    if i is None:
                        return
                    data = os.pread(src, CHUNK, i * CHUNK)
                    conn.sendall(i.to_bytes(_INDEX, "little"))
                    conn.sendall(data)
                    if conn.recv(1) != b"k":
                        raise RuntimeError("floor receiver closed early")

        senders = [threading.Thread(target=send) for _ in range(streams)]
        start = time.monotonic()
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        elapsed = time.monotonic() - start
        os.close(src)
        if errors:
            raise errors[0]
    finally:
        receiver.join(60)
        if receiver.is_alive():
            receiver.kill()
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    return chunks * CHUNK / elapsed / (1 << 20)
