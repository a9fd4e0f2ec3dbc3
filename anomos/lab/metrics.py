"""The lab's definitions as small pure functions (docs/research.md states them in prose).

Each is checked against a case worked by hand or in closed form in
tests/test_lab_metrics.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence

import attrs

#: Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
#: Sightings of the downloader before the predecessor attack names it (one is a guess).
MIN_SIGHTINGS = 2


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its t-based 95 % confidence interval (0 for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if n == 1:
        return mean, 0.0
    t = T95[n - 2] if n - 1 <= len(T95) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def uniform_circuit_compromise(n: int, c: int) -> float:
    """Per-circuit compromise when distinct relays are drawn uniformly from ``n`` peers of
    which ``c`` collude, 2 or more relays: first and last both colluding."""
    return (c / n) * ((c - 1) / (n - 1))


def circuit_compromised(relays: Sequence[Hashable], colluding: set[Hashable] | frozenset) -> bool:
    """Colluders at both ends of the relay chain: the first relay (it sees the downloader)
    and the last (it sees the source); timing ties the two to one circuit."""
    return bool(relays) and relays[0] in colluding and relays[-1] in colluding


def first_observer(relays: Sequence[int], threshold: int) -> tuple[int, int]:
    """(index of the first colluding relay or -1, colluding relays): colluders rank below
    ``threshold``."""
    first = -1
    seen = 0
    for i, rank in enumerate(relays):
        if rank < threshold:
            seen += 1
            if first < 0:
                first = i
    return first, seen


def posterior_entropy(p_first: float, candidates: int) -> float:
    """Entropy (bits) of the adversary's posterior over the downloader of an observed circuit.

    Mass ``p_first`` on the predecessor of the first colluding relay, the rest
    spread evenly over the ``candidates - 1`` other honest peers.
    """
    if candidates <= 1:
        return 0.0
    h = 0.0
    if p_first > 0:
        h -= p_first * math.log2(p_first)
    rest = 1.0 - p_first
    if rest > 0:
        h -= rest * math.log2(rest / (candidates - 1))
    return h


def degree_of_anonymity(classes: dict[int, tuple[int, int]], candidates: int) -> float:
    """Mean normalised entropy H / log2(candidates) over observed circuits (Díaz et al.).

    ``classes`` maps what the colluders see (how many of them a circuit
    crossed) to (circuits observed, of which the predecessor was the
    downloader); the adversary knows the policy, so it knows that share.
    1.0: no better than a guess among all honest peers; 0.0: certain.
    """
    if candidates <= 1:
        return 0.0
    total = sum(n for n, _ in classes.values())
    if total == 0:
        return 1.0
    h = sum(n * posterior_entropy(hits / n, candidates) for n, hits in classes.values() if n)
    return h / total / math.log2(candidates)


@attrs.define
class PredecessorLog:
    """Wright et al.'s predecessor attack on one downloader.

    Every circuit the colluders see gives the peer just before the first of
    them; the downloader is named once it is the most frequent of those peers,
    strictly, and seen at least MIN_SIGHTINGS times.
    """

    downloader: Hashable
    counts: dict[Hashable, int] = attrs.field(factory=dict)
    rounds: int = 0
    #: the round at which the downloader was named (None: not yet)
    named_at: int | None = None

    def add(self, predecessor: Hashable | None) -> bool:
        """One more round (None: the colluders saw nothing); whether the downloader is named."""
        self.rounds += 1
        if self.named_at is not None:
            return True
        if predecessor is None:
            return False
        self.counts[predecessor] = self.counts.get(predecessor, 0) + 1
        mine = self.counts.get(self.downloader, 0)
        if mine >= MIN_SIGHTINGS and all(
            n < mine for p, n in self.counts.items() if p != self.downloader
        ):
            self.named_at = self.rounds
            return True
        return False


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted-able ``values`` (None when empty or infinite)."""
    if not values:
        return None
    ordered = sorted(values)
    value = ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
    return None if math.isinf(value) else value
