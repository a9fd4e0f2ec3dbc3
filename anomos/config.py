"""Frozen settings shared by the tracker and peer roles and their plugins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import attrs

from anomos.errors import ConfigError

#: Seconds; module-level so tests can shrink them.
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``, with a one-line error."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address {address!r} has a bad port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"address {address!r} has a port outside 0-65535")
    return host, port


def join_address(host: str, port: int) -> str:
    """Inverse of :func:`split_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_onion(address: str) -> bool:
    return split_address(address)[0].lower().endswith(".onion")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """``262144``, ``256K``, ``256KiB``, ``1.5G`` -> bytes (binary units).

    The one parser of sizes given on the command line; ``ConfigError`` names ``what``.
    """
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size such as 262144, 256K or 1.5GiB")
    value = int(float(match.group(1)) * _BINARY[match.group(2).lower()])
    if value < minimum or (maximum is not None and value > maximum):
        top = f"{maximum:,}" if maximum is not None else "any number of"
        raise ConfigError(f"{what} {text!r} is out of range ({minimum:,} to {top} bytes)")
    return value


@attrs.frozen
class Settings:
    """What a role was started with; plugins read their own keys from ``options``."""

    #: ``HOST:PORT`` to listen on; HOST is also the source address of every
    #: outgoing connection, so each peer can live on its own 127.0.0.X.
    listen: str = "127.0.0.1:0"
    state_dir: Path = attrs.field(default=Path("."), converter=Path)
    #: Transport used to listen and, first, to dial.
    transport: str = "tcp"
    #: Further transports that may dial addresses the first cannot (mixed networks).
    dial_transports: tuple[str, ...] = ()
    #: Bytes per second all neighbour links may send together; 0: unlimited.
    max_send_rate: int = 0
    #: Ask the home router for a port mapping (UPnP-IGD; anomos.peer.portmap).
    upnp: bool = False
    connect_timeout: float = CONNECT_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    options: dict[str, Any] = attrs.field(factory=dict)

    @property
    def listen_host(self) -> str:
        return split_address(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_address(self.listen)[1]


def read_toml(path: Path, what: str, max_bytes: int) -> dict[str, Any]:
    """The TOML document at ``path``, read at most ``max_bytes``; any fault is one
    ConfigError naming ``what`` and the path (a missing file raises FileNotFoundError)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise ConfigError(f"{what} {path} is larger than {max_bytes // 1024} KiB")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
