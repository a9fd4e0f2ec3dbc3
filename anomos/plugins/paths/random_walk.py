"""Path policy ``random-walk``: a random simple path, blind to load.

Each step picks uniformly among the neighbours that can still reach the
destination in the edges left, so every relay is as likely as any other; a
baseline to compare the ``weighted`` policy against.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Any, ClassVar

from anomos import hookimpl
from anomos.interfaces import PeerGraphView
from anomos.tracker.graph import check_relay_bounds, random_path, search_region


class RandomWalkPolicy:
    """Relay count uniform in [min, max] among the feasible; uniform choice at each step."""

    name: ClassVar[str] = "random-walk"

    def __init__(self, *, min_relays: int = 2, max_relays: int = 4) -> None:
        check_relay_bounds(min_relays, max_relays)
        self.min_relays = min_relays
        self.max_relays = max_relays

    def find_path(
        self, graph: PeerGraphView, start: Hashable, end: Hashable, rng: random.Random
    ) -> list[Hashable] | None:
        region = search_region(graph, start, end, self.max_relays + 1)
        if region is None:
            return None
        counts = list(range(max(self.min_relays, region[start] - 1), self.max_relays + 1))
        rng.shuffle(counts)
        for relays in counts:
            path = random_path(graph, start, end, relays, rng, region=region)
            if path is not None:
                return path
        return None


@hookimpl
def anomos_register_path_policies(registry: Any) -> None:
    registry.add(RandomWalkPolicy.name, RandomWalkPolicy)
