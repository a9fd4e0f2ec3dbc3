"""Path search over the packed graph: the fast region search agrees with the plain one.

:meth:`SettledView.region` (slots, set operations, a pruned search from the end)
must give the path policies exactly what the generic meet-in-the-middle search
over ``neighbours()`` gives: the same paths for the same random draws.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable

import pytest

from anomos.plugins.paths.guard import GuardPolicy
from anomos.plugins.paths.weighted import WeightedPolicy
from anomos.tracker.graph import PeerGraph, SettledView, search_region


class Plain:
    """A view with only the generic interface (no ``region`` nor ``distances``)."""

    def __init__(self, view: SettledView) -> None:
        self.view = view

    def neighbours(self, peer: Hashable) -> Iterable[Hashable]:
        return self.view.neighbours(peer)

    def load(self, peer: Hashable) -> float:
        return self.view.load(peer)

    def __contains__(self, peer: object) -> bool:
        return peer in self.view

    def __len__(self) -> int:
        return len(self.view)


def partly_settled(n: int, seed: int) -> PeerGraph:
    """A graph where about two thirds of the peers were told of their edges (so some
    edges are settled, some known to one end only) and a few peers left."""
    rng = random.Random(seed)
    g = PeerGraph(rng=random.Random(seed), edge_settle=0.0)
    for i in range(n):
        g.add_peer(i)
    for i in rng.sample(range(n), n // 10):
        g.remove_peer(i)
    for i in rng.sample(list(g), 2 * len(g) // 3):
        g.mark_told(i)
    return g


def distances(view: Plain, root: Hashable) -> dict[Hashable, int]:
    dist = {root: 0}
    frontier = [root]
    while frontier:
        nxt = []
        for node in frontier:
            for n in view.neighbours(node):
                if n not in dist:
                    dist[n] = dist[node] + 1
                    nxt.append(n)
        frontier = nxt
    return dist


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("origin", [False, True])
def test_region_holds_every_node_of_a_short_walk_at_its_exact_distance(seed, origin):
    g = partly_settled(400, seed)
    rng = random.Random(seed)
    peers = sorted(g)
    found = 0
    for _ in range(60):
        start, end = rng.sample(peers, 2)
        view = g.settled_view(start if origin else None)
        plain = Plain(view)
        from_start, from_end = distances(plain, start), distances(plain, end)
        for max_edges in (3, 5):
            useful = {
                n: d
                for n, d in from_end.items()
                if n in from_start and from_start[n] + d <= max_edges
            }
            region = view.region(start, end, max_edges)
            if not useful:
                assert region is None
                assert search_region(plain, start, end, max_edges) is None
                continue
            found += 1
            assert region is not None
            # Every node a walk can use, at its true distance; nothing at a wrong one.
            assert {n: region[n] for n in useful} == useful
            assert all(from_end[n] == d for n, d in region.items())
            assert region[start] == from_end[start]
    assert found > 30


@pytest.mark.parametrize("policy", [WeightedPolicy(), GuardPolicy()])
def test_policies_draw_the_same_paths_over_the_fast_and_the_plain_search(policy):
    g = partly_settled(600, 7)
    pick = random.Random(7)
    peers = sorted(g)
    paths = 0
    for _ in range(150):
        start = pick.choice(peers)
        end = pick.choice([p for p in g.within(start, 4, 1000) if p != start])
        view = g.settled_view(start)
        seed = pick.getrandbits(32)
        fast = policy.find_path(view, start, end, random.Random(seed))
        plain = policy.find_path(Plain(view), start, end, random.Random(seed))
        assert fast == plain
        paths += fast is not None
    assert paths >= 10  # not vacuous (guard reaches fewer: only past its one neighbour)


def test_a_hidden_peer_is_never_crossed():
    g = partly_settled(300, 4)
    for p in g:
        g.mark_told(p)
    rng = random.Random(4)
    peers = sorted(g)
    for _ in range(50):
        start, end = rng.sample(peers, 2)
        view = g.settled_view()
        for hidden in g.neighbours(start):
            region = view.region(start, end, 5, without=hidden)
            if hidden == end:
                assert region is None
            else:
                assert region is None or hidden not in region
