"""Path policy ``guard``: the first relay is always one of the downloader's guard neighbours.

The first relay of any circuit is one of the downloader's neighbours, and
neighbours are long-lived: the tracker keeps an edge until a peer leaves. The
``weighted`` policy still draws the first relay among all of them, so over
many circuits every neighbour takes its turn next to the downloader, and one
colluding neighbour among the 4-6 is enough to see it first-hand sooner or
later. This policy, like Tor's entry guards, always starts the circuit at the
same neighbour (its *guard*): a downloader whose guard is honest is never
seen first-hand; one whose guard colludes is seen often, but the share of
downloaders ever exposed drops from about ``1 - (1 - c)^degree`` to about
``c`` (docs/research.md measures it).

The guard is the neighbour with the lowest keyed BLAKE2b hash of the pair
(downloader, neighbour), under
a per-tracker secret key drawn from the planner's random source on first use:
stable while the neighbour stays, unpredictable to peers (a rule such as "the
oldest neighbour" would let an adversary that joins early become everyone's
guard; hashing the pair, not the neighbour alone, makes each peer the guard of
about one downloader, not of all its neighbours). When the guard leaves, the
next neighbour in that order takes over (and a tracker restart draws a new
key, so every guard changes then). The relay count is drawn uniformly in
[min, max] and moved to the nearest count the graph allows (the shorter on a
tie), so circuits are no longer than ``weighted``'s; the relays after the
guard are ``weighted``'s: lightly loaded ones preferred. The price is reach: only sources
within ``max_relays`` edges of the guard (not of the downloader) get a path,
so the tracker tries more sources per circuit.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Hashable, Iterable
from typing import Any, ClassVar

from anomos import hookimpl
from anomos.interfaces import PeerGraphView
from anomos.plugins.paths.weighted import WeightedPolicy
from anomos.tracker.graph import random_path, search_region

#: Bytes of the secret key that orders a downloader's neighbours.
KEY_BYTES = 16


class GuardPolicy(WeightedPolicy):
    """``weighted`` after a fixed first relay: the downloader's guard neighbour."""

    name: ClassVar[str] = "guard"

    def __init__(self, *, min_relays: int = 2, max_relays: int = 4) -> None:
        super().__init__(min_relays=min_relays, max_relays=max_relays)
        self._key: bytes | None = None

    def guard(self, graph: PeerGraphView, start: Hashable, rng: random.Random) -> Hashable | None:
        """``start``'s guard: its neighbour with the lowest keyed hash (None without one)."""
        if self._key is None:
            self._key = rng.getrandbits(8 * KEY_BYTES).to_bytes(KEY_BYTES, "big")
        key = self._key
        mine = repr(start).encode() + b"\0"
        return min(
            graph.neighbours(start),
            key=lambda n: hashlib.blake2b(mine + repr(n).encode(), key=key, digest_size=8).digest(),
            default=None,
        )

    def find_path(
        self, graph: PeerGraphView, start: Hashable, end: Hashable, rng: random.Random
    ) -> list[Hashable] | None:
        first = self.guard(graph, start, rng)
        if first is None or first == end:
            return None
        rest = _Without(graph, start)
        region = search_region(rest, first, end, self.max_relays)
        if region is None:
            return None
        drawn = rng.randint(self.min_relays, self.max_relays)
        counts = sorted(
            range(max(self.min_relays, region[first]), self.max_relays + 1),
            key=lambda k: (abs(k - drawn), k),
        )
        weight = self.step_weight(graph)
        for relays in counts:
            tail = random_path(rest, first, end, relays - 1, rng, region=region, weight=weight)
            if tail is not None:
                return [start, *tail]
        return None


class _Without:
    """``graph`` without one peer (the downloader, which a path may not cross twice)."""

    def __init__(self, graph: PeerGraphView, hidden: Hashable) -> None:
        self.graph = graph
        self.hidden = hidden
        fast = getattr(graph, "region", None)
        if fast is not None:
            # search_region uses the view's own search, told to keep off ``hidden``.
            self.region = functools.partial(fast, without=hidden)

    def neighbours(self, peer: Hashable) -> Iterable[Hashable]:
        return [n for n in self.graph.neighbours(peer) if n != self.hidden]

    def load(self, peer: Hashable) -> float:
        return self.graph.load(peer)

    def __contains__(self, peer: object) -> bool:
        return peer != self.hidden and peer in self.graph

    def __len__(self) -> int:
        return len(self.graph) - 1


@hookimpl
def anomos_register_path_policies(registry: Any) -> None:
    registry.add(GuardPolicy.name, GuardPolicy)
