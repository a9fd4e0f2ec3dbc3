"""Per-torrent speed and seed limits, and the rule that says when seeding is done.

Values and names are Transmission's: speeds in kB/s (1000 bytes), seed idle
times in minutes, a ratio mode and an idle mode each 0 (use the session's
setting), 1 (this torrent's own) or 2 (unlimited). Pacing itself is
:class:`anomos.net.ratelimit.Throttle` (token buckets) in the torrent's session.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import attrs

from anomos.errors import AnomosError
from anomos.net.ratelimit import Throttle

#: Bytes per Transmission speed unit (kB/s).
KB = 1000
#: The highest speed (kB/s: 10 GB/s), idle time (minutes) or queue size accepted.
MAX_NUMBER = 10_000_000
#: The highest seed ratio accepted.
MAX_RATIO = 1_000_000


class LimitMode(enum.IntEnum):
    """Transmission's tr_ratiolimit / tr_idlelimit."""

    GLOBAL = 0
    SINGLE = 1
    UNLIMITED = 2


class LimitError(AnomosError):
    """A bad limit value; the message is the RPC ``result``."""


def speed_rate(limit_kb: int, enabled: bool) -> float | None:
    """Bytes per second for a Transmission speed limit (None: unlimited); 0 is taken as
    1 kB/s (a token bucket needs a rate; Transmission would stop the traffic)."""
    return max(limit_kb, 1) * KB if enabled else None


@attrs.define
class TorrentLimits:
    """One torrent's speed and seed limits (torrent-set / torrent-get), kept in daemon.json."""

    download_limit: int = 100
    download_limited: bool = False
    upload_limit: int = 100
    upload_limited: bool = False
    honors_session_limits: bool = True
    seed_ratio_limit: float = 2.0
    seed_ratio_mode: LimitMode = attrs.field(default=LimitMode.GLOBAL, converter=LimitMode)
    seed_idle_limit: int = 30
    seed_idle_mode: LimitMode = attrs.field(default=LimitMode.GLOBAL, converter=LimitMode)
    #: Paces this torrent alone (the session's throttles pace all torrents together).
    down: Throttle = attrs.field(factory=Throttle, eq=False, repr=False)
    up: Throttle = attrs.field(factory=Throttle, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.apply()

    def apply(self) -> None:
        """Bring the throttles to the limits (after a change)."""
        self.down.set_rate(speed_rate(self.download_limit, self.download_limited))
        self.up.set_rate(speed_rate(self.upload_limit, self.upload_limited))

    def to_state(self) -> dict[str, Any]:
        return {key: _plain(getattr(self, attr)) for key, (attr, _kind) in TORRENT_KEYS.items()}

    def update(self, values: dict[str, Any]) -> None:
        """Set RPC keys (checked first: a bad value changes nothing)."""
        for attr, value in check_limits(values).items():
            setattr(self, attr, value)
        self.apply()


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, enum.IntEnum) else value


#: torrent-get/-set keys -> (attribute, type); ``seedRatioLimited`` and
#: ``seedIdleLimited`` (older clients) are mapped onto the modes by the RPC.
TORRENT_KEYS: dict[str, tuple[str, type]] = {
    "downloadLimit": ("download_limit", int),
    "downloadLimited": ("download_limited", bool),
    "uploadLimit": ("upload_limit", int),
    "uploadLimited": ("upload_limited", bool),
    "honorsSessionLimits": ("honors_session_limits", bool),
    "seedRatioLimit": ("seed_ratio_limit", float),
    "seedRatioMode": ("seed_ratio_mode", LimitMode),
    "seedIdleLimit": ("seed_idle_limit", int),
    "seedIdleMode": ("seed_idle_mode", LimitMode),
}


def check_limits(values: dict[str, Any]) -> dict[str, Any]:
    """RPC keys and values -> attributes and checked values (a LimitError for the first
    bad one; an unknown key is a KeyError)."""
    return {TORRENT_KEYS[k][0]: check_value(k, v, TORRENT_KEYS[k][1]) for k, v in values.items()}


def check_value(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` if it is one (and in range), else a LimitError naming ``key``.

    The one check of every speed, seed and queue setting: a torrent's (torrent-set,
    daemon.json) and the session's (session-set, daemon.toml)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise LimitError(f"{key} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LimitError(f"{key} must be {'a number' if kind is float else 'an integer'}")
    if kind is float:
        if not math.isfinite(value) or not 0 <= value <= MAX_RATIO:
            raise LimitError(f"{key} must be a ratio from 0 to {MAX_RATIO}")
        return float(value)
    if not isinstance(value, int) and not float(value).is_integer():
        raise LimitError(f"{key} must be a whole number")
    number = int(value)
    if kind is LimitMode:
        if number not in tuple(LimitMode):
            raise LimitError(f"{key} must be 0 (session), 1 (this torrent) or 2 (unlimited)")
        return LimitMode(number)
    if not 0 <= number <= MAX_NUMBER:
        raise LimitError(f"{key} {number} is outside 0-{MAX_NUMBER}")
    return number


def seed_limit_reached(
    limits: TorrentLimits,
    *,
    ratio: float,
    idle_seconds: float,
    session_ratio: float | None,
    session_idle_minutes: int | None,
) -> str | None:
    """Why this seeding torrent should stop now (Transmission's rule), or None.

    ``session_ratio`` / ``session_idle_minutes``: the session's limits when enabled.
    """
    goal = {
        LimitMode.GLOBAL: session_ratio,
        LimitMode.SINGLE: limits.seed_ratio_limit,
        LimitMode.UNLIMITED: None,
    }[limits.seed_ratio_mode]
    if goal is not None and ratio >= goal:
        return f"reached its seed ratio limit {goal:g} (ratio {ratio:.2f})"
    minutes = {
        LimitMode.GLOBAL: session_idle_minutes,
        LimitMode.SINGLE: limits.seed_idle_limit,
        LimitMode.UNLIMITED: None,
    }[limits.seed_idle_mode]
    if minutes is not None and idle_seconds >= minutes * 60:
        return f"seeded idle for {minutes} min (its idle limit)"
    return None
