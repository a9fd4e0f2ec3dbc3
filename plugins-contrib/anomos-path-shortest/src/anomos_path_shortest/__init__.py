"""Path policy ``shortest``: the fewest relays allowed, a research baseline.

The default ``weighted`` policy varies the relay count and avoids loaded
relays; to measure what that costs in latency and what it buys in anonymity,
compare it with the cheapest route the tracker could plan: the shortest simple
path from downloader to source that still has at least ``min_relays`` relays
(and at most ``max_relays``). Among equally short paths one is drawn at random,
so traffic is not funnelled through the same relays.

Every search is bounded. With a graph of 100,000 peers, a breadth-first
search from one end would reach everybody; instead two searches of half the
path length meet in the middle (any node of a path of L edges lies within
ceil(L/2) of its start or floor(L/2) of its end), so the work depends on the
degree and the relay bound, never on the size of the network.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable
from typing import Any, ClassVar

from anomos import hookimpl
from anomos.errors import ConfigError
from anomos.interfaces import PeerGraphView

__version__ = "0.1.0"

#: A tracking code carries 8 hops: at most 7 relays and the source.
MAX_RELAYS = 7
#: Nodes the breadth-first searches of one call may reach before giving up
#: (only a very dense graph gets near it; the tracker then tries another source).
MAX_VISITS = 50_000
#: Nodes the depth-first search for one path length may expand.
MAX_EXPANSIONS = 2_000


class _Exhausted(Exception):
    """The visit budget ran out."""


class ShortestPolicy:
    """The shortest simple path with ``min_relays`` to ``max_relays`` relays."""

    name: ClassVar[str] = "shortest"

    def __init__(self, *, min_relays: int = 2, max_relays: int = 4) -> None:
        if not 1 <= min_relays <= max_relays <= MAX_RELAYS:
            raise ConfigError(
                f"relays {min_relays}-{max_relays}: need 1 <= MIN <= MAX <= {MAX_RELAYS}"
            )
        self.min_relays = min_relays
        self.max_relays = max_relays

    def find_path(
        self, graph: PeerGraphView, start: Hashable, end: Hashable, rng: random.Random
    ) -> list[Hashable] | None:
        max_edges = self.max_relays + 1
        try:
            to_end = distances_to_end(graph, start, end, max_edges)
        except _Exhausted:
            return None
        if to_end is None:
            return None
        for edges in range(max(to_end[start], self.min_relays + 1), max_edges + 1):
            path = path_of_length(graph, start, end, edges, to_end, rng)
            if path is not None:
                return path
        return None


def _bfs(
    graph: PeerGraphView,
    root: Hashable,
    depth: int,
    budget: list[int],
    allowed: Any = None,
) -> dict[Hashable, int]:
    """Hop distances from ``root`` up to ``depth`` (only through ``allowed`` if given)."""
    dist = {root: 0}
    frontier = [root]
    for d in range(1, depth + 1):
        nxt = []
        for node in frontier:
            for n in graph.neighbours(node):
                if n in dist or (allowed is not None and n not in allowed):
                    continue
                dist[n] = d
                nxt.append(n)
                budget[0] -= 1
                if budget[0] < 0:
                    raise _Exhausted
        if not nxt:
            break
        frontier = nxt
    return dist


def distances_to_end(
    graph: PeerGraphView, start: Hashable, end: Hashable, max_edges: int
) -> dict[Hashable, int] | None:
    """Distance to ``end`` of every node on some walk of at most ``max_edges``
    edges from ``start`` to ``end``, or ``None`` when ``end`` is farther.

    Raises :class:`_Exhausted` past :data:`MAX_VISITS` nodes.
    """
    if start == end or start not in graph or end not in graph:
        return None
    budget = [MAX_VISITS]
    near_start = _bfs(graph, start, (max_edges + 1) // 2, budget)
    near_end = _bfs(graph, end, max_edges // 2, budget)
    if not any(near_start.get(n, max_edges + 1) + d <= max_edges for n, d in near_end.items()):
        return None
    region = near_start.keys() | near_end.keys()
    dist = _bfs(graph, end, max_edges, budget, region)
    if dist.get(start, max_edges + 1) > max_edges:
        return None
    return dist


def path_of_length(
    graph: PeerGraphView,
    start: Hashable,
    end: Hashable,
    edges: int,
    to_end: dict[Hashable, int],
    rng: random.Random,
) -> list[Hashable] | None:
    """A random simple path of exactly ``edges`` edges, or ``None``.

    Depth-first, stepping only to unvisited nodes that can still reach ``end``
    in the edges left (``to_end``); at the shortest length that never
    backtracks, longer lengths may, within :data:`MAX_EXPANSIONS`.
    """
    path = [start]
    visited = {start}
    stack = [_steps(graph, start, end, edges, to_end, visited, rng)]
    expansions = 0
    while stack:
        options = stack[-1]
        if not options:
            stack.pop()
            visited.discard(path.pop())
            continue
        node = options.pop()
        path.append(node)
        if node == end:
            return path
        visited.add(node)
        expansions += 1
        if expansions > MAX_EXPANSIONS:
            return None
        stack.append(_steps(graph, node, end, edges - len(path) + 1, to_end, visited, rng))
    return None


def _steps(
    graph: PeerGraphView,
    node: Hashable,
    end: Hashable,
    remaining: int,
    to_end: dict[Hashable, int],
    visited: set[Hashable],
    rng: random.Random,
) -> list[Hashable]:
    """Next nodes from ``node`` with ``remaining`` edges to go, shuffled."""
    nbrs: Iterable[Hashable] = graph.neighbours(node)
    if remaining == 1:
        return [end] if end in nbrs else []
    steps = [
        n
        for n in nbrs
        if n != end and n not in visited and to_end.get(n, remaining) <= remaining - 1
    ]
    rng.shuffle(steps)
    return steps


@hookimpl
def anomos_register_path_policies(registry: Any) -> None:
    registry.add(ShortestPolicy.name, ShortestPolicy)
