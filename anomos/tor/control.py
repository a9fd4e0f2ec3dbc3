"""Reaching a tor: its ControlPort (attach or launch) and the SOCKS port behind it.

Every failure is a :class:`anomos.errors.TransportError` naming the tor and the
reason, e.g. ``tor is not reachable at 127.0.0.1:9051: [Errno 111] Connection
refused``; nothing here ever falls back to a direct connection.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import attrs
import gevent
import stem
import stem.connection
import stem.control
import stem.process
from stem.control import Controller

from anomos.config import split_address
from anomos.errors import ConfigError, TransportError
from anomos.tor import DEFAULT_CONTROL

log = logging.getLogger(__name__)
# stem pins its logger at TRACE level, which floods stderr through the root
# handler; let it follow the level the user chose with -v instead.
logging.getLogger("stem").setLevel(logging.NOTSET)

#: Seconds to connect and authenticate to a ControlPort.
CONTROL_TIMEOUT = 10.0
#: Seconds a launched tor gets to bootstrap (the public network can be slow).
LAUNCH_TIMEOUT = 180.0
#: Seconds a launched tor gets to exit before it is killed.
STOP_TIMEOUT = 5.0


def connect_control(
    address: str = DEFAULT_CONTROL, *, password: str | None = None, timeout: float = CONTROL_TIMEOUT
) -> Controller:
    """An authenticated stem :class:`Controller` for the tor at ``address``.

    ``address`` is ``HOST:PORT`` or ``unix:/path/to/control/socket``.
    Authentication is whatever the tor offers: none, its cookie file (stem reads
    it), or ``password``.
    """
    attempt: dict[str, Controller] = {}

    def attach() -> Controller | Exception:
        # The error is returned, not raised: a greenlet dying with it would have
        # gevent print a traceback, and the user must see one line only.
        try:
            if address.startswith("unix:"):
                attempt["c"] = Controller.from_socket_file(address[len("unix:") :])
            else:
                host, port = split_address(address)
                attempt["c"] = Controller.from_port(address=_ipv4(host, address), port=port)
            attempt["c"].authenticate(password=password)
        except Exception as exc:
            return exc
        return attempt["c"]

    # Not gevent.Timeout: stem swallows it in a bare ``except:`` and retries.
    worker = gevent.spawn(attach)
    worker.join(timeout)
    if not worker.ready():
        for _ in range(5):  # each kill may be swallowed the same way; closing ends the retry
            _close_quietly(attempt.get("c"))
            worker.kill(block=True, timeout=0.5)
            if worker.dead:
                break
        raise TransportError(f"tor is not reachable at {address}: no answer within {timeout:g} s")
    try:
        result = worker.get()
        if isinstance(result, Exception):
            raise result
        return result
    except stem.connection.AuthenticationFailure as exc:
        _close_quietly(attempt.get("c"))
        raise TransportError(f"tor at {address} refused authentication: {exc}") from None
    except (stem.SocketError, OSError) as exc:
        _close_quietly(attempt.get("c"))
        raise TransportError(f"tor is not reachable at {address}: {exc}") from None
    except stem.ControllerError as exc:
        _close_quietly(attempt.get("c"))
        raise TransportError(f"tor at {address} misbehaved on the control port: {exc}") from None
    except ValueError as exc:  # stem's check of the address
        raise ConfigError(f"bad tor control address {address}: {exc}") from None


def _ipv4(host: str, address: str) -> str:
    """stem's ``from_port`` wants an IPv4 literal; resolve a local name such as ``localhost``."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        infos = []
    if not infos:
        raise ConfigError(f"tor control address {address} needs an IPv4 host or unix:PATH")
    return str(infos[0][4][0])


def _close_quietly(controller: Controller | None) -> None:
    if controller is not None:
        try:
            controller.close()
        except Exception:  # pragma: no cover - closing a broken socket
            log.debug("closing a failed tor controller", exc_info=True)


def socks_address(controller: Controller, control_address: str = "tor") -> tuple[str, int]:
    """The (host, port) of the tor's first TCP SocksPort; a wildcard becomes loopback."""
    try:
        listeners = controller.get_listeners(stem.control.Listener.SOCKS)
    except (stem.ControllerError, stem.SocketError) as exc:
        raise TransportError(
            f"tor at {control_address} did not tell its SOCKS port: {exc}"
        ) from None
    for host, port in listeners:
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host in ("::", "[::]"):
            host = "::1"
        if port:
            return host.strip("[]"), int(port)
    raise TransportError(
        f"tor at {control_address} has no SocksPort; add 'SocksPort 9050' to its torrc"
    )


@attrs.define(eq=False)
class LaunchedTor:
    """A tor this process started: it exits when :meth:`close` is called or we die."""

    process: subprocess.Popen[bytes]
    controller: Controller
    control_address: str
    data_dir: Path

    def close(self) -> None:
        _close_quietly(self.controller)  # tor exits: this connection owns it
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def launch_tor(
    data_dir: Path,
    *,
    extra_config: dict[str, Any] | None = None,
    tor_cmd: str = "tor",
    timeout: float = LAUNCH_TIMEOUT,
) -> LaunchedTor:
    """Start a tor of our own (loopback SOCKS and ControlPort) and wait until it bootstrapped.

    For users without a running tor. The tor is owned by this process: it exits
    when our control connection closes or our process dies. ``extra_config``
    adds torrc options (e.g. the ``DirAuthority`` lines of a private network,
    see :meth:`anomos.tor.testnet.TorTestNetwork.join_config`).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)  # tor refuses a group-readable DataDirectory
    port_file = data_dir / "control_port"
    port_file.unlink(missing_ok=True)
    config: dict[str, Any] = {
        "DataDirectory": str(data_dir),
        "SocksPort": "127.0.0.1:auto",
        "ControlPort": "127.0.0.1:auto",
        "ControlPortWriteToFile": str(port_file),
        "CookieAuthentication": "1",
        "Log": ["NOTICE stdout", f"NOTICE file {data_dir / 'notice.log'}"],
        **(extra_config or {}),
    }
    timer = gevent.Timeout(timeout)
    try:
        with timer:
            # stem's own timeout uses SIGALRM, which does not mix with gevent.
            process = stem.process.launch_tor_with_config(
                config, tor_cmd=tor_cmd, timeout=None, take_ownership=True
            )
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise TransportError(
            f"tor launched in {data_dir} did not bootstrap within {timeout:g} s"
        ) from None
    except OSError as exc:
        raise TransportError(f"cannot launch tor: {exc}") from None
    try:
        text = port_file.read_text().strip()  # "PORT=127.0.0.1:40123"
        control_address = text.partition("=")[2] or text
        controller = connect_control(control_address)
    except BaseException as exc:
        process.kill()
        process.wait()
        if isinstance(exc, OSError):
            raise TransportError(f"launched tor wrote no control port file: {exc}") from None
        raise
    return LaunchedTor(process, controller, control_address, data_dir)
