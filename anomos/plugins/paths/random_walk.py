"""Path policy ``random-walk``: a random simple path, blind to load.

Each step picks uniformly among the neighbours that can still reach the
destination in the edges left, so every relay is as likely as any other; a
baseline to compare the ``weighted`` policy against. It is the weighted
policy with every step weighted alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from anomos import hookimpl
from anomos.interfaces import PeerGraphView
from anomos.plugins.paths.weighted import WeightedPolicy


class RandomWalkPolicy(WeightedPolicy):
    """Relay count uniform in [min, max] among the feasible; uniform choice at each step."""

    name: ClassVar[str] = "random-walk"

    def step_weight(self, graph: PeerGraphView) -> Callable[[Any], float] | None:
        return None


@hookimpl
def anomos_register_path_policies(registry: Any) -> None:
    registry.add(RandomWalkPolicy.name, RandomWalkPolicy)
