"""What stops one party from walking the tracker's membership or replaying requests.

Every announce reply names the peer's neighbours, address and identity key, so
whoever may join often, announce often or have its neighbours replaced often
learns the network that fast. The tracker bounds each with a token bucket
(:class:`anomos.net.ratelimit.TokenBucket`, on the tracker's clock):

* announces per identity: ``min_interval`` enforced on average, with a small
  burst for the reference peer's early announces (a lost link, an unknown NID);
* edges replaced on ``unreachable`` reports, per identity and per source network
  (else identities kept from many joins would each walk the graph);
* joins (an identity entering the graph) per source network: an IPv4 /24 or an
  IPv6 /64 by default, the share of one household, office or small hoster.

:class:`RecentRequests` remembers the signed requests seen within the clock-skew
window, so a captured request cannot be played again. What these limits leave
(addresses learned per hour, measured) is in docs/threat-model.md.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import socket
import time
from collections.abc import Callable, Hashable

import attrs

from anomos.errors import ConfigError
from anomos.net.ratelimit import TokenBucket

#: Buckets remembered per kind (least recently used forgotten first; a forgotten
#: key starts again with a full burst, which only matters past this many parties).
MAX_BUCKETS = 65536
#: Signed requests remembered at once; past it new requests are refused (429).
MAX_RECENT_REQUESTS = 1 << 18


def _prefix(lo: int, hi: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{attr.name.replace('_', '-')} must be {lo}..{hi}, got {value!r}")

    return check


def _positive(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attr.name.replace('_', '-')} must be above 0, got {value!r}")


@attrs.frozen
class LimitSettings:
    """How much a tracker hands out per identity and per source network."""

    #: Announces an identity may make back to back (then one per ``min_interval``).
    announce_burst: float = attrs.field(default=8.0, validator=_positive)
    #: Edges an identity may have replaced as ``unreachable`` back to back ...
    replace_burst: float = attrs.field(default=4.0, validator=_positive)
    #: ... and then one per this many seconds.
    replace_every: float = attrs.field(default=300.0, validator=_positive)
    #: Edges all identities of one source network may have replaced back to back ...
    network_replace_burst: float = attrs.field(default=16.0, validator=_positive)
    #: ... and then one per this many seconds.
    network_replace_every: float = attrs.field(default=60.0, validator=_positive)
    #: Identities one source network may bring into the graph back to back ...
    join_burst: float = attrs.field(default=16.0, validator=_positive)
    #: ... and then one per this many seconds.
    join_every: float = attrs.field(default=60.0, validator=_positive)
    #: Leading bits that make one source network (32 / 128: every address its own).
    ipv4_prefix: int = attrs.field(default=24, validator=_prefix(8, 32))
    ipv6_prefix: int = attrs.field(default=64, validator=_prefix(16, 128))

    @classmethod
    def unlimited(cls) -> LimitSettings:
        """No practical limit (benchmarks, which replay one identity thousands of times)."""
        return cls(
            announce_burst=1e12, replace_burst=1e12, network_replace_burst=1e12, join_burst=1e12
        )


@attrs.define(eq=False)
class KeyedBuckets:
    """One token bucket per key, the least recently used forgotten past ``limit``."""

    rate: float
    burst: float
    clock: Callable[[], float]
    limit: int = MAX_BUCKETS
    _buckets: collections.OrderedDict[Hashable, TokenBucket] = attrs.field(
        factory=collections.OrderedDict, init=False
    )

    def try_take(self, key: Hashable) -> bool:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, clock=self.clock)
        self._buckets[key] = bucket
        while len(self._buckets) > self.limit:
            self._buckets.popitem(last=False)
        return bucket.try_take()


class Limits:
    """The per-identity and per-network buckets of one tracker."""

    def __init__(
        self, settings: LimitSettings, min_interval: float, clock: Callable[[], float]
    ) -> None:
        self.settings = settings
        self._announces = KeyedBuckets(
            1.0 / max(min_interval, 1e-3), settings.announce_burst, clock
        )
        self._replacements = KeyedBuckets(
            1.0 / settings.replace_every, settings.replace_burst, clock
        )
        self._network_replacements = KeyedBuckets(
            1.0 / settings.network_replace_every, settings.network_replace_burst, clock
        )
        self._joins = KeyedBuckets(1.0 / settings.join_every, settings.join_burst, clock)

    def network(self, ip: str) -> str:
        """The source network ``ip`` belongs to, e.g. ``"192.0.2.0/24"``.

        A dotted IPv4 address (nearly every request) is masked as 4 packed bytes, a
        microsecond; anything else goes through :mod:`ipaddress` (~15 us, a tenth of a
        whole announce when it was the only way)."""
        try:
            packed = socket.inet_pton(socket.AF_INET, ip)
        except OSError:
            return self._network_slow(ip)
        bits = self.settings.ipv4_prefix
        mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
        masked = (int.from_bytes(packed, "big") & mask).to_bytes(4, "big")
        return f"{socket.inet_ntop(socket.AF_INET, masked)}/{bits}"

    def _network_slow(self, ip: str) -> str:
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return ip  # not an IP (a Unix socket, say): its own network
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        bits = (
            self.settings.ipv4_prefix
            if isinstance(address, ipaddress.IPv4Address)
            else self.settings.ipv6_prefix
        )
        return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))

    def announce_allowed(self, peer: bytes) -> bool:
        return self._announces.try_take(peer)

    def join_allowed(self, network: str) -> bool:
        return self._joins.try_take(network)

    def replacement_allowed(self, peer: bytes, network: str | None) -> bool:
        """Whether ``peer``, announcing from ``network`` (None: not limited per network),
        may have one more edge replaced."""
        if not self._replacements.try_take(peer):
            return False
        return network is None or self._network_replacements.try_take(network)


class Seen(enum.Enum):
    """What :meth:`RecentRequests.add` found."""

    NEW = "new"
    REPLAYED = "request replayed: this signed request was seen already"
    FULL = "too many requests in the replay window; slow down"


@attrs.define(eq=False)
class RecentRequests:
    """Digests of the signed requests accepted while their ``time`` is acceptable.

    A request stamped ``t`` is accepted only while the clock is within
    ``window`` of ``t``, so its digest is kept until ``t + window``: then the
    stamp check refuses it anyway. Memory is bounded by ``limit``.
    """

    window: int
    clock: Callable[[], float] = time.time
    limit: int = MAX_RECENT_REQUESTS
    _seen: set[bytes] = attrs.field(factory=set, init=False)
    #: whole second a digest may be forgotten -> digests
    _by_second: dict[int, list[bytes]] = attrs.field(factory=dict, init=False)
    _pruned: int = attrs.field(default=0, init=False)

    def __len__(self) -> int:
        return len(self._seen)

    def clear(self) -> None:
        self._seen.clear()
        self._by_second.clear()

    def add(self, digest: bytes, stamp: int) -> Seen:
        """Remember ``digest`` (if NEW) of a request stamped ``stamp``."""
        self._prune(int(self.clock()))
        if digest in self._seen:
            return Seen.REPLAYED
        if len(self._seen) >= self.limit:
            return Seen.FULL
        self._seen.add(digest)
        self._by_second.setdefault(stamp + self.window + 1, []).append(digest)
        return Seen.NEW

    def _prune(self, now: int) -> None:
        if now <= self._pruned:
            return
        if now - self._pruned > len(self._by_second):
            stale = [s for s in self._by_second if s <= now]
        else:
            stale = [s for s in range(self._pruned + 1, now + 1) if s in self._by_second]
        for second in stale:
            for digest in self._by_second.pop(second):
                self._seen.discard(digest)
        self._pruned = now
