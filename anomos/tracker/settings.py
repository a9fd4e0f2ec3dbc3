"""What an operator (or a test) chooses about one tracker, as one frozen value.

The tracker's parts (front end, validation, accounting, persistence, graph,
planner) each read the few fields they need from :class:`TrackerSettings`;
callers build it once (``anomos tracker``'s options, the bench, the tests) and
change it with :func:`attrs.evolve`. Bad values are refused here, with the
command-line option's name, before anything is opened.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from anomos.errors import ConfigError
from anomos.tracker.limits import LimitSettings

#: Seconds between a peer's announces (told to peers).
ANNOUNCE_INTERVAL = 60
#: Seconds a peer should wait at least between announces (told to peers).
MIN_INTERVAL = 5
#: Per client IP: requests per second refilled, and the burst allowed.
RATE_PER_SECOND = 10.0
RATE_BURST = 60.0
#: Bytes a peer may download before ``--min-ratio`` applies (newcomers start at 0).
RATIO_GRACE = 1 << 30
#: Highest ``--min-ratio`` accepted (a typo like 50 would lock everyone out).
MAX_MIN_RATIO = 10.0
#: Seconds a connection may take for its TLS handshake and first request and our reply,
#: and each later request on it (a deadline for the whole exchange, so trickling bytes
#: buys nothing).
REQUEST_TIMEOUT = 20.0
#: Seconds a kept-alive connection may sit idle between two requests.
KEEPALIVE_IDLE = 15.0
#: Connections one client IP may hold open at once (more are closed unanswered).
MAX_CONNECTIONS_PER_IP = 16
#: Announces after which changes are handed to the writer at once, whatever the time.
FLUSH_MAX_PENDING = 2000


def _min_ratio(_inst: object, _attr: object, value: float) -> None:
    if not 0 <= value <= MAX_MIN_RATIO:
        raise ConfigError(f"--min-ratio {value:g}: need 0 to {MAX_MIN_RATIO:g}")


def _ratio_grace(_inst: object, _attr: object, value: int) -> None:
    if value < 0:
        raise ConfigError("--ratio-grace must not be negative")


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"tracker setting {attr.name} must be above 0, got {value!r}")


def _addresses(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


@attrs.frozen
class TrackerSettings:
    """Policies and bounds of one tracker; every field has a working default."""

    #: Path policy plugin that picks each circuit's relays (``anomos plugins`` lists them).
    path_policy: str = "weighted"
    #: Cipher suite plugin whose material the circuit plans carry.
    cipher_suite: str = "x25519"
    #: Ratio policy plugin that turns a peer's counters into its share ratio.
    ratio_policy: str = "relay-credit"
    #: Neighbours each peer is given at least ...
    min_neighbours: int = 4
    #: ... and at most.
    max_neighbours: int = 6
    #: Relays on a circuit, at least ...
    min_relays: int = 2
    #: ... and at most.
    max_relays: int = 4
    #: Seconds between a peer's announces (told to peers; silence for three is expiry).
    interval: int = ANNOUNCE_INTERVAL
    #: Seconds a peer must wait at least between announces (enforced per identity).
    min_interval: int = MIN_INTERVAL
    #: Requests per second refilled per client IP (or per identity from a shared address).
    rate: float = attrs.field(default=RATE_PER_SECOND, validator=_positive)
    #: Requests one client IP may make back to back.
    burst: float = attrs.field(default=RATE_BURST, validator=_positive)
    #: Seconds before a new edge is used in paths (None: the graph's default).
    edge_settle: float | None = None
    #: Addresses that stand for many clients (tor's end of an onion service): no
    #: per-address connection cap, and rate limits per peer identity instead.
    shared_clients: frozenset[str] = attrs.field(default=frozenset(), converter=_addresses)
    #: Share ratio a peer needs to be given circuits once it downloaded more than
    #: ``ratio_grace`` bytes (0: no minimum). Relaying raises it.
    min_ratio: float = attrs.field(default=0.0, validator=_min_ratio)
    #: Bytes a peer may download before ``min_ratio`` applies.
    ratio_grace: int = attrs.field(default=RATIO_GRACE, validator=_ratio_grace)
    #: Per-identity and per-network allowances of announces, joins and replacements.
    limits: LimitSettings = attrs.field(factory=LimitSettings)
    #: Seconds for a connection's handshake and first request, and for each later one.
    request_timeout: float = attrs.field(default=REQUEST_TIMEOUT, validator=_positive)
    #: Seconds a kept-alive connection may wait for its next request.
    keepalive_idle: float = attrs.field(default=KEEPALIVE_IDLE, validator=_positive)
    #: Connections one client IP may hold at once (shared addresses excepted).
    max_connections_per_ip: int = attrs.field(default=MAX_CONNECTIONS_PER_IP, validator=_positive)
    #: Announces after which the changes go to the writer thread without waiting a second.
    flush_max_pending: int = attrs.field(default=FLUSH_MAX_PENDING, validator=_positive)
    #: Dial announcing peers back to learn which are behind NAT, and plan edges so those
    #: dial out and never pair with each other (reachability.py); off in the class (tests
    #: announce made-up addresses), on in `anomos tracker`.
    probe_reachability: bool = False
