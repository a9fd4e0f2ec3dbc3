"""Shared pieces of the Tor tests: one private Tor network per module, an echo server,
and a resolver that refuses ``.onion`` names.

Import what a module needs (``from conftest_tor import tor_network, ...``); pytest
does not load this file by itself.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import gevent
import gevent._socketcommon
import gevent.socket
import pytest
from gevent.server import StreamServer

from anomos.tor.testnet import TorTestNetwork, tor_available

log = logging.getLogger(__name__)

skip_without_tor = pytest.mark.skipif(
    not tor_available(), reason="tor and tor-gencert are not installed (apt-get install tor)"
)
#: Marks for every test that needs a running private Tor network.
needs_tor = [pytest.mark.tor, pytest.mark.slow, skip_without_tor]

#: Measured by the fixture, reported by the tests (-s shows them).
timings: dict[str, float] = {}


@pytest.fixture(scope="module")
def tor_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorTestNetwork]:
    """One private Tor network (3 authorities, 2 relays, client, onion service) per module."""
    network = TorTestNetwork(tmp_path_factory.mktemp("tornet"))
    began = time.monotonic()
    network.start()
    timings["network_ready"] = time.monotonic() - began
    print(f"\nprivate Tor network ready in {timings['network_ready']:.1f} s")
    try:
        yield network
    finally:
        network.stop()


class EchoServer:
    """A gevent TCP server that sends back what it receives; counts its connections."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.connections = 0
        self.server = StreamServer((host, 0), self._handle)
        self.server.start()
        self.port: int = self.server.server_port

    def _handle(self, sock: socket.socket, _peer: object) -> None:
        self.connections += 1
        with sock:
            while data := sock.recv(65536):
                sock.sendall(data)

    def close(self) -> None:
        self.server.stop(timeout=1)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def echo_roundtrip(sock: socket.socket, payload: bytes, timeout: float = 30) -> bytes:
    """Send ``payload`` and read back as many bytes."""
    got = b""
    with gevent.Timeout(timeout), sock:
        sock.sendall(payload)
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


@pytest.fixture
def onion_dns_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every local name lookup of a ``.onion`` fail; returns the names that were tried."""
    tried: list[str] = []

    def guard(real):  # type: ignore[no-untyped-def]
        def lookup(host, *args, **kwargs):  # type: ignore[no-untyped-def]
            name = host.decode() if isinstance(host, bytes) else str(host)
            if name.lower().rstrip(".").endswith(".onion"):
                tried.append(name)
                raise socket.gaierror(socket.EAI_NONAME, "onion names must not be resolved locally")
            return real(host, *args, **kwargs)

        return lookup

    for module in (socket, gevent.socket, gevent._socketcommon):
        for fname in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
            if hasattr(module, fname):
                monkeypatch.setattr(module, fname, guard(getattr(module, fname)))
    return tried
