"""The default transport: plain TCP (neighbour links add TLS on top).

Outgoing connections are bound to the host of ``--listen`` so that a peer on
127.0.0.7 is seen by everyone as 127.0.0.7, never as 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, ClassVar

from gevent.pool import Pool
from gevent.server import StreamServer

from anomos import hookimpl
from anomos.config import Settings, is_onion, join_address, split_address
from anomos.errors import TransportError
from anomos.interfaces import ConnectionHandler

#: Connections a listener serves at once; more wait in the kernel backlog.
MAX_CONNECTIONS = 1024


def _connect(host: str, port: int, timeout: float, source: tuple[str, int] | None) -> socket.socket:
    """``create_connection``, but an IP address is dialled at once: a name goes through
    gevent's resolver thread first, so the SYN would only leave once this greenlet runs
    again (a launch dials its tracker ahead of its imports: anomos.peer.launch)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection((host, port), timeout=timeout, source_address=source)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind(source)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class TCPListener:
    def __init__(self, server: StreamServer, address: str) -> None:
        self._server = server
        self.address = address

    def close(self) -> None:
        self._server.close()


class TCPTransport:
    """Direct TCP over IPv4 or IPv6; refuses .onion addresses."""

    name: ClassVar[str] = "tcp"

    def __init__(self, settings: Settings) -> None:
        self.source_host = settings.listen_host

    def can_dial(self, address: str) -> bool:
        return not is_onion(address)

    def dial(self, address: str, *, timeout: float) -> socket.socket:
        if is_onion(address):
            raise TransportError(f"tcp cannot reach onion address {address}; use the tor transport")
        host, port = split_address(address)
        source = (self.source_host, 0) if self.source_host not in ("", "0.0.0.0", "::") else None
        try:
            sock = _connect(host, port, timeout, source)
        except OSError as exc:
            raise TransportError(f"cannot connect to {address}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock

    def listen(self, address: str, handler: ConnectionHandler) -> TCPListener:
        host, port = split_address(address)

        def handle(sock: socket.socket, peer: Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler(sock, join_address(peer[0], peer[1]))

        server = StreamServer((host, port), handle, spawn=Pool(MAX_CONNECTIONS))
        try:
            server.start()
        except OSError as exc:
            raise TransportError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        return TCPListener(server, join_address(host, server.server_port))


@hookimpl
def anomos_register_transports(registry: Any) -> None:
    registry.add(TCPTransport.name, TCPTransport)
