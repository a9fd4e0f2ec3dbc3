"""A one-way delay line for the WAN benchmark: an NFQUEUE daemon, in C or Python.

This kernel has no netem (nor fq, so no EDT delays), so a node's one-way
delay is made in user space: an nftables rule sends every packet the node
emits to an NFQUEUE, and this daemon gives the kernel its verdict ACCEPT
``delay`` seconds after the packet was queued. Only the metadata crosses
into user space (copy mode META, GSO packets kept whole), and because every
packet of one queue waits the same time, packets leave in the order they
came: one *batch* verdict ("accept every id up to N") releases all that are
due, so the daemon costs one small message per wake-up, not per packet.

Two implementations speak the same netlink: ``delayline.c`` (built on first
use into the user's cache directory; it reads up to 64 packets per syscall and
takes half the CPU, the rest being the kernel's: docs/performance.md, *The
delay line's own CPU*) and the pure-Python :func:`run` below, the fallback
where no C compiler is found. The delay line's CPU is the emulation's, not anomos': it runs
real-time on the machine the processes under test share.

:class:`DelayLine` starts either inside the benchmark's network namespace as
root; by hand: ``python -m anomos.bench.delayline --queue 0 --delay 0.05``.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import attrs
import platformdirs

from anomos.errors import AnomosError
from anomos.fsutil import atomic_write

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
#: Packets the kernel may hold for us (at 1 Gbit/s x 50 ms, ~2,000 GSO packets).
QUEUE_MAXLEN = 200_000


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


class NfQueue:
    """One bound NFQUEUE: read packet ids, release them by batch verdicts."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))
        flags = struct.pack("!I", NFQA_CFG_F_GSO)
        self._config(_attr(NFQA_CFG_FLAGS, flags) + _attr(NFQA_CFG_MASK, flags))

    def _message(self, kind: int, attrs: bytes, flags: int) -> bytes:
        self._seq += 1
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, self.queue) + attrs
        head = struct.pack(
            "=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, self._seq, 0
        )
        return head + body

    def _config(self, attrs: bytes) -> None:
        self.sock.send(self._message(NFQNL_MSG_CONFIG, attrs, NLM_F_REQUEST | NLM_F_ACK))
        reply = self.sock.recv(65536)
        _length, kind = struct.unpack_from("=IH", reply)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                raise OSError(-error, f"NFQUEUE {self.queue} config: {os.strerror(-error)}")

    def read_ids(self, buf: bytearray) -> list[int]:
        """The packet ids of one datagram of queued-packet messages."""
        n = self.sock.recv_into(buf)
        ids = []
        off = 0
        while off + 16 <= n:
            length, kind = struct.unpack_from("=IH", buf, off)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                a = off + 20
                end = off + length
                while a + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", buf, a)
                    if alen < 4:
                        break
                    if atype & 0x3FFF == NFQA_PACKET_HDR:
                        ids.append(struct.unpack_from("!I", buf, a + 4)[0])
                        break
                    a += (alen + 3) & ~3
            off += (length + 3) & ~3
        return ids

    def accept_through(self, packet_id: int) -> None:
        """ACCEPT every queued packet with an id up to ``packet_id``."""
        attr = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.send(self._message(NFQNL_MSG_VERDICT_BATCH, attr, NLM_F_REQUEST))


def run(queue: int, delay: float) -> None:
    """Hold every packet of ``queue`` for ``delay`` seconds, until killed."""
    try:  # a late wake-up is added delay: ask for the CPU first
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        pass
    nfq = NfQueue(queue)
    due: deque[tuple[float, int]] = deque()
    buf = bytearray(1 << 20)
    print(f"delay line: queue {queue}, {delay * 1000:g} ms (Python)", flush=True)
    while True:
        timeout = None if not due else due[0][0] - time.monotonic()
        if (timeout is None or timeout > 0) and select.select([nfq.sock], [], [], timeout)[0]:
            arrived = time.monotonic() + delay
            due.extend((arrived, i) for i in nfq.read_ids(buf))
        now = time.monotonic()
        last = None
        while due and due[0][0] <= now:
            last = due.popleft()[1]
        if last is not None:
            nfq.accept_through(last)


class Implementation(enum.Enum):
    C = "c"
    PYTHON = "python"


SOURCE = Path(__file__).with_name("delayline.c")


def compiled() -> Path | None:
    """The C delay line, built once per version of its source into the user's
    cache directory; None where no C compiler is found."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = platformdirs.user_cache_path("anomos") / f"delayline-{digest}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        partial = Path(scratch) / "delayline"
        done = subprocess.run(
            [cc, "-O2", "-Wall", "-o", str(partial), str(SOURCE)], capture_output=True, text=True
        )
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
            raise AnomosError(f"building the delay line with {cc}: {first}")
        # Whole or not at all, should two builds race.
        atomic_write(binary, partial.read_bytes(), mode=0o700)
    return binary


def command(
    delay: float, queue: int = 0, implementation: Implementation | None = None
) -> tuple[Implementation, list[str]]:
    """The daemon's command line: the C one unless told otherwise or no compiler exists."""
    if implementation is not Implementation.PYTHON:
        binary = compiled()
        if binary is not None:
            return Implementation.C, [str(binary), str(queue), repr(delay)]
        if implementation is Implementation.C:
            raise AnomosError("the C delay line needs a C compiler (apt-get install gcc)")
    python = [sys.executable, "-m", "anomos.bench.delayline", "--queue", str(queue)]
    return Implementation.PYTHON, [*python, "--delay", repr(delay)]


@attrs.define(eq=False)
class DelayLine:
    """A running delay line (see :func:`command`), started under ``prefix``."""

    implementation: Implementation
    popen: subprocess.Popen[str]

    @classmethod
    def start(
        cls, prefix: Sequence[str], delay: float, implementation: Implementation | None = None
    ) -> DelayLine:
        kind, cmd = command(delay, implementation=implementation)
        popen = subprocess.Popen(
            [*prefix, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert popen.stdout is not None and popen.stderr is not None
        if not popen.stdout.readline():  # bound to its queue once it said so
            popen.wait(5)
            why = popen.stderr.read().strip().splitlines() or [f"exit {popen.returncode}"]
            raise AnomosError(f"the {kind.value} delay line did not start: {why[-1]}")
        return cls(kind, popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> int | None:
        """Stop it (SIGTERM, then SIGKILL after 5 s); its exit status."""
        self.popen.terminate()
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay", type=float, required=True, help="seconds")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run(args.queue, args.delay)
    except OSError as exc:
        print(f"delay line: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
