"""Token buckets: one shared by the writers of every neighbour link of one peer,
and per neighbour, what it may make us do (anomos.net.link.NeighbourBudget).

A peer that donates bandwidth wants to say how much: ``--max-send-rate``
caps the bytes per second all its links send together, relayed cells and its
own uploads alike. Writers wait for tokens before each batch, so the link
queues fill, the end-to-end windows close and the senders upstream slow down:
nothing is dropped, only paced.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs
import gevent

from anomos.errors import ConfigError

#: Seconds of traffic the bucket may save up (the burst).
BURST_SECONDS = 0.25
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}


def parse_rate(text: str) -> int:
    """``"500k"``, ``"2M"``, ``"1500000"`` -> bytes per second; ``0`` means unlimited."""
    clean = text.strip().lower().removesuffix("b/s").removesuffix("/s")
    unit = clean[-1:] if clean[-1:] in _UNITS else ""
    number = clean[: len(clean) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"rate {text!r} is not a number of bytes per second (e.g. 2M)") from None
    if not 0 <= value < 1e13:
        raise ConfigError(f"rate {text!r} is out of range")
    return int(value * _UNITS[unit])


@attrs.define(eq=False)
class TokenBucket:
    """``take(n)`` returns once ``n`` bytes fit under ``rate`` bytes per second."""

    rate: float
    burst: float = attrs.field(default=0.0)
    #: Seconds, monotonic (the tracker passes its own clock, so tests can move it).
    clock: Callable[[], float] = attrs.field(default=time.monotonic, kw_only=True, repr=False)
    _tokens: float = attrs.field(default=0.0, init=False, repr=False)
    _at: float = attrs.field(default=0.0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.rate <= 0:
            raise ConfigError("a rate limit must be above 0 bytes per second")
        self.burst = self.burst or self.rate * BURST_SECONDS
        self._tokens = self.burst
        self._at = self.clock()

    def take(self, n: int) -> None:
        """Spend ``n`` tokens, sleeping (cooperatively) while the bucket is in debt.

        A batch larger than the burst is allowed through and paid back by
        waiting afterwards, so any batch size works with any rate.
        """
        self._refill()
        self._tokens -= n
        if self._tokens < 0:
            gevent.sleep(-self._tokens / self.rate)

    def try_take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if the bucket holds them; never waits nor goes into debt."""
        self._refill()
        if self._tokens < n:
            return False
        self._tokens -= n
        return True

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now


@attrs.define(eq=False)
class Throttle:
    """A speed limit that can be set, changed or lifted while traffic flows: ``take``
    paces through a :class:`TokenBucket` while a rate is set, and returns at once
    when none is (the daemon's per-torrent and session limits)."""

    _bucket: TokenBucket | None = attrs.field(default=None, init=False)

    @property
    def rate(self) -> float | None:
        return self._bucket.rate if self._bucket is not None else None

    def set_rate(self, rate: float | None) -> None:
        """Bytes per second (None or 0: unlimited); the same rate keeps the bucket."""
        if not rate:
            self._bucket = None
        elif self._bucket is None or self._bucket.rate != rate:
            self._bucket = TokenBucket(rate)

    def take(self, n: int) -> None:
        bucket = self._bucket
        if bucket is not None:
            bucket.take(n)

    def step(self, most: int) -> int:
        """Bytes to read at a time, at most ``most``: one burst while a rate is set, so
        the pace is even (a big read would wait out its whole debt before its bytes
        count, then the rest would come at once)."""
        bucket = self._bucket
        return most if bucket is None else max(1, min(most, int(bucket.burst)))
