"""Default path policy ``weighted``: a varying number of relays, lightly loaded ones preferred.

Varying the relay count keeps a relay from guessing its distance to either
end from the path length; preferring relays with few circuits spreads the
traffic so no single peer becomes everyone's bottleneck (or everyone's
observer).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from anomos import hookimpl
from anomos.interfaces import PeerGraphView
from anomos.tracker.graph import check_relay_bounds, random_path, search_region


class WeightedPolicy:
    """Relay count uniform in [min, max] among the feasible; each step weighted by 1/(1+load)."""

    name: ClassVar[str] = "weighted"

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
        weight = self.step_weight(graph)
        for relays in counts:
            path = random_path(graph, start, end, relays, rng, region=region, weight=weight)
            if path is not None:
                return path
        return None

    def step_weight(self, graph: PeerGraphView) -> Callable[[Any], float] | None:
        """How likely each next relay is: 1/(1+load), so busy relays are avoided."""
        return lambda peer: 1.0 / (1.0 + graph.load(peer))


@hookimpl
def anomos_register_path_policies(registry: Any) -> None:
    registry.add(WeightedPolicy.name, WeightedPolicy)
