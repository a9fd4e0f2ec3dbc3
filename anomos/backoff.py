"""Growing pauses between attempts, and one log line per change of a waiting state.

Every retry loop (announces, circuit requests, circuits that fail to build, a
full disk, ...) waits with a :class:`Backoff`: it starts small, grows by a
factor up to a limit, gets a little random jitter so that peers that failed
together do not come back together, and never goes under what the other side
asked for (a tracker's ``min interval`` or ``Retry-After``).

:class:`Waiting` keeps a retry loop quiet: it logs one line when a trouble
starts ("waiting for the tracker since 10:22:01: ...") and one when it ends,
not one per attempt.
"""

from __future__ import annotations

import logging
import random
import time

import attrs


@attrs.define
class Backoff:
    """``next()`` is the pause before the next attempt; ``reset()`` after a success."""

    first: float
    limit: float
    factor: float = 2.0
    #: Each pause is drawn from ``delay * (1 ± jitter)``.
    jitter: float = 0.25
    rng: random.Random = attrs.field(factory=random.Random, repr=False)
    _delay: float = attrs.field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        self._delay = self.first

    @property
    def delay(self) -> float:
        """The pause the next ``next()`` is centred on."""
        return self._delay

    def next(self, at_least: float = 0.0) -> float:
        """The pause to take now (never under ``at_least``); later pauses grow."""
        pause = self._delay * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self._delay = min(self.limit, self._delay * self.factor)
        return max(pause, at_least)

    def reset(self) -> None:
        self._delay = self.first


@attrs.define
class Waiting:
    """A trouble a loop waits out, logged once when it starts and once when it ends."""

    #: What the loop waits for, as in "waiting for the tracker".
    what: str
    logger: logging.Logger = attrs.field(repr=False)
    #: Wall-clock time (for the message) and monotonic time (for durations) it began.
    since: float | None = attrs.field(default=None, init=False)
    began: float = attrs.field(default=0.0, init=False)
    reason: str = attrs.field(default="", init=False)

    @property
    def active(self) -> bool:
        return self.since is not None

    def describe(self) -> str:
        """ "waiting for the tracker since 10:22:01 (cannot reach ...)", or ""."""
        if self.since is None:
            return ""
        clock = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"{self.what} since {clock}" + (f" ({self.reason})" if self.reason else "")

    def enter(self, reason: str) -> None:
        """The trouble is (still) there; logged only when it starts."""
        self.reason = reason
        if self.since is None:
            self.since, self.began = time.time(), time.monotonic()
            self.logger.warning("%s", self.describe())

    def leave(self) -> None:
        """The trouble is over; logged if it was there."""
        if self.since is not None:
            self.logger.warning(
                "%s: over after %.0f s", self.describe(), time.monotonic() - self.began
            )
            self.since, self.reason = None, ""
