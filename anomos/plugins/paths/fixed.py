"""Path policy ``fixed``: exactly ``max_relays`` relays on every circuit.

Useful for measurements (every circuit costs the same) and for operators who
want a guaranteed path length; ``min_relays`` is only validated.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Any, ClassVar

from anomos import hookimpl
from anomos.interfaces import PeerGraphView
from anomos.tracker.graph import check_relay_bounds, random_path, search_region


class FixedPolicy:
    """Exactly ``max_relays`` relays, uniform choice at each step."""

    name: ClassVar[str] = "fixed"

    def __init__(self, *, min_relays: int = 2, max_relays: int = 4) -> None:
        check_relay_bounds(min_relays, max_relays)
        self.relays = max_relays

    def find_path(
        self, graph: PeerGraphView, start: Hashable, end: Hashable, rng: random.Random
    ) -> list[Hashable] | None:
        region = search_region(graph, start, end, self.relays + 1)
        if region is None:
            return None
        return random_path(graph, start, end, self.relays, rng, region=region)


@hookimpl
def anomos_register_path_policies(registry: Any) -> None:
    registry.add(FixedPolicy.name, FixedPolicy)
