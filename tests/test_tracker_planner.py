"""The planner: plans peel hop by hop with the real onion and open at the source."""

from __future__ import annotations

import itertools
import random

import pytest

from anomos.identity import PeerIdentity
from anomos.plugins.ciphers.x25519 import X25519Suite
from anomos.plugins.paths.fixed import FixedPolicy
from anomos.plugins.paths.weighted import WeightedPolicy
from anomos.protocol.onion import TRACKING_CODE_SIZE, OnionReader
from anomos.protocol.request import open_request
from anomos.testing import tracker_key, tracker_trust
from anomos.tracker.graph import PeerGraph
from anomos.tracker.planner import (
    REQUEST_TTL,
    SOURCE_TAG_TTL,
    PeerKeys,
    Planner,
    SourceTags,
    Swarm,
    candidate_sources,
)
from anomos.tracker.store import SwarmRow

INFOHASH = bytes(range(20))


@pytest.fixture(scope="module")
def world():
    """40 peers with real keys in a neighbour graph."""
    ids = [PeerIdentity.generate() for _ in range(40)]
    by_pub = {i.identity_public: i for i in ids}
    graph = PeerGraph(rng=random.Random(1), edge_settle=0)
    for i in ids:
        graph.add_peer(i.identity_public)
    for p in graph:
        graph.mark_told(p)
    return graph, by_pub


def make_planner(graph, by_pub, policy=None, seed=2):
    def keys(peer):
        return PeerKeys(by_pub[peer].onion_public, by_pub[peer].box_public)

    return Planner(
        graph,
        policy or WeightedPolicy(),
        X25519Suite(),
        keys,
        tracker_key=tracker_key(),
        rng=random.Random(seed),
    )


def follow(plan, downloader, graph, by_pub):
    """Walk the tracking code as the relays would; return the peers visited."""
    readers = {}
    at = graph.peer_by_nid(downloader, plan.first_nid)
    code = plan.tracking_code
    visited = []
    layers = []
    while True:
        assert at is not None, "an NID leads nowhere"
        visited.append(at)
        reader = readers.setdefault(at, OnionReader(by_pub[at].onion_private))
        peeled = reader.peel(code)
        layers.append(peeled.layer)
        if peeled.next_nid is None:
            return visited, layers
        assert len(peeled.forward_code) == TRACKING_CODE_SIZE
        code = peeled.forward_code
        at = graph.peer_by_nid(at, peeled.next_nid)


def test_plans_peel_to_the_source_which_opens_the_request(world):
    graph, by_pub = world
    planner = make_planner(graph, by_pub)
    peers = list(graph)
    downloader, sources = peers[0], peers[1:]
    plans = planner.plan(downloader, INFOHASH, sources, 4)
    assert len(plans) == 4
    reached = []
    for plan in plans:
        visited, layers = follow(plan, downloader, graph, by_pub)
        source = visited[-1]
        reached.append(source)
        assert downloader not in visited
        assert 2 <= len(visited) - 1 <= 4  # relays within the policy's bounds
        assert layers == list(plan.layers)
        req = open_request(plan.request_blob, by_pub[source].box, tracker_trust())
        assert req.infohash == INFOHASH and req.suite == "x25519" == plan.suite
        assert req.material == plan.material
        assert req.expires > planner.clock() + REQUEST_TTL - 5
    assert len(set(reached)) == 4, "each circuit goes to a different source"
    assert planner.planned == 4


def test_relays_are_charged_load(world):
    graph, by_pub = world
    planner = make_planner(graph, by_pub, FixedPolicy(min_relays=2, max_relays=2), seed=3)
    peers = list(graph)
    before = {p: graph.load(p) for p in peers}
    (plan,) = planner.plan(peers[5], INFOHASH, [peers[6]], 1)
    visited, _ = follow(plan, peers[5], graph, by_pub)
    for relay in visited[:-1]:
        assert graph.load(relay) == pytest.approx(before[relay] + 1, abs=0.01)
    assert graph.load(visited[-1]) == pytest.approx(before[visited[-1]], abs=0.01)


def test_sources_without_a_path_are_skipped(world):
    graph, by_pub = world
    planner = make_planner(graph, by_pub)
    peers = list(graph)
    stranger = PeerIdentity.generate()
    by_pub[stranger.identity_public] = stranger
    # Not in the graph at all, the downloader itself, then a real source.
    plans = planner.plan(peers[0], INFOHASH, [stranger.identity_public, peers[0], peers[9]], 3)
    assert len(plans) == 1
    assert follow(plans[0], peers[0], graph, by_pub)[0][-1] == peers[9]
    # A downloader unknown to the graph gets nothing.
    assert planner.plan(stranger.identity_public, INFOHASH, peers[1:], 2) == []


def test_a_broken_policy_is_not_trusted(world):
    graph, by_pub = world

    class Liar:
        name = "liar"

        def find_path(self, graph, start, end, rng):
            return [start, end]  # no relay, maybe not even an edge

    planner = make_planner(graph, by_pub, Liar())
    peers = list(graph)
    assert planner.plan(peers[0], INFOHASH, peers[1:], 3) == []


def test_candidate_sources_have_data_and_exclude_the_downloader():
    rng = random.Random(0)
    swarm = {"seed": 0, "half": 500, "fresh": 1000, "me": 0}
    assert sorted(candidate_sources(swarm, 1000, "me", rng)) == ["half", "seed"]
    assert candidate_sources({"a": 1000, "b": 1000}, 1000, "me", rng) == []
    orders = {
        tuple(candidate_sources({str(i): 0 for i in range(6)}, 10, "x", rng)) for _ in range(20)
    }
    assert len(orders) > 1, "sources are not shuffled"


def test_swarm_samples_only_peers_with_data():
    swarm = Swarm()
    rng = random.Random(1)
    swarm.set("seed", SwarmRow(0))
    swarm.set("fresh", SwarmRow(1000))  # the size is now 1000: "fresh" has nothing
    swarm.set("half", SwarmRow(400))
    assert sorted(swarm.sample_sources(5, "me", rng)) == ["half", "seed"]
    assert swarm.sample_sources(5, "seed", rng) == ["half"]
    # A bigger 'left' shows the torrent is bigger: "fresh" turns out to have data.
    swarm.set("newcomer", SwarmRow(2000))
    assert sorted(swarm.sample_sources(5, "me", rng)) == ["fresh", "half", "seed"]
    swarm.set("half", SwarmRow(2000))  # reported less than before: no longer a source
    swarm.remove("seed")
    assert swarm.sample_sources(5, "me", rng) == ["fresh"]
    for i in range(1000):
        swarm.set(i, SwarmRow(0))
    picked = swarm.sample_sources(8, 3, rng)
    assert len(picked) == 8 and len(set(picked)) == 8 and 3 not in picked


def test_edges_not_yet_known_to_both_ends_are_not_used():
    """A circuit over an edge one end has not heard of (or not had time to dial) would fail."""
    now = [100.0]
    ids = [PeerIdentity.generate() for _ in range(12)]
    by_pub = {i.identity_public: i for i in ids}
    graph = PeerGraph(rng=random.Random(4), clock=lambda: now[0], edge_settle=2.0)
    for i in ids:
        graph.add_peer(i.identity_public)
    planner = make_planner(graph, by_pub, seed=5)
    peers = list(graph)
    assert planner.plan(peers[0], INFOHASH, peers[1:], 3) == []  # nobody was told
    for p in peers:
        graph.mark_told(p)
    assert planner.plan(peers[0], INFOHASH, peers[1:], 3) == []  # no time to link up yet
    now[0] += 2.0
    assert len(planner.plan(peers[0], INFOHASH, peers[1:], 3)) == 3


def test_a_newcomer_plans_at_once_over_its_own_edges_only():
    """The downloader waits for its first hop itself, so its fresh edges count once it was
    told of them; every other edge on the path must still be settled."""
    now = [100.0]
    ids = [PeerIdentity.generate() for _ in range(13)]
    by_pub = {i.identity_public: i for i in ids}
    graph = PeerGraph(rng=random.Random(6), clock=lambda: now[0], edge_settle=2.0)
    old, newcomer = [i.identity_public for i in ids[:12]], ids[12].identity_public
    for p in old:
        graph.add_peer(p)
    for p in old:
        graph.mark_told(p)
    now[0] += 2.0  # the old network is settled
    graph.add_peer(newcomer)
    planner = make_planner(graph, by_pub, seed=7)
    sources = [p for p in old if p not in graph.neighbours(newcomer)]
    assert planner.plan(newcomer, INFOHASH, sources, 2) == []  # not told of its edges yet
    graph.mark_told(newcomer)
    plans = planner.plan(newcomer, INFOHASH, sources, 2)
    assert plans, "a told newcomer should get circuits without waiting for its edges to settle"
    for plan in plans:
        visited, _ = follow(plan, newcomer, graph, by_pub)
        path = [newcomer, *visited]
        for a, b in itertools.pairwise(path[1:]):
            assert graph.settled(a, b)  # beyond the first hop, only settled edges
        # the newcomer's other ends were not told yet: those edges are not settled
        assert not graph.settled(newcomer, visited[0])


def test_a_source_whose_keys_the_crypto_refuses_is_skipped(world):
    graph, by_pub = world
    peers = list(graph)
    bad_source = peers[7]

    def keys(peer):
        if peer == bad_source:
            return PeerKeys(bytes(32), bytes(32))  # low-order points
        return PeerKeys(by_pub[peer].onion_public, by_pub[peer].box_public)

    planner = Planner(
        graph, FixedPolicy(), X25519Suite(), keys, tracker_key=tracker_key(), rng=random.Random(9)
    )
    assert planner.plan(peers[0], INFOHASH, [bad_source], 1) == []
    # Paths through it as a relay fail too; the others are planned as usual.
    plans = planner.plan(peers[0], INFOHASH, [bad_source, *peers[8:20]], 4)
    assert len(plans) == 4
    for plan in plans:
        assert bad_source not in follow(plan, peers[0], graph, by_pub)[0]


def test_sources_near_the_downloader_come_first():
    """In a big graph with few sources, the ones a path can reach (within max relays + 1
    hops) are tried first, nearest first, and the search stops once it has enough."""
    graph = PeerGraph(rng=random.Random(4), edge_settle=0)
    for p in range(3000):
        graph.add_peer(p)
    rng = random.Random(5)
    swarm = Swarm()
    for p in rng.sample(range(3000), 30):  # 1 % seeds
        swarm.set(p, SwarmRow(0))
    planner = Planner(
        graph, WeightedPolicy(), X25519Suite(), lambda p: None, tracker_key=tracker_key(), rng=rng
    )
    checked = 0
    for downloader in range(0, 3000, 150):
        reach = graph.within(downloader, 3, 10**6)
        near = [p for p in reach if swarm.is_source(p) and p != downloader]
        sources = planner.sources(downloader, swarm, 1, 3)
        assert downloader not in sources and len(set(sources)) == len(sources)
        assert all(swarm.is_source(p) for p in sources)
        if near:
            checked += 1
            first = min(reach[p] for p in near)
            assert reach[sources[0]] == first  # the nearest distance with a source
    assert checked >= 5
    # The search stops after the first distance where it found enough.
    hub = 0
    found = graph.nearest(hub, 4, 10**6, set(graph), 3)
    assert len(found) == 3 and set(found) <= set(graph.neighbours(hub))


def test_a_source_tag_names_its_source_only_for_its_downloader_torrent_and_hour() -> None:
    """What a downloader hands back in ``avoid`` is read only by the tracker that sealed
    it, for the downloader and torrent it was sealed for, within SOURCE_TAG_TTL."""
    now = [1_000_000.0]
    tags = SourceTags(lambda: now[0])
    ih, other_ih = b"\x01" * 20, b"\x02" * 20
    tag = tags.seal(5, ih, 42)
    assert tags.open(5, ih, [tag]) == {42}
    assert tags.seal(5, ih, 42) != tag  # two tags of one source look unrelated
    assert tags.open(6, ih, [tag]) == frozenset()  # another downloader's
    assert tags.open(5, other_ih, [tag]) == frozenset()  # another torrent
    assert SourceTags(lambda: now[0]).open(5, ih, [tag]) == frozenset()  # another tracker
    for flipped in (0, 12, len(tag) - 1):  # the nonce, the body, the MAC
        forged = bytearray(tag)
        forged[flipped] ^= 1
        assert tags.open(5, ih, [bytes(forged)]) == frozenset()
    assert tags.open(5, ih, [b"x" * len(tag), tag, tags.seal(5, ih, 7)]) == {42, 7}
    now[0] += SOURCE_TAG_TTL + 1
    assert tags.open(5, ih, [tag]) == frozenset()
