"""Planning around peers nobody can dial (behind NAT): the graph's rule, fast.

A peer in ``PeerGraph.closed`` can only dial out, so on every edge it must be
the dialling side, and two such peers must never be made neighbours (no link
between them could ever come up). Checked here through joins, departures,
edge splits and replacements on a graph where most peers are closed, and on
the :class:`Reachability` bounds with a probe function of our own (the probes
over real sockets are in test_nat_probe.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import gevent
import gevent.event
import pytest

from anomos.errors import ConfigError
from anomos.pluginmanager import Plugins, get_plugins
from anomos.tracker import reachability as reachmod
from anomos.tracker.graph import PeerGraph
from anomos.tracker.reachability import Reach, Reachability
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings
from anomos.tracker.simulate import (
    SimClock,
    SimOptions,
    build_graph,
    simulate,
    summarize,
    unreachable_peers,
)
from anomos.tracker.store import PeerRow

PLUGINS = get_plugins(load_entrypoints=False)


def check_rule(g: PeerGraph, closed: set[int]) -> tuple[int, int]:
    """Assert the rule on every edge; (edges with one closed end, edges in all)."""
    mixed = total = 0
    for edge in g.edges():
        total += 1
        a_closed, b_closed = edge.a in closed, edge.b in closed
        assert not (a_closed and b_closed), f"two unreachable peers linked: {edge}"
        if a_closed or b_closed:
            mixed += 1
            assert edge.dialer == (edge.a if a_closed else edge.b), f"reachable side dials: {edge}"
    return mixed, total


@pytest.mark.parametrize("share", [0.5, 0.8])
def test_no_two_unreachable_peers_are_linked_and_the_unreachable_side_dials(share: float) -> None:
    rng = random.Random(7)
    g = PeerGraph(min_neighbours=4, max_neighbours=6, rng=random.Random(1))
    closed: set[int] = set()
    g.closed = closed
    live: list[int] = []
    for peer in range(400):
        if rng.random() < share:
            closed.add(peer)
        g.add_peer(peer)
        # As a tracker would: tell the newcomer (it becomes the dialler by default).
        g.mark_told(peer)
        live.append(peer)
        if peer % 7 == 6:  # churn: one leaves, one edge is replaced
            g.remove_peer(live.pop(rng.randrange(len(live))))
            a = rng.choice(live)
            if g.neighbours(a):
                g.replace_edge(a, rng.choice(g.neighbours(a)))
    mixed, total = check_rule(g, closed)
    assert mixed > total // 3  # the rule was exercised, not avoided
    # The reachable peers carry the unreachable ones: every unreachable peer that has
    # neighbours has only reachable ones, and most reached the minimum.
    open_peers = [p for p in live if p not in closed]
    shut = [p for p in live if p in closed]
    assert all(n not in closed for p in shut for n in g.neighbours(p))
    full = sum(g.degree(p) >= g.min_neighbours for p in shut)
    assert full >= 0.9 * len(shut) or sum(g.degree(p) for p in open_peers) >= 0.9 * (
        g.max_neighbours * len(open_peers)
    ), "unreachable peers kept below the minimum while reachable ones had room"


def test_a_peer_that_turns_out_unreachable_dials_its_edges() -> None:
    g = PeerGraph(min_neighbours=2, max_neighbours=4, rng=random.Random(3))
    closed: set[str] = set()
    g.closed = closed
    for p in "abcd":
        g.add_peer(p)
        g.mark_told(p)
    # "b" was told of its edges first, so it dialled; now it is found to be behind NAT.
    edges = [e for e in g.edges() if "d" in (e.a, e.b)]
    assert edges and all(e.dialer == "d" for e in edges)
    closed.add("a")
    for e in g.edges():
        if "a" in (e.a, e.b):
            assert e.dialer == "a"
    # Two closed peers: the graph refuses to link them, whoever asks.
    closed.add("z")
    g.add_peer("z")
    assert "a" not in g.neighbours("z") and g.neighbours("z")
    # A closed peer is never picked as the far end of a new edge (it would hear of it
    # only at its next announce): a newcomer that is reachable links to reachable ones.
    g.add_peer("y")
    assert not {"a", "z"} & set(g.neighbours("y"))


def test_probe_bounds_address_in_flight_identity_and_network() -> None:
    now = [1000.0]
    dialled: list[str] = []
    release = gevent.event.Event()

    def probe(address: str, identity: bytes, timeout: float) -> str | None:
        dialled.append(address)
        release.wait()
        return None

    verdicts: list[tuple[object, Reach, Reach]] = []
    r = Reachability(
        probe=probe,
        on_verdict=lambda p, a, b: verdicts.append((p, a, b)),
        network_of=lambda ip: ip.rsplit(".", 1)[0],  # a /24
        clock=lambda: now[0],
        max_in_flight=4,
    )
    # Advertising another host than the one it came from: never dialled, unreachable.
    assert r.announced("p0", b"k", "192.0.2.99:6881", "198.51.100.7", False) is Reach.UNREACHABLE
    assert "p0" in r.closed
    # Onion addresses and shared client addresses: not probed, planned as reachable.
    assert r.announced("p1", b"k", "abc.onion:1", "198.51.100.8", False) is Reach.UNCHECKED
    assert r.announced("p2", b"k", "198.51.100.9:1", "198.51.100.9", True) is Reach.UNCHECKED
    gevent.sleep(0)
    assert dialled == []
    # At most 4 in flight, from any number of networks.
    for i in range(10):
        state = r.announced(f"q{i}", b"k", f"10.{i}.0.1:7000", f"10.{i}.0.1", False)
        assert state is Reach.CHECKING and f"q{i}" in r.closed
    gevent.sleep(0)
    assert len(dialled) == 4 and r.skipped == 6
    release.set()
    gevent.sleep(0.01)
    assert [r.state(f"q{i}") for i in range(4)] == [Reach.REACHABLE] * 4
    assert not {"q0", "q1", "q2", "q3"} & r.closed
    # One identity changing its port at every announce: one probe per PROBE_EVERY.
    dialled.clear()
    for port in range(8000, 8010):
        r.announced("q0", b"k", f"10.0.0.1:{port}", "10.0.0.1", False)
        now[0] += 1
    gevent.sleep(0.01)
    assert dialled == []  # q0 was probed less than PROBE_EVERY ago
    now[0] += reachmod.PROBE_EVERY
    r.announced("q0", b"k", "10.0.0.1:9999", "10.0.0.1", False)
    gevent.sleep(0.01)
    assert dialled == ["10.0.0.1:9999"]
    # Many identities of one network: its bucket, not the in-flight cap, stops them.
    dialled.clear()
    for i in range(40):
        r.announced(f"n{i}", b"k", "203.0.113.5:7000", "203.0.113.5", False)
        gevent.sleep(0.001)
    assert len(dialled) == reachmod.NETWORK_BURST
    r.close()


def test_anomos_paths_plans_unreachable_peers_as_the_tracker_does() -> None:
    options = SimOptions(peers=300, circuits=400, unreachable=0.5, seed=5)
    closed = unreachable_peers(options)
    assert len(closed) == 150 and closed == unreachable_peers(options)  # from the seed alone
    graph = build_graph(options, SimClock())
    check_rule(graph, set(closed))
    run = simulate(PLUGINS.path_policy("weighted", min_relays=2, max_relays=4), options)
    share = summarize(run, options)["reachable"]["hop_share"]
    # Reachable peers have more neighbours, so they carry more than their half of the relaying.
    assert 0.5 < share < 1.0, share
    with pytest.raises(ConfigError):
        SimOptions(unreachable=1.0).check()


def test_edges_between_peers_under_check_survive_only_unreachable_pairs_are_cut(
    tmp_path: Path, plugins: Plugins
) -> None:
    """After a tracker restart every peer is checked again at once: the edges between
    peers under check must stay; only two peers found unreachable lose their edge."""
    tracker = Tracker(
        tmp_path / "t", "127.0.0.1:0", plugins, TrackerSettings(probe_reachability=True)
    )
    try:
        reach, g = tracker.reach, tracker.graph
        assert reach is not None
        a, b = b"a" * 32, b"b" * 32
        for i, peer in enumerate((a, b)):
            g.add_peer(peer)
            tracker.peers[peer] = PeerRow(peer, peer, peer, f"192.0.2.{i}:1", 0, g.seq(peer))
        assert b in g.neighbours(a)
        reach._set(a, "192.0.2.1:1", Reach.CHECKING, "")
        reach._set(b, "192.0.2.2:1", Reach.CHECKING, "")
        assert b in g.neighbours(a)  # both under check: kept
        reach._set(a, "192.0.2.1:1", Reach.UNREACHABLE, "")
        assert b in g.neighbours(a)  # the other one may still be reachable
        reach._set(b, "192.0.2.2:1", Reach.UNREACHABLE, "")
        assert b not in g.neighbours(a)  # two unreachable peers: no link can come up
    finally:
        tracker.stop()
