"""The tracker's random source: the operating system's, read in blocks.

Who neighbours whom, and every NID, must not be predictable from outside, so
the tracker draws them from ``os.urandom`` (:class:`random.SystemRandom`), not
from a seeded generator. ``SystemRandom`` makes one system call per draw, and a
join makes about nine (docs/performance.md, "Third pass"); this class reads
4 KiB at a time and serves the draws from that, the same bytes of the same
source. After a ``fork`` the child drops what the parent had read, so the two
never hand out the same numbers.
"""

from __future__ import annotations

import os
import random
import weakref
from typing import Any

#: Bytes read from the operating system at a time.
BLOCK = 4096

_live: weakref.WeakSet[BufferedSystemRandom] = weakref.WeakSet()


class BufferedSystemRandom(random.SystemRandom):
    """:class:`random.SystemRandom` whose bytes come from a block of ``os.urandom``; for
    one thread (the tracker's event loop: its writer thread draws nothing)."""

    def __init__(self, x: Any = None) -> None:
        self._block = b""
        self._at = 0
        super().__init__(x)
        _live.add(self)

    def _take(self, n: int) -> bytes:
        at = self._at
        if at + n > len(self._block):
            self._block, at = os.urandom(max(BLOCK, n)), 0
        self._at = at + n
        return self._block[at : at + n]

    def _drop(self) -> None:
        self._block, self._at = b"", 0

    def random(self) -> float:
        """A float in [0, 1) with 53 random bits, as ``SystemRandom.random``."""
        return (int.from_bytes(self._take(7)) >> 3) * 2.0**-53

    def getrandbits(self, k: int) -> int:
        """An int with ``k`` random bits, as ``SystemRandom.getrandbits``."""
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        if k == 0:
            return 0
        n = (k + 7) // 8
        return int.from_bytes(self._take(n)) >> (n * 8 - k)

    def randbytes(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative number of bytes")
        return self._take(n)


def _after_fork() -> None:
    for rng in list(_live):
        rng._drop()


os.register_at_fork(after_in_child=_after_fork)
