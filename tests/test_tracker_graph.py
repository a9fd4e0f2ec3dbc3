"""The tracker's neighbour graph: degrees, NIDs, repair, randomness, load."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from anomos.errors import ConfigError
from anomos.tracker import graph as graph_mod
from anomos.tracker.graph import PeerGraph


def build(n: int, seed: int = 1, **kw: int) -> PeerGraph:
    g = PeerGraph(rng=random.Random(seed), **kw)
    for i in range(n):
        g.add_peer(i)
    return g


def check_invariants(g: PeerGraph, told: bool = False) -> None:
    """Symmetric adjacency, equal NIDs at both ends, NIDs unique per peer, degrees <= max;
    the newer end dials, unless ``told`` (an end told first dials)."""
    for a in g:
        nbrs = list(g.neighbours(a))
        assert a not in nbrs
        assert len(nbrs) <= g.max_neighbours
        nids = [g.nid(a, b) for b in nbrs]
        assert len(set(nids)) == len(nids), f"peer {a} has a duplicate NID"
        for b in nbrs:
            assert a in g.neighbours(b)
            assert g.nid(a, b) == g.nid(b, a)
            assert 1 <= g.nid(a, b) <= graph_mod.MAX_NID
            assert g.peer_by_nid(a, g.nid(a, b)) == b
            assert g.dialer(a, b) == g.dialer(b, a)
            assert told or g.dialer(a, b) == max(a, b, key=g.seq)


def test_degrees_within_bounds_and_nids_consistent():
    g = build(500)
    check_invariants(g)
    degrees = [g.degree(p) for p in g]
    assert min(degrees) >= 4
    assert max(degrees) <= 6
    assert g.edge_count() == sum(degrees) // 2 == len(list(g.edges()))


def test_custom_bounds_and_validation():
    g = build(300, min_neighbours=2, max_neighbours=3)
    check_invariants(g)
    assert {g.degree(p) for p in g} <= {2, 3}
    with pytest.raises(ConfigError, match="need 1 <= MIN <= MAX"):
        PeerGraph(min_neighbours=5, max_neighbours=4)


def test_small_network_connects_everyone_it_can():
    g = build(3)
    check_invariants(g)
    assert sorted(g.degree(p) for p in g) == [2, 2, 2]
    assert g.degree(0) == 2  # the first peer is not left alone


def test_nids_avoid_both_endpoints_when_the_rng_collides(monkeypatch):
    """Force NID draws to repeat: the graph must skip NIDs either end already uses."""
    g = PeerGraph(rng=random.Random(3))
    draws = iter([7, 7, 7, 9, 7, 9, 11, 7, 9, 11, 13, *range(100, 200)])
    monkeypatch.setattr(g._rng, "randint", lambda a, b: next(draws))
    for i in range(5):
        g.add_peer(i)
    check_invariants(g)
    assert g.nid(0, 1) == 7


def test_remove_peer_repairs_neighbours_below_minimum():
    g = build(200, seed=5, min_neighbours=4, max_neighbours=4)
    victim = 17
    former = list(g.neighbours(victim))
    changes = g.remove_peer(victim)
    assert victim not in g and len(g) == 199
    assert {frozenset(e) for e in changes.removed} >= {frozenset((victim, f)) for f in former}
    check_invariants(g)
    for f in former:
        assert g.degree(f) == 4
    assert changes.added, "nobody was repaired"
    for e in changes.added:
        assert g.nid(e.a, e.b) == e.nid


def test_mass_removal_keeps_bounds():
    g = build(400, seed=2)
    rng = random.Random(9)
    for p in rng.sample(range(400), 250):
        g.remove_peer(p)
    check_invariants(g)
    assert min(g.degree(p) for p in g) >= 4


def test_neighbours_are_drawn_from_all_peers_not_recent_ones():
    """A late joiner's neighbours (directly or via edge splits) span the whole join order."""
    firsts = Counter()
    for seed in range(30):
        g = build(300, seed=seed)
        g.add_peer("late")
        for n in g.neighbours("late"):
            firsts[n < 150] += 1
    # Both the older and the newer half of the network appear as neighbours.
    assert firsts[True] > 10 and firsts[False] > 10


def test_joins_report_the_edges_they_change():
    g = build(100, seed=4)
    before = {frozenset((e.a, e.b)): e.nid for e in g.edges()}
    changes = g.add_peer("new")
    after = {frozenset((e.a, e.b)): e.nid for e in g.edges()}
    for a, b in changes.removed:
        assert frozenset((a, b)) in before and frozenset((a, b)) not in after
    for e in changes.added:
        assert after[frozenset((e.a, e.b))] == e.nid
        assert e.dialer == "new"  # the newer peer dials
    assert g.degree("new") >= 4


def test_restore_keeps_nids_and_dial_direction():
    g = build(60, seed=6)
    h = PeerGraph(rng=random.Random(0))
    for p in g:
        h.restore_peer(p, g.seq(p))
    for e in g.edges():
        h.restore_edge(e.a, e.b, e.nid)
    assert sorted((e.a, e.b, e.nid, e.dialer) for e in h.edges()) == sorted(
        (e.a, e.b, e.nid, e.dialer) for e in g.edges()
    )
    assert not h.repair().added
    h.add_peer("next")
    assert all(e.dialer == "next" for e in h.edges() if "next" in (e.a, e.b))


def test_bulk_restore_keeps_edges_and_the_degree_buckets():
    g = build(200, seed=8)
    h = PeerGraph(rng=random.Random(0))
    for p in g:
        h.restore_peer(p, g.seq(p))
    h.restore_edges((e.a, e.b, e.nid, e.dialer) for e in g.edges())
    assert sorted((e.a, e.b, e.nid, e.dialer) for e in h.edges()) == sorted(
        (e.a, e.b, e.nid, e.dialer) for e in g.edges()
    )
    for p in range(1000, 1100):  # joins pick open peers from the rebuilt buckets
        h.add_peer(p)
    check_invariants(h)
    assert {h.degree(p) for p in h} <= {4, 5, 6}
    # Restored under a lower maximum: the rows widen, nothing is lost.
    narrow = PeerGraph(rng=random.Random(0), min_neighbours=2, max_neighbours=3)
    for p in g:
        narrow.restore_peer(p, g.seq(p))
    narrow.restore_edges((e.a, e.b, e.nid, e.dialer) for e in g.edges())
    assert sorted((e.a, e.b, e.nid) for e in narrow.edges()) == sorted(
        (e.a, e.b, e.nid) for e in g.edges()
    )


def test_restore_from_an_image_and_the_links_changed_after_it():
    """An image, then a leave, joins (some splitting pairs that stay) and dialers fixed
    afterwards: the image plus the links removed and (re)written since, by id, as the
    store keeps them, give back the same graph, every edge settled."""
    g = build(200, seed=9)
    image = g.image(1)  # nobody told yet: no dialer fixed in it
    ids = {p: g.seq(p) for p in g}
    changes = g.remove_peer(17)
    for p in range(500, 530):
        changes.extend(g.add_peer(p))
    ids.update((p, g.seq(p)) for p in g)
    fixed = [e for p in list(g)[:60] for e in g.mark_told(p)]
    written = {frozenset((e.a, e.b)) for e in changes.added + fixed}
    removed = {frozenset(pair) for pair in changes.removed}
    assert any(all(p in g for p in pair) for pair in removed - written)  # a split pair
    assert any(all(ids[p] <= 200 for p in (e.a, e.b)) for e in fixed)  # imaged, rewritten
    gone = [tuple(sorted(ids[p] for p in pair)) for pair in removed]
    links = [
        (ids[e.a], ids[e.b], e.nid, ids[e.dialer])
        for e in g.edges()
        if frozenset((e.a, e.b)) in written
    ]
    h = PeerGraph(rng=random.Random(0))
    peers = list(g)
    assert h.restore(peers, [ids[p] for p in peers], links, image, gone) == 0
    check_invariants(h, told=True)
    assert sorted((e.a, e.b, e.nid, e.dialer) for e in h.edges()) == sorted(
        (e.a, e.b, e.nid, e.dialer) for e in g.edges()
    )
    assert 17 not in h and all(p in h for p in range(500, 530))
    assert all(h.settled(e.a, e.b) for e in h.edges())
    h.add_peer("next")  # the rebuilt degree buckets serve joins
    assert h.seq("next") == max(ids.values()) + 1
    check_invariants(h, told=True)


def test_load_decays():
    now = [1000.0]
    g = PeerGraph(rng=random.Random(1), clock=lambda: now[0])
    g.add_peer("a")
    g.add_load("a")
    g.add_load("a")
    assert g.load("a") == pytest.approx(2.0)
    now[0] += graph_mod.LOAD_HALF_LIFE
    assert g.load("a") == pytest.approx(1.0)
    assert g.load("missing") == 0.0


def test_large_graph_builds_with_bounded_degrees():
    g = build(20_000, seed=8)
    degrees = Counter(g.degree(p) for p in g)
    assert set(degrees) <= {4, 5, 6}
    sample = random.Random(1).sample(range(20_000), 50)
    for p in sample:
        for q in g.neighbours(p):
            assert g.nid(p, q) == g.nid(q, p)


def test_new_edges_settle_only_once_both_ends_were_told():
    now = [0.0]
    g = PeerGraph(rng=random.Random(12), clock=lambda: now[0], edge_settle=2.0)
    for i in range(50):
        g.add_peer(i)
    for p in list(g):
        g.mark_told(p)
    now[0] += 2.0
    assert all(g.settled(e.a, e.b) for e in g.edges())
    changes = g.add_peer("new")
    assert changes.removed, "expected a split in a saturated graph"
    for e in changes.added:
        assert not g.settled(e.a, e.b)
    g.mark_told("new")
    now[0] += 5.0
    for e in changes.added:  # the old peers have not announced since
        assert not g.settled(e.a, e.b)
        g.mark_told(e.b if e.a == "new" else e.a)
    assert not g.settled(changes.added[0].a, changes.added[0].b)  # told just now
    now[0] += 2.0
    assert all(g.settled(e.a, e.b) for e in g.edges())
    view = g.settled_view()
    assert sorted(view.neighbours("new"), key=str) == sorted(g.neighbours("new"), key=str)


def test_replace_edge_tops_up_both_ends_and_keeps_the_pair_apart():
    now = [0.0]
    g = PeerGraph(rng=random.Random(13), clock=lambda: now[0])
    for i in range(200):
        g.add_peer(i)
    a = 7
    b = next(iter(g.neighbours(a)))
    edges_before = g.edge_count()
    changes = g.replace_edge(a, b)
    assert changes.removed == [(a, b)]
    assert b not in g.neighbours(a) and g.avoided(a, b) and g.avoided(b, a)
    assert g.degree(a) >= g.min_neighbours and g.degree(b) >= g.min_neighbours
    assert all({e.a, e.b} != {a, b} for e in changes.added)
    check_invariants(g)
    assert g.edge_count() == edges_before - 1 + len(changes.added)
    # No edge: nothing to replace.
    assert g.replace_edge(a, b) == graph_mod.Changes()
    assert g.replace_edge("nobody", a) == graph_mod.Changes()

    # Three peers, at most two neighbours each: once a - b is replaced, the only
    # peer with a free slot for either is the other, so they stay short while avoided.
    small = PeerGraph(min_neighbours=2, max_neighbours=2, clock=lambda: now[0])
    for name in "abc":
        small.add_peer(name)
    assert small.degree("a") == small.degree("b") == 2
    small.replace_edge("a", "b")
    assert "b" not in small.neighbours("a")
    assert small.degree("a") == small.degree("b") == 1
    now[0] += graph_mod.AVOID_PAIR_SECONDS - 1
    assert not small.top_up("a").added and small.avoided("a", "b")
    small.remove_peer("c")  # repairs of the others must not link the pair either
    small.add_peer("c")
    assert "b" not in small.neighbours("a")
    now[0] += 1
    assert not small.avoided("a", "b")
    small.replace_edge("a", "c")  # ... but once the avoidance expired, they may
    assert set(small.neighbours("a")) == {"b"}


def test_an_edge_split_never_joins_an_avoided_pair():
    joined = set()
    for seed in range(20):
        g = PeerGraph(min_neighbours=2, max_neighbours=2, rng=random.Random(seed))
        for i in range(6):
            g.add_peer(i)  # saturated: every peer at the maximum, a newcomer must split
        for i in range(4):
            g._avoid("new", i)
        g.add_peer("new")
        assert set(g.neighbours("new")) <= {4, 5}
        joined.add(frozenset(g.neighbours("new")))
    assert frozenset({4, 5}) in joined  # the one edge it may split was found


def test_avoided_pairs_expire_and_are_bounded(monkeypatch):
    monkeypatch.setattr(graph_mod, "MAX_AVOIDED", 2)
    now = [0.0]
    g = PeerGraph(rng=random.Random(2), clock=lambda: now[0])
    g._avoid(1, 2)
    g._avoid(3, 4)
    g._avoid(5, 6)
    assert not g.avoided(1, 2) and g.avoided(3, 4) and g.avoided(6, 5)
    now[0] += graph_mod.AVOID_PAIR_SECONDS
    assert not g.avoided(3, 4)
    g._avoid(7, 8)  # expired pairs are dropped as new ones come
    assert list(g._avoided) == [frozenset((7, 8))]


def test_a_departed_peers_slot_is_reused_clean():
    """The arrays do not grow with churn, and a reused slot keeps nothing of its last
    peer: no neighbour, NID, flag, load or settled edge."""
    g = build(200, seed=9, edge_settle=0.0)
    for p in list(g):
        g.mark_told(p)
    g.add_load(17, 5.0)
    slot = g._slot[17]
    rows = len(g._nbr)
    g.remove_peer(17)
    g.add_peer("newcomer")
    assert g._slot["newcomer"] == slot and len(g._nbr) == rows
    assert g.load("newcomer") == 0.0
    assert g.settled_neighbours("newcomer") == set()  # told of nothing yet
    base = slot * g._width
    deg = g.degree("newcomer")
    assert g.min_neighbours <= deg <= g.max_neighbours
    assert list(g._nbr[base + deg : base + g._width]) == [-1] * (g._width - deg)
    assert not any(g._flags[base : base + g._width])
    for n in g.neighbours("newcomer"):
        assert "newcomer" in g.neighbours(n) and 17 not in g.neighbours(n)
        assert g.nid(n, "newcomer") == g.nid("newcomer", n)
    # A search never crosses the old peer's edges through the reused slot.
    view = g.settled_view()
    for other in list(g)[:50]:
        region = view.region(other, "newcomer", 5)
        assert region is None  # every edge of the newcomer is unsettled
