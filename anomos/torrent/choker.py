"""Standard BitTorrent choking (tit-for-tat plus one optimistic unchoke): pure logic.

Every :data:`UNCHOKE_INTERVAL` the session asks :meth:`Choker.rechoke` which
peers to unchoke: the :data:`UNCHOKE_SLOTS` interested peers with the best
rate (what they give us while we download, what they take while we seed),
plus one optimistic unchoke among the other interested peers, rotated every
:data:`OPTIMISTIC_INTERVAL` so newcomers get a chance to prove themselves.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Protocol, TypeVar

#: Seconds between two regular rechokes.
UNCHOKE_INTERVAL = 10.0
#: Seconds an optimistic unchoke lasts before it moves to another peer.
OPTIMISTIC_INTERVAL = 30.0
#: Regular unchoke slots (the optimistic one comes on top).
UNCHOKE_SLOTS = 4
#: Time constant of the transfer-rate estimates, in seconds.
RATE_WINDOW = 20.0


class RateMeter:
    """Exponentially decaying rate estimate in bytes per second."""

    __slots__ = ("_acc", "_t", "window")

    def __init__(self, window: float = RATE_WINDOW, now: float = 0.0) -> None:
        self.window = window
        self._acc = 0.0
        self._t = now

    def _decay(self, now: float) -> None:
        dt = now - self._t
        if dt > 0:
            self._acc *= math.exp(-dt / self.window)
            self._t = now

    def add(self, nbytes: int, now: float) -> None:
        self._decay(now)
        self._acc += nbytes

    def rate(self, now: float) -> float:
        self._decay(now)
        return self._acc / self.window


class Candidate(Protocol):
    """What the choker needs to know of a connection."""

    #: The remote peer wants data from us.
    peer_interested: bool

    def download_rate(self, now: float) -> float:
        """Bytes/s we receive from this peer."""

    def upload_rate(self, now: float) -> float:
        """Bytes/s we send to this peer."""


C = TypeVar("C", bound=Candidate)


class Choker:
    """Decides who is unchoked; keeps only the optimistic unchoke's state."""

    def __init__(
        self,
        *,
        slots: int = UNCHOKE_SLOTS,
        optimistic_interval: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.slots = slots
        self._optimistic_interval = optimistic_interval
        self._rng = rng or random.Random()
        self.optimistic: object | None = None
        self._optimistic_since = -math.inf

    def rechoke(self, peers: Iterable[C], *, seeding: bool, now: float) -> set[C]:
        """The peers to unchoke now; every other peer should be choked."""
        interested = [p for p in peers if p.peer_interested]
        rank = [
            (p.upload_rate(now) if seeding else p.download_rate(now), self._rng.random(), i)
            for i, p in enumerate(interested)
        ]
        rank.sort(reverse=True)
        best = [interested[i] for _, _, i in rank[: self.slots]]
        unchoke: set[C] = set(best)
        others = [p for p in interested if p not in unchoke]
        interval = (
            OPTIMISTIC_INTERVAL if self._optimistic_interval is None else self._optimistic_interval
        )
        current = self.optimistic
        keep = current in others and now - self._optimistic_since < interval
        if not keep:
            if others:
                # Rotate: prefer someone other than the last optimistic peer.
                pool = [p for p in others if p is not current] or others
                self.optimistic = self._rng.choice(pool)
                self._optimistic_since = now
            else:
                self.optimistic = None
        for p in others:
            if p is self.optimistic:
                unchoke.add(p)
        return unchoke
