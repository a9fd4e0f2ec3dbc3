"""Where the daemon keeps its state, reads its config and puts downloads; its TOML config.

Directories follow the XDG base directories (via platformdirs): state under
``$XDG_STATE_HOME/anomos/daemon``, the config file at
``$XDG_CONFIG_HOME/anomos/daemon.toml``, downloads in the user's download folder.
Config keys are named as in Transmission's settings.json where Transmission
has them, so that session-get/-set and the file speak the same names.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import attrs
import platformdirs

from anomos.config import read_toml, split_address
from anomos.daemon.limits import LimitError, check_value
from anomos.errors import ConfigError
from anomos.net.ratelimit import parse_rate

#: Transmission's RPC port.
DEFAULT_RPC_PORT = 9091
#: Bytes a config file may have (it is a handful of keys).
MAX_CONFIG_SIZE = 64 * 1024


def default_state_dir() -> Path:
    return platformdirs.user_state_path("anomos") / "daemon"


def default_config_file() -> Path:
    return platformdirs.user_config_path("anomos") / "daemon.toml"


def default_download_dir() -> Path:
    return platformdirs.user_downloads_path()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@attrs.frozen
class DaemonConfig:
    """The daemon's settings (the keys of ``daemon.toml``, documented in docs/rpc.md)."""

    rpc_bind_address: str = "127.0.0.1"
    rpc_port: int = DEFAULT_RPC_PORT
    rpc_username: str = ""
    rpc_password: str = attrs.field(default="", repr=False)
    download_dir: Path = attrs.field(factory=default_download_dir, converter=Path)
    #: HOST:PORT the peer listens on (and dials from).
    listen: str = "127.0.0.1:0"
    #: The tracker to join before any torrent names one ("" : wait for the first torrent).
    tracker: str = ""
    fingerprint: str = ""
    #: Bytes per second all neighbour links send together (relayed cells and our own
    #: uploads): the bandwidth donated; 0: unlimited (``--max-send-rate`` of the peers).
    max_send_rate: int = 0
    # Speed limits (kB/s), seed limits, queues: Transmission's names and defaults.
    speed_limit_down: int = 100
    speed_limit_down_enabled: bool = False
    speed_limit_up: int = 100
    speed_limit_up_enabled: bool = False
    ratio_limit: float = 2.0
    ratio_limit_enabled: bool = False
    idle_seeding_limit: int = 30
    idle_seeding_limit_enabled: bool = False
    download_queue_enabled: bool = True
    download_queue_size: int = 5
    seed_queue_enabled: bool = False
    seed_queue_size: int = 10
    queue_stalled_enabled: bool = True
    queue_stalled_minutes: int = 30
    #: Ask the home router to forward a port to the peer (UPnP-IGD; anomos.peer.portmap).
    upnp: bool = False

    @property
    def auth_required(self) -> bool:
        return bool(self.rpc_username or self.rpc_password)

    def check(self) -> DaemonConfig:
        """One line naming the first bad setting, or ``self``."""
        if not 0 <= self.rpc_port <= 65535:
            raise ConfigError(f"rpc-port {self.rpc_port} is outside 0-65535")
        if not is_loopback(self.rpc_bind_address) and not (self.rpc_username and self.rpc_password):
            raise ConfigError(
                f"rpc-bind-address {self.rpc_bind_address} is not loopback: set rpc-username "
                "and rpc-password (anyone who reaches the RPC controls the daemon)"
            )
        split_address(self.listen)
        if bool(self.tracker) != bool(self.fingerprint):
            raise ConfigError("tracker and fingerprint go together: set both or neither")
        for key, (attr, kind) in SESSION_KEYS.items():
            setting_value(key, getattr(self, attr), kind)
        return self


#: Settings both in daemon.toml and session-get/-set: RPC key -> (attribute, type).
#: The file uses Transmission's settings.json names, which differ for the ratio
#: (``ratio-limit``, ``ratio-limit-enabled``): see TOML_NAMES.
SESSION_KEYS: dict[str, tuple[str, type]] = {
    "speed-limit-down": ("speed_limit_down", int),
    "speed-limit-down-enabled": ("speed_limit_down_enabled", bool),
    "speed-limit-up": ("speed_limit_up", int),
    "speed-limit-up-enabled": ("speed_limit_up_enabled", bool),
    "seedRatioLimit": ("ratio_limit", float),
    "seedRatioLimited": ("ratio_limit_enabled", bool),
    "idle-seeding-limit": ("idle_seeding_limit", int),
    "idle-seeding-limit-enabled": ("idle_seeding_limit_enabled", bool),
    "download-queue-enabled": ("download_queue_enabled", bool),
    "download-queue-size": ("download_queue_size", int),
    "seed-queue-enabled": ("seed_queue_enabled", bool),
    "seed-queue-size": ("seed_queue_size", int),
    "queue-stalled-enabled": ("queue_stalled_enabled", bool),
    "queue-stalled-minutes": ("queue_stalled_minutes", int),
}
TOML_NAMES = {"seedRatioLimit": "ratio-limit", "seedRatioLimited": "ratio-limit-enabled"}


def setting_value(key: str, value: Any, kind: type) -> Any:
    """``value`` for the setting ``key`` if it has the right type (and a speed, seed or
    queue setting is in range: :func:`~anomos.daemon.limits.check_value`), else one
    ConfigError."""
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string")
        return value
    try:
        return check_value(key, value, kind)
    except LimitError as exc:
        raise ConfigError(str(exc)) from None


#: TOML key -> (attribute, type).
_KEYS: dict[str, tuple[str, type]] = {
    "rpc-bind-address": ("rpc_bind_address", str),
    "rpc-port": ("rpc_port", int),
    "rpc-username": ("rpc_username", str),
    "rpc-password": ("rpc_password", str),
    "download-dir": ("download_dir", str),
    "listen": ("listen", str),
    "tracker": ("tracker", str),
    "fingerprint": ("fingerprint", str),
    "max-send-rate": ("max_send_rate", str),
    **{TOML_NAMES.get(key, key): spec for key, spec in SESSION_KEYS.items()},
    "upnp": ("upnp", bool),
}


def load_config(path: Path, *, required: bool = False) -> DaemonConfig:
    """Read ``path`` (absent: the defaults, unless ``required``); a bad key is one line."""
    try:
        doc = read_toml(path, "config file", MAX_CONFIG_SIZE)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return DaemonConfig().check()
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in _KEYS:
            raise ConfigError(
                f"config file {path}: unknown key {key!r} (known: {', '.join(_KEYS)})"
            )
        attr, kind = _KEYS[key]
        try:
            values[attr] = setting_value(key, value, kind)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    if "max_send_rate" in values:
        values["max_send_rate"] = parse_rate(values["max_send_rate"])
    if "download_dir" in values:
        values["download_dir"] = Path(values["download_dir"]).expanduser()
    try:
        return DaemonConfig(**values).check()
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
