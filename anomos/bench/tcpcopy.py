"""The baseline: a plain TCP copy of a file between two processes, no gevent, no crypto.

``python -m anomos.bench.tcpcopy recv HOST DEST`` listens on ``HOST:0``,
prints ``{"port": N}``, receives one connection into ``DEST`` (``recv_into`` a
1 MiB buffer, ``write``, ``fsync`` at the end, as the downloader's storage
does) and prints ``{"bytes": ..., "seconds": ...}`` timed from accept to fsync.
``python -m anomos.bench.tcpcopy send FILE HOST:PORT`` reads the file in 1 MiB
chunks and ``sendall``\\ s them. This is the ceiling for moving those bytes
between two Python processes on this machine; anomos results are given as a
ratio to it, measured in the same run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

CHUNK = 1 << 20


def receive(host: str, dest: str) -> dict[str, float]:
    with socket.socket() as listener:
        listener.bind((host, 0))
        listener.listen(1)
        print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
        conn, _ = listener.accept()
    t0 = time.perf_counter()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with conn:
            while n := conn.recv_into(buf):
                written = 0
                while written < n:
                    written += os.write(fd, view[written:n])
                total += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": total, "seconds": time.perf_counter() - t0}


def send(path: str, address: str) -> None:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port))) as sock, open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            sock.sendall(view[:n])


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "recv":
        print(json.dumps(receive(argv[1], argv[2])), flush=True)
        return 0
    if len(argv) == 3 and argv[0] == "send":
        send(argv[1], argv[2])
        return 0
    sys.stderr.write("usage: tcpcopy recv HOST DEST | tcpcopy send FILE HOST:PORT\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
