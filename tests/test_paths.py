"""Path policies: simple paths along edges, relay counts in bounds, load avoidance."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Hashable, Iterable

import pytest

from anomos.errors import ConfigError
from anomos.plugins.paths.fixed import FixedPolicy
from anomos.plugins.paths.random_walk import RandomWalkPolicy
from anomos.plugins.paths.weighted import WeightedPolicy
from anomos.tracker.graph import MAX_RELAYS, PeerGraph

POLICIES = [WeightedPolicy, RandomWalkPolicy, FixedPolicy]


class DictGraph:
    """A PeerGraphView from an edge list, with settable loads and a neighbour-call counter."""

    def __init__(self, edges: Iterable[tuple[Hashable, Hashable]]) -> None:
        self.adj: dict[Hashable, set[Hashable]] = {}
        for a, b in edges:
            self.adj.setdefault(a, set()).add(b)
            self.adj.setdefault(b, set()).add(a)
        self.loads: dict[Hashable, float] = {}

    def neighbours(self, peer: Hashable) -> Iterable[Hashable]:
        return self.adj[peer]

    def load(self, peer: Hashable) -> float:
        return self.loads.get(peer, 0.0)

    def __contains__(self, peer: object) -> bool:
        return peer in self.adj

    def __len__(self) -> int:
        return len(self.adj)


class Circulant:
    """100,000 peers, degree 6 (offsets +-1, +-317, +-10007), computed on demand."""

    def __init__(self, n: int = 100_000) -> None:
        self.n = n
        self.touched: set[int] = set()

    def neighbours(self, peer: int) -> list[int]:
        self.touched.add(peer)
        return [(peer + o) % self.n for o in (1, -1, 317, -317, 10007, -10007)]

    def load(self, peer: int) -> float:
        return 0.0

    def __contains__(self, peer: object) -> bool:
        return isinstance(peer, int) and 0 <= peer < self.n

    def __len__(self) -> int:
        return self.n


def assert_valid(graph, path, start, end, lo, hi):
    assert path[0] == start and path[-1] == end
    assert len(set(path)) == len(path), f"path revisits a node: {path}"
    assert lo <= len(path) - 2 <= hi, f"{len(path) - 2} relays outside {lo}-{hi}"
    for a, b in itertools.pairwise(path):
        assert b in graph.neighbours(a), f"{a}-{b} is not an edge"


@pytest.fixture(scope="module")
def network() -> PeerGraph:
    g = PeerGraph(rng=random.Random(11))
    for i in range(1000):
        g.add_peer(i)
    return g


@pytest.mark.parametrize("factory", POLICIES)
def test_paths_are_simple_along_edges_within_bounds(factory, network):
    policy = factory(min_relays=2, max_relays=4)
    rng = random.Random(2)
    lo = 4 if factory is FixedPolicy else 2
    found = 0
    for _ in range(300):
        a, b = rng.sample(range(1000), 2)
        path = policy.find_path(network, a, b, rng)
        if path is not None:
            found += 1
            assert_valid(network, path, a, b, lo, 4)
    assert found > 250  # in 1000 peers almost every pair is within 5 edges


def test_weighted_and_random_walk_vary_the_relay_count(network):
    rng = random.Random(3)
    for policy in (WeightedPolicy(), RandomWalkPolicy()):
        counts = Counter()
        for _ in range(300):
            a, b = rng.sample(range(1000), 2)
            path = policy.find_path(network, a, b, rng)
            if path:
                counts[len(path) - 2] += 1
        assert set(counts) == {2, 3, 4}, counts


def test_fixed_uses_exactly_max_relays(network):
    rng = random.Random(4)
    policy = FixedPolicy(min_relays=1, max_relays=3)
    for _ in range(100):
        a, b = rng.sample(range(1000), 2)
        path = policy.find_path(network, a, b, rng)
        if path:
            assert len(path) == 5


def two_routes() -> DictGraph:
    """S reaches E through X1-X2 or Y1-Y2 (2 relays each) and nothing else."""
    return DictGraph(
        [("S", "X1"), ("X1", "X2"), ("X2", "E"), ("S", "Y1"), ("Y1", "Y2"), ("Y2", "E")]
    )


def test_weighted_avoids_loaded_relays():
    g = two_routes()
    g.loads.update({"X1": 10.0, "X2": 10.0})
    rng = random.Random(5)
    weighted = Counter(WeightedPolicy().find_path(g, "S", "E", rng)[1] for _ in range(400))
    blind = Counter(RandomWalkPolicy().find_path(g, "S", "E", rng)[1] for _ in range(400))
    assert weighted["Y1"] > 0.85 * 400, weighted
    assert 0.3 * 400 < blind["Y1"] < 0.7 * 400, blind


@pytest.mark.parametrize("factory", POLICIES)
def test_none_when_impossible(factory):
    policy = factory(min_relays=2, max_relays=3)
    rng = random.Random(6)
    # Adjacent ends and no other route: any path would have too few relays.
    assert policy.find_path(DictGraph([("S", "E"), ("S", "A")]), "S", "E", rng) is None
    # A line longer than max_relays + 1 edges.
    line = DictGraph([(i, i + 1) for i in range(10)])
    assert policy.find_path(line, 0, 9, rng) is None
    if factory is FixedPolicy:
        assert policy.find_path(line, 0, 3, rng) is None  # 2 relays, fixed wants 3
        assert policy.find_path(line, 0, 4, rng) == [0, 1, 2, 3, 4]
    else:
        assert policy.find_path(line, 0, 3, rng) == [0, 1, 2, 3]
    # Disconnected, unknown, or identical ends.
    split = DictGraph([("S", "A"), ("A", "B"), ("C", "E"), ("E", "D")])
    assert policy.find_path(split, "S", "E", rng) is None
    assert policy.find_path(split, "S", "nobody", rng) is None
    assert policy.find_path(split, "S", "S", rng) is None


@pytest.mark.parametrize("factory", POLICIES)
def test_never_uses_an_end_as_a_relay(factory):
    # The only 3-relay walks from S to E go through E or back through S.
    g = DictGraph([("S", "A"), ("A", "E"), ("E", "B"), ("B", "C"), ("S", "D"), ("D", "A")])
    rng = random.Random(7)
    for _ in range(50):
        path = factory(min_relays=2, max_relays=3).find_path(g, "S", "E", rng)
        assert path is None or path == ["S", "D", "A", "E"]


@pytest.mark.parametrize("factory", POLICIES)
def test_hundred_thousand_peers_touch_few_nodes(factory):
    """On a 100,000-peer sparse graph a search looks at a small region only."""
    g = Circulant()
    policy = factory(min_relays=2, max_relays=4)
    rng = random.Random(8)
    found = 0
    for _ in range(20):
        start = rng.randrange(g.n)
        end = start
        for _ in range(5 if factory is FixedPolicy else 4):  # the graph is bipartite
            end = rng.choice(g.neighbours(end))
        if end == start:
            continue
        g.touched.clear()
        path = policy.find_path(g, start, end, rng)
        assert len(g.touched) < 2000, "search is not bounded"
        if path is not None:
            found += 1
            assert_valid(g, path, start, end, 4 if factory is FixedPolicy else 2, 4)
    assert found >= 10
    g.touched.clear()
    assert policy.find_path(g, 0, 50_000, rng) is None  # far apart
    assert len(g.touched) < 2000


@pytest.mark.parametrize("factory", POLICIES)
def test_bounds_are_validated(factory):
    with pytest.raises(ConfigError, match="relays 0-3"):
        factory(min_relays=0, max_relays=3)
    with pytest.raises(ConfigError, match="need 1 <= MIN <= MAX"):
        factory(min_relays=3, max_relays=2)
    with pytest.raises(ConfigError, match=f"<= {MAX_RELAYS}"):
        factory(min_relays=1, max_relays=MAX_RELAYS + 1)


def test_policies_are_registered(plugins):
    assert {"weighted", "random-walk", "fixed"} <= set(plugins.path_policies)
    policy = plugins.path_policy("fixed", min_relays=1, max_relays=2)
    assert isinstance(policy, FixedPolicy) and policy.relays == 2


def test_max_relays_matches_the_onion():
    import anomos.protocol.onion as onion

    assert MAX_RELAYS == onion.MAX_HOPS - 1
