"""The ``socks5`` transport: dial every neighbour through a SOCKS5 proxy.

Names are resolved by the proxy (``rdns``), never locally, so a ``.onion`` or
any other host name never reaches this machine's resolver. Listening is plain
TCP, as with the ``tcp`` transport: a SOCKS proxy cannot accept connections
for us (use the ``tor`` transport for an onion listener).

Options: ``socks_proxy`` (``HOST:PORT``, required), ``socks_username`` and
``socks_password`` (optional RFC 1929 credentials; Tor uses them to isolate
circuits).
"""

from __future__ import annotations

import socket
from typing import Any, ClassVar

import click
import gevent
import socks

from anomos import hookimpl
from anomos.config import Settings, join_address, split_address
from anomos.errors import ConfigError, TransportError
from anomos.interfaces import ConnectionHandler, Listener
from anomos.plugins.transports.tcp import TCPTransport

#: Longest host name PySocks encodes correctly in a SOCKS5 request.
MAX_HOST_NAME = 127

#: Tor's extended SOCKS5 replies (SocksPort flag ``ExtendedErrors``).
TOR_SOCKS_ERRORS = {
    0xF0: "onion service descriptor can not be found",
    0xF1: "onion service descriptor is invalid",
    0xF2: "onion service introduction failed",
    0xF3: "onion service rendezvous failed",
    0xF4: "onion service needs client authorization",
    0xF5: "onion service client authorization was refused",
    0xF6: "onion address is invalid",
    0xF7: "onion service introduction timed out",
}


def socks_connect(
    proxy: tuple[str, int],
    address: str,
    *,
    timeout: float,
    what: str = "socks proxy",
    username: str | None = None,
    password: str | None = None,
) -> socket.socket:
    """A stream to ``address`` through the SOCKS5 proxy ``proxy``; names resolved remotely.

    ``what`` names the proxy in errors (``"tor"``): a proxy that cannot be
    reached gives ``<what> is not reachable at HOST:PORT: <reason>``.
    """
    host, port = split_address(address)
    proxy_text = join_address(*proxy)
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        raise TransportError(f"{address} has a host name that cannot be sent to a proxy") from None
    if len(encoded) > MAX_HOST_NAME:
        raise TransportError(f"{address} has a host name longer than {MAX_HOST_NAME} bytes")
    family = socket.AF_INET6 if ":" in proxy[0] else socket.AF_INET
    sock = socks.socksocket(family, socket.SOCK_STREAM)
    sock.set_proxy(
        socks.SOCKS5, proxy[0], proxy[1], rdns=True, username=username, password=password
    )
    sock.settimeout(timeout)
    timer = gevent.Timeout(timeout)
    too_slow = f"{what} at {proxy_text} did not reach {address} within {timeout:g} s"
    try:
        with timer:
            sock.connect((host, port))
    except gevent.Timeout as exc:
        sock.close()
        if exc is not timer:
            raise
        raise TransportError(too_slow) from None
    except socks.ProxyConnectionError as exc:
        sock.close()
        reason = _reason(exc.socket_err) if exc.socket_err else exc.msg
        raise TransportError(f"{what} is not reachable at {proxy_text}: {reason}") from None
    except socks.ProxyError as exc:
        sock.close()
        if isinstance(exc.socket_err, TimeoutError):
            raise TransportError(too_slow) from None
        raise TransportError(
            f"{what} at {proxy_text} cannot reach {address}: {_reply(exc)}"
        ) from None
    except OSError as exc:
        sock.close()
        raise TransportError(f"{what} at {proxy_text} failed: {_reason(exc)}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _reply(exc: socks.ProxyError) -> str:
    """The proxy's refusal in words, including Tor's extended onion-service codes."""
    # PySocks wraps a SOCKS5 refusal (an IOError) in GeneralProxyError("Socket error").
    while isinstance(exc.socket_err, socks.ProxyError):
        exc = exc.socket_err
    text = str(exc.msg)
    if isinstance(exc, socks.SOCKS5Error) and text.startswith("0x"):
        try:
            code = int(text[:4], 16)
        except ValueError:
            code = -1
        return f"{text[:4]}: {TOR_SOCKS_ERRORS[code]}" if code in TOR_SOCKS_ERRORS else text
    if exc.socket_err is not None:
        return f"{text}: {_reason(exc.socket_err)}"
    return text


class SOCKS5Transport:
    """Dial through a SOCKS5 proxy; listen on plain TCP."""

    name: ClassVar[str] = "socks5"

    def __init__(self, settings: Settings) -> None:
        proxy = settings.options.get("socks_proxy")
        if not proxy:
            raise ConfigError("the socks5 transport needs --socks-proxy HOST:PORT")
        self.proxy = split_address(str(proxy))
        self.username = settings.options.get("socks_username")
        self.password = settings.options.get("socks_password")
        self._tcp = TCPTransport(settings)

    def can_dial(self, address: str) -> bool:
        return True

    def dial(self, address: str, *, timeout: float) -> socket.socket:
        return socks_connect(
            self.proxy,
            address,
            timeout=timeout,
            username=self.username,
            password=self.password,
        )

    def listen(self, address: str, handler: ConnectionHandler) -> Listener:
        return self._tcp.listen(address, handler)


@hookimpl
def anomos_register_transports(registry: Any) -> None:
    registry.add(SOCKS5Transport.name, SOCKS5Transport)


@hookimpl
def anomos_add_options(command: click.Command) -> None:
    """``--socks-proxy`` on every command that has ``--transport``."""
    names = {p.name for p in command.params}
    if "transport" in names and "socks_proxy" not in names:
        command.params.append(
            click.Option(
                ["--socks-proxy"],
                metavar="HOST:PORT",
                help="SOCKS5 proxy for --transport socks5 (names are resolved by the proxy).",
            )
        )
