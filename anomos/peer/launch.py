"""What a peer command does before the peer's own modules are imported.

Those imports (the tracker client, the links and circuits, the torrent session,
with cryptography and http.client behind them) are most of a launch's CPU
time (docs/performance.md, *Fast start, fifth pass*). The command therefore
starts the TCP handshake with its tracker first: the kernel completes it while
the imports run, and the peer's first tracker connection takes the stream
instead of dialling (:class:`TrackerDialAhead`). This module imports nothing
heavy itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import gevent

from anomos.config import join_address
from anomos.errors import AnomosError

#: Seconds without a new piece after which a one-shot download gives up.
DEFAULT_STALL_LIMIT = 120.0


def process_started() -> float:
    """When this process was launched, on the :func:`time.monotonic` clock (Linux: from
    ``/proc``, 10 ms resolution; elsewhere: now)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # Field 22, counted after the command name (which may hold spaces).
            started_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        age = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic()
    return time.monotonic() - max(0.0, age)


def tracker_address(url: str) -> str | None:
    """``HOST:PORT`` of an ``https://`` tracker URL; None if it is not one (the tracker
    client, built later, says what is wrong with it)."""
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port or 443
    except ValueError:
        return None
    if parsed.scheme != "https" or not parsed.hostname:
        return None
    return join_address(parsed.hostname, port)


class TrackerDialAhead:
    """A stream to the tracker, dialled by the peer's transport before the peer exists.

    :meth:`take` hands it to the peer's first tracker connection, once; a dial that
    failed hands nothing, and the connection dials again and reports why.
    """

    def __init__(self, address: str, dial: Callable[[str, float], socket.socket], timeout: float):
        self.address = address
        self._dialling: gevent.Greenlet | None = gevent.spawn(_quietly, dial, address, timeout)
        gevent.sleep(0)  # its SYN leaves now; the kernel completes the handshake meanwhile

    @classmethod
    def start(cls, plugins: Any, settings: Any, url: str) -> TrackerDialAhead | None:
        """Dial the tracker of ``url`` with the peer's transport, if that is ``tcp``
        (others, e.g. tor, come up with the peer)."""
        address = tracker_address(url)
        if address is None or settings.transport != "tcp":
            return None
        transport = plugins.transport(settings.transport, settings)
        if not transport.can_dial(address):
            return None
        return cls(
            address,
            lambda a, t: transport.dial(a, timeout=t),  # type: ignore[no-any-return]
            settings.connect_timeout * 3,
        )

    def settle(self) -> None:
        """Let the dial finish if its handshake has completed in the kernel meanwhile (a
        busy launch gave its greenlet no turn), without waiting for the network."""
        if self._dialling is not None and not self._dialling.ready():
            gevent.idle()

    def take(self, address: str) -> socket.socket | None:
        """The stream, if it goes to ``address`` and was opened (waits for its
        handshake); None otherwise, and on every later call."""
        dialling, self._dialling = self._dialling, None
        if dialling is None:
            return None
        if address != self.address:
            _discard(dialling)
            return None
        return dialling.get()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the stream if nobody took it."""
        dialling, self._dialling = self._dialling, None
        if dialling is not None:
            _discard(dialling)


def _quietly(
    dial: Callable[[str, float], socket.socket], address: str, timeout: float
) -> socket.socket | None:
    """The stream, or None if the dial failed (the peer's own dial says why)."""
    try:
        return dial(address, timeout)
    except (AnomosError, OSError):
        return None


def _discard(dialling: gevent.Greenlet) -> None:
    dialling.kill(block=True, timeout=1)
    if dialling.successful() and dialling.value is not None:
        with contextlib.suppress(OSError):
            dialling.value.close()
