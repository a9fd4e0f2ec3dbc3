"""The ``tor`` transport: every dial goes through Tor, the listener is a v3 onion service.

Attaches to a running tor through its ControlPort (``tor_control``, default
``127.0.0.1:9051``, or ``unix:/run/tor/control``) or, with ``tor_launch``,
starts one of its own. Dials every address, clearnet or ``.onion``, through
the tor's SOCKS port with remote name resolution, so no name ever reaches the
local resolver. There is no silent weakening: when tor is unreachable the
transport raises :class:`TransportError` at construction, listen or dial, and
never falls back to a direct connection.

Options (``settings.options``):

``tor_control``        ``HOST:PORT`` or ``unix:PATH`` of the ControlPort.
``tor_password``       ControlPort password (cookie and no-auth need none).
``tor_socks``          ``HOST:PORT`` of the SOCKS port; default: asked from tor.
``tor_launch``         start a private tor in ``STATE_DIR/tor`` instead of attaching.
``tor_launch_config``  extra torrc options for a launched tor (dict).
``onion_key``          file of the listener's onion key; default ``STATE_DIR/onion_key``.
``onion_client_auth``  base32 X25519 public keys allowed to reach the listener.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click
import gevent

from anomos import hookimpl
from anomos.config import Settings, join_address, split_address
from anomos.errors import TransportError
from anomos.interfaces import ConnectionHandler
from anomos.plugins.transports.socks5 import socks_connect
from anomos.plugins.transports.tcp import TCPTransport
from anomos.tor import DEFAULT_CONTROL

if TYPE_CHECKING:
    from stem.control import Controller

    from anomos.tor.control import LaunchedTor

log = logging.getLogger(__name__)

_LOOPBACK_PREFIXES = ("127.", "::1", "localhost")


class TorListener:
    """A local TCP listener published as ``xxx.onion:port``."""

    def __init__(self, local: Any, address: str, controller: Controller) -> None:
        self._local = local
        self._controller = controller
        self.address = address

    def close(self) -> None:
        from anomos.tor import onion

        onion.unpublish(self._controller, self.address.rpartition(":")[0])
        self._local.close()


#: Seconds between tries when an onion's descriptor is not found yet.
DESCRIPTOR_RETRY = 2.0


class TorTransport:
    """Dial through Tor's SOCKS port; listen as a v3 onion service."""

    name: ClassVar[str] = "tor"
    #: Every caller of our onion arrives from the local tor: no per-address cap.
    callers_share_an_address: ClassVar[bool] = True

    def __init__(self, settings: Settings) -> None:
        # stem only once Tor is used: every other peer starts faster without it.
        from anomos.tor.control import connect_control, launch_tor, socks_address

        opts = settings.options
        self._tcp = TCPTransport(settings)
        self._launched: LaunchedTor | None = None
        if opts.get("tor_launch"):
            self._launched = launch_tor(
                Path(settings.state_dir) / "tor", extra_config=opts.get("tor_launch_config")
            )
            self.controller = self._launched.controller
            self.control_address = self._launched.control_address
        else:
            self.control_address = str(opts.get("tor_control") or DEFAULT_CONTROL)
            self.controller = connect_control(
                self.control_address,
                password=opts.get("tor_password"),
                timeout=settings.connect_timeout,
            )
        try:
            socks_text = opts.get("tor_socks")
            if socks_text:
                self.socks = split_address(str(socks_text))
            else:
                self.socks = socks_address(self.controller, self.control_address)
        except BaseException:
            self.close()
            raise
        key = opts.get("onion_key")
        self.onion_key_path = Path(key) if key else Path(settings.state_dir) / "onion_key"
        self.client_auth: tuple[str, ...] = tuple(opts.get("onion_client_auth") or ())

    def can_dial(self, address: str) -> bool:
        return True

    def dial(self, address: str, *, timeout: float) -> socket.socket:
        """Through Tor's SOCKS port. A fresh onion's descriptor may not have reached
        the directory this tor asks yet (Tor's 0xf0): that case is retried briefly."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return socks_connect(self.socks, address, timeout=timeout, what="tor")
            except TransportError as exc:
                if "0xf0" not in str(exc) or time.monotonic() + DESCRIPTOR_RETRY > deadline:
                    raise
                log.info("%s; retrying in %g s", exc, DESCRIPTOR_RETRY)
                gevent.sleep(DESCRIPTOR_RETRY)

    def listen(self, address: str, handler: ConnectionHandler) -> TorListener:
        """Listen on ``address`` locally and publish it as an onion service.

        The onion's port is the requested port, or the local one when port 0
        was asked for. The local listener should be on loopback: anyone who can
        reach it directly bypasses Tor and links this peer's address to its onion.
        """
        host, port = split_address(address)
        if not host.startswith(_LOOPBACK_PREFIXES):
            log.warning("tor listener %s is reachable without Tor; prefer a loopback host", address)
        if not self.controller.is_alive():
            raise TransportError(
                f"tor is not reachable at {self.control_address}: control connection closed"
            )
        local = self._tcp.listen(address, handler)
        local_port = split_address(local.address)[1]
        from anomos.tor import onion

        try:
            name = onion.publish(
                self.controller,
                local_port,
                key_path=self.onion_key_path,
                client_auth_keys=self.client_auth,
                virtual_port=port or local_port,
                target_host=host if host not in ("0.0.0.0", "::", "") else "127.0.0.1",
            )
        except BaseException:
            local.close()
            raise
        return TorListener(local, join_address(name, port or local_port), self.controller)

    def close(self) -> None:
        """Drop the control connection (and stop a tor we launched)."""
        if self._launched is not None:
            self._launched.close()
        else:
            try:
                self.controller.close()
            except Exception:  # pragma: no cover - closing a dead connection
                log.debug("closing the tor controller", exc_info=True)


@hookimpl
def anomos_register_transports(registry: Any) -> None:
    registry.add(TorTransport.name, TorTransport)


@hookimpl
def anomos_add_options(command: click.Command) -> None:
    """Tor options on every command that has ``--transport``."""
    names = {p.name for p in command.params}
    if "transport" not in names:
        return
    options = [
        click.Option(
            ["--tor-control"],
            metavar="HOST:PORT",
            help=f"ControlPort of a running tor for --transport tor [default: {DEFAULT_CONTROL}].",
        ),
        click.Option(
            ["--tor-launch"],
            is_flag=True,
            default=False,
            help="Start a tor of our own (in STATE_DIR/tor) for --transport tor.",
        ),
        click.Option(
            ["--onion-client-auth"],
            metavar="PUBKEY",
            multiple=True,
            help="Only clients with this base32 x25519 key may reach our onion (repeatable).",
        ),
    ]
    for option in options:
        if option.name not in names:
            command.params.append(option)
