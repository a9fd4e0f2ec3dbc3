"""Tracker server and client over real TLS on loopback."""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
from typing import Any

import gevent
import nacl.signing
import pytest
from gevent.pywsgi import WSGIServer

from anomos import bencode
from anomos.errors import ConfigError, TrackerError
from anomos.identity import PeerIdentity
from anomos.protocol.onion import OnionReader
from anomos.protocol.request import open_request
from anomos.testing import loopback_host, start_peers
from anomos.tracker import client as client_mod
from anomos.tracker import persistence as persistence_mod
from anomos.tracker import server as server_mod
from anomos.tracker.client import (
    LostNeighbour,
    TorrentStatus,
    TrackerClient,
    signed_body,
    signed_message,
)
from anomos.tracker.identity import TrackerIdentity, pinned_context
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

IH = bytes(range(20))
SIZE = 10_000


@pytest.fixture
def tracker(tmp_path, plugins):
    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    t.start()
    yield t
    t.stop()


class Peer:
    """A peer identity on its own loopback address, with a client for the tracker."""

    def __init__(self, tracker: Tracker, **kw) -> None:
        self.identity = PeerIdentity.generate()
        self.host = loopback_host()
        self.address = f"{self.host}:7000"
        self.client = TrackerClient(
            tracker.url, tracker.fingerprint, self.identity, source_host=self.host, **kw
        )

    @property
    def pub(self) -> bytes:
        return self.identity.identity_public

    def announce(self, left=None, relayed=0, uploaded=0, downloaded=0, **kw):
        torrents = [] if left is None else [TorrentStatus(IH, uploaded, downloaded, left)]
        return self.client.announce(self.address, torrents, relayed, **kw)


def announce_fields(p, **changes):
    """The fields of a minimal valid announce by ``p``, with ``changes``."""
    inner = {
        "time": int(time.time()),
        "session": b"s",
        "onion": p.identity.onion_public,
        "box": p.identity.box_public,
        "address": p.address,
        "torrents": [],
        "relayed": 0,
        "stopped": 0,
    }
    inner.update(changes)
    return inner


def raw_post(tracker: Tracker, path: str, body: bytes, headers=None):
    """POST ``body`` as is; (status, decoded reply)."""
    host, port = tracker.address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=pinned_context(), timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, bencode.decode(resp.read())
    finally:
        conn.close()


def test_announce_gives_consistent_neighbours(tracker):
    peers = [Peer(tracker) for _ in range(8)]
    for p in peers:
        p.announce()
    replies = {p.pub: p.announce() for p in peers}
    addresses = {p.pub: p.address for p in peers}
    for p in peers:
        reply = replies[p.pub]
        assert 4 <= len(reply.neighbours) <= 6
        assert reply.interval == server_mod.ANNOUNCE_INTERVAL
        assert reply.min_interval == server_mod.MIN_INTERVAL
        assert reply.epoch > 0
        for n in reply.neighbours:
            assert n.address == addresses[n.identity]
            back = [m for m in replies[n.identity].neighbours if m.identity == p.pub]
            assert len(back) == 1, "neighbour relation is not symmetric"
            assert back[0].nid == n.nid
            assert back[0].dial != n.dial, "exactly one end dials"
        nids = [n.nid for n in reply.neighbours]
        assert len(set(nids)) == len(nids)


def source_of(tracker: Tracker, downloader: Peer, plan: Any, by_pub: dict[bytes, Any]) -> bytes:
    """The peer ``plan`` leads to, found as the relays would: peeling its tracking code."""
    g = tracker.graph
    at, code = g.peer_by_nid(downloader.pub, plan.first_nid), plan.tracking_code
    while True:
        peeled = OnionReader(by_pub[at].onion_private).peel(code)
        if peeled.next_nid is None:
            return at
        at, code = g.peer_by_nid(at, peeled.next_nid), peeled.forward_code


def swarm_of_seeds(tracker: Tracker, seeds: int, relays: int) -> tuple[list[Peer], list[Peer]]:
    """``seeds`` seeds of IH and ``relays`` relays, their neighbour lists settled."""
    have = [Peer(tracker) for _ in range(seeds)]
    others = [Peer(tracker) for _ in range(relays)]
    for _ in range(2):
        for p in have:
            p.announce(left=0)
        for p in others:
            p.announce()
    return have, others


def test_circuits_reach_a_source_without_revealing_it(tracker):
    seeds = [Peer(tracker) for _ in range(3)]
    relays = [Peer(tracker) for _ in range(6)]
    downloader = Peer(tracker)
    everyone = seeds + relays + [downloader]
    for p in seeds:
        p.announce(left=0)
    for p in relays:
        p.announce()
    downloader.announce(left=SIZE)
    for p in everyone:  # settle neighbour lists
        p.announce(left=0 if p in seeds else SIZE if p is downloader else None)
    plans = downloader.client.request_circuits(IH, 3)
    assert 1 <= len(plans) <= 3
    by_pub = {p.pub: p.identity for p in everyone}
    for plan in plans:
        at = source_of(tracker, downloader, plan, by_pub)
        assert at in {s.pub for s in seeds}
        trusted = {tracker.fingerprint}  # signed by the tracker the peers pin
        assert open_request(plan.request_blob, by_pub[at].box, trusted).material == plan.material
    # Nothing in the raw reply names a seed.
    inner = {b"time": int(time.time()), b"infohash": IH, b"count": 3}
    raw = bencode.encode(tracker.circuits(downloader.pub, inner))
    for s in seeds:
        assert s.pub not in raw and s.host.encode() not in raw
    stats = tracker.stats()
    assert stats["circuits_planned"] >= len(plans) and stats["torrents"] == 1


def test_a_source_a_downloader_avoids_is_not_planned_to_it_again(tracker):
    """A downloader hands back a plan's source tag (a source that lied to it): no later
    plan of that torrent leads there, while the tag tells it nothing (two tags of one
    source differ) and is worth nothing to another downloader."""
    seeds, relays = swarm_of_seeds(tracker, 3, 6)
    downloader, other = Peer(tracker), Peer(tracker)
    for _ in range(2):
        downloader.announce(left=SIZE)
        other.announce(left=SIZE)
    by_pub = {p.pub: p.identity for p in [*seeds, *relays, downloader, other]}

    def sources(peer: Peer, avoid: list[bytes], rounds: int = 4) -> list[tuple[bytes, bytes]]:
        plans = [p for _ in range(rounds) for p in peer.client.request_circuits(IH, 3, avoid)]
        return [(source_of(tracker, peer, plan, by_pub), plan.source_tag) for plan in plans]

    first = sources(downloader, [])
    assert {s for s, _ in first} == {s.pub for s in seeds}
    tags = [tag for _, tag in first]
    assert len(set(tags)) == len(tags) and {len(t) for t in tags} == {44}
    liar, liars_tag = first[0]
    assert {s for s, _ in sources(downloader, [liars_tag])} == {s.pub for s in seeds} - {liar}
    assert liar in {s for s, _ in sources(other, [liars_tag])}  # bound to its downloader
    assert sources(downloader, [tag for _, tag in first]) == []  # every seed avoided
    # At most client.MAX_AVOIDED tags, each 44 bytes: the client and the server refuse more.
    with pytest.raises(ConfigError, match="at most 16"):
        downloader.client.request_circuits(IH, 1, [liars_tag] * 17)
    for avoid in ([liars_tag] * 17, [liars_tag[:-1]], b"x" * 44, [7]):
        inner = {"time": int(time.time()), "infohash": IH, "count": 1, "avoid": avoid}
        body = signed_body(downloader.identity, "/circuits", inner, tracker.fingerprint)
        status, reply = raw_post(tracker, "/circuits", body)
        assert status == 400 and b"'avoid'" in reply[b"failure reason"], (avoid, reply)


def test_a_peer_without_sources_gets_no_circuits(tracker):
    a, b = Peer(tracker), Peer(tracker)
    a.announce(left=SIZE)
    b.announce(left=SIZE)  # nobody has anything yet
    assert a.client.request_circuits(IH, 2) == []


def test_wrong_fingerprint_is_refused_before_sending(tracker):
    other = TrackerIdentity.load_or_create(tracker.state_dir / "other").fingerprint
    p = Peer(tracker)
    p.client = TrackerClient(tracker.url, other, p.identity, source_host=p.host)
    with pytest.raises(TrackerError) as err:
        p.announce()
    assert str(err.value) == (
        f"tracker identity mismatch: expected {other}, got {tracker.fingerprint}"
    )
    assert tracker.announces == 0


def test_bad_signature_and_stolen_identity_are_refused(tracker):
    victim, thief = Peer(tracker), Peer(tracker)
    victim.announce()
    inner = bencode.encode(announce_fields(thief))
    # The thief signs correctly with its own key but claims the victim's identity.
    sig = thief.identity.signing.sign(signed_message(tracker.fingerprint, "/announce", inner))
    sig = sig.signature
    body = bencode.encode({"peer": victim.pub, "msg": inner, "sig": sig})
    status, reply = raw_post(tracker, "/announce", body)
    assert status == 403
    assert reply[b"failure reason"] == (
        b"bad signature: request not signed by the claimed peer for this tracker"
    )
    # A signature made for another endpoint does not carry over.
    sig = victim.identity.signing.sign(signed_message(tracker.fingerprint, "/circuits", inner))
    sig = sig.signature
    body = bencode.encode({"peer": victim.pub, "msg": inner, "sig": sig})
    assert raw_post(tracker, "/announce", body)[0] == 403
    assert tracker.peers[victim.pub].address == victim.address


def test_stale_requests_are_refused(tracker, monkeypatch):
    p = Peer(tracker)
    monkeypatch.setattr(client_mod.time, "time", lambda: 1_000_000.0)
    with pytest.raises(TrackerError, match="request time is more than 300 s off"):
        p.announce()


def test_oversize_and_malformed_requests(tracker):
    status, reply = raw_post(tracker, "/announce", b"x" * (server_mod.MAX_BODY + 1))
    assert status == 413 and b"over 65536 bytes" in reply[b"failure reason"]
    assert raw_post(tracker, "/announce", b"not bencode")[0] == 400
    assert raw_post(tracker, "/nowhere", b"de")[0] == 404
    p = Peer(tracker)
    body = signed_body(p.identity, "/announce", {"time": int(time.time())}, tracker.fingerprint)
    status, reply = raw_post(tracker, "/announce", body)
    assert status == 400 and reply[b"failure reason"] == b"missing field 'session'"


def test_circuits_need_an_announce_first(tracker):
    p = Peer(tracker)
    with pytest.raises(TrackerError, match="announce before requesting circuits"):
        p.client.request_circuits(IH, 1)
    with pytest.raises(ConfigError):
        p.client.request_circuits(IH, 9)


def nid_between(tracker: Tracker, reporter: Peer, sender: Peer) -> int:
    return tracker.graph.nid(reporter.pub, sender.pub)


def test_ratio_credits_relayed_bytes_its_neighbour_confirms(tracker):
    p, n = Peer(tracker), Peer(tracker)
    p.announce(left=SIZE, downloaded=500, relayed=1000)
    n.announce()
    n.announce(receipts={nid_between(tracker, n, p): 1200})  # n got 1200 link bytes from p
    reply = p.announce(left=SIZE, downloaded=500, relayed=1000)
    assert (reply.uploaded, reply.downloaded, reply.relayed) == (0, 500, 1000)
    assert reply.relayed_claimed == 1000
    assert reply.ratio == pytest.approx(2.0)  # (0 uploaded + 1000 relayed) / 500
    # Claiming more than the neighbour confirms: only the confirmed part counts.
    n.announce(receipts={nid_between(tracker, n, p): 1400})
    reply = p.announce(left=SIZE, downloaded=500, uploaded=100, relayed=1500)
    assert (reply.uploaded, reply.downloaded, reply.relayed) == (0, 500, 1400)
    assert (reply.uploaded_claimed, reply.relayed_claimed) == (100, 1500)
    assert reply.ratio == pytest.approx(1400 / 500)
    # Uploads are credited from what the receipts confirm beyond the relayed bytes.
    n.announce(receipts={nid_between(tracker, n, p): 1560})
    reply = p.announce(left=SIZE, downloaded=500, uploaded=100, relayed=1500)
    assert (reply.uploaded, reply.relayed) == (60, 1500)
    assert reply.ratio == pytest.approx(1560 / 500)
    # Leaving and coming back in the same session credits nothing twice.
    p.announce(stopped=True, left=SIZE, downloaded=500, uploaded=100, relayed=1500)
    reply = p.announce(left=SIZE, downloaded=600, uploaded=100, relayed=1500)
    assert (reply.uploaded_claimed, reply.downloaded, reply.relayed_claimed) == (100, 600, 1500)
    # A restarted peer (new session) starts its counters from zero again.
    p.client = TrackerClient(tracker.url, tracker.fingerprint, p.identity, source_host=p.host)
    reply = p.announce(left=SIZE, downloaded=100, relayed=200)
    assert (reply.downloaded, reply.relayed_claimed, reply.relayed) == (700, 1700, 1560)


def test_min_ratio_refuses_circuits_past_the_grace_until_relaying_earns_them(tmp_path, plugins):
    t = Tracker(
        tmp_path / "t",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(edge_settle=0, min_ratio=0.5, ratio_grace=1000),
    )
    t.start()
    try:
        p, n = Peer(t), Peer(t)
        p.announce(left=SIZE, downloaded=800)
        n.announce()
        assert p.client.request_circuits(IH, 1) == []  # within the grace: asked, no seeds
        p.announce(left=SIZE, downloaded=4000)
        with pytest.raises(TrackerError, match=r"share ratio 0\.00 is below .* minimum 0\.5"):
            p.client.request_circuits(IH, 1)
        # Relaying for others, confirmed by a neighbour, earns circuits back.
        n.announce(receipts={nid_between(t, n, p): 2500})
        reply = p.announce(left=SIZE, downloaded=4000, relayed=2500)
        assert reply.ratio == pytest.approx(2500 / 4000)
        assert p.client.request_circuits(IH, 1) == []
        with pytest.raises(ConfigError, match="--min-ratio 50"):
            Tracker(tmp_path / "u", "127.0.0.1:0", plugins, TrackerSettings(min_ratio=50))
    finally:
        t.stop()


def test_a_claim_without_receipts_is_not_credited(tracker):
    p, n = Peer(tracker), Peer(tracker)
    p.announce(left=SIZE, downloaded=500, relayed=5000)
    n.announce()  # a neighbour that confirms nothing
    reply = p.announce(left=SIZE, downloaded=500, relayed=5000)
    assert (reply.relayed, reply.relayed_claimed) == (0, 5000)
    assert reply.ratio == 0.0
    # Bytes confirmed without a claim (n's own traffic to p) are not credited either.
    p.announce(left=SIZE, downloaded=500, relayed=5000, receipts={nid_between(tracker, p, n): 900})
    assert n.announce().relayed == 0
    assert tracker.accounts[n.pub].relayed_confirmed == 900


def test_a_neighbours_session_restart_does_not_double_count(tracker):
    p, n = Peer(tracker), Peer(tracker)
    p.announce(relayed=10_000)
    n.announce()
    nid = nid_between(tracker, n, p)
    n.announce(receipts={nid: 800})
    n.announce(receipts={nid: 800})  # the same cumulative total: nothing new
    assert tracker.accounts[p.pub].relayed_confirmed == 800
    # n restarts: a new session whose counters start from zero.
    n.client = TrackerClient(tracker.url, tracker.fingerprint, n.identity, source_host=n.host)
    n.announce(receipts={nid: 900})
    assert tracker.accounts[p.pub].relayed_confirmed == 800 + 900
    n.announce(receipts={nid: 1100})
    reply = p.announce(relayed=10_000)
    assert (reply.relayed, reply.relayed_claimed) == (1900, 10_000)


def test_receipts_for_nids_that_are_not_the_reporters_neighbours_credit_nobody(tracker):
    peers = [Peer(tracker) for _ in range(10)]
    for p in peers:
        p.announce(relayed=1000)
    reporter = peers[0]
    own = {tracker.graph.nid(reporter.pub, n) for n in tracker.graph.neighbours(reporter.pub)}
    foreign = [
        e.nid for e in tracker.graph.edges() if reporter.pub not in (e.a, e.b) and e.nid not in own
    ]
    unused = max(e.nid for e in tracker.graph.edges()) + 1
    assert foreign and unused not in own
    reporter.announce(receipts={foreign[0]: 1000, unused: 1000})
    assert all(a.relayed_confirmed == 0 for a in tracker.accounts.values())
    for p in peers:
        assert p.announce(relayed=1000).relayed == 0


def test_receipts_are_bounded_and_checked(tracker):
    p = Peer(tracker)
    p.announce()

    def refusal(receipts):
        inner = announce_fields(p, receipts=receipts)
        status, reply = raw_post(
            tracker, "/announce", signed_body(p.identity, "/announce", inner, tracker.fingerprint)
        )
        assert status == 400
        return reply[b"failure reason"].decode()

    too_many = [{"nid": i, "received": 1} for i in range(1, client_mod.MAX_NEIGHBOURS + 2)]
    assert refusal(too_many) == "field 'receipts' must be a list of at most 64"
    assert refusal([{"nid": 0, "received": 1}]) == "field 'nid' must be an integer in 1..4294967295"
    assert refusal([{"nid": 1, "received": -1}]).startswith("field 'received' must be an integer")
    assert refusal([b"x"]) == "each receipt must be a dict"
    with pytest.raises(ConfigError, match="65 receipts: an announce carries at most 64"):
        p.announce(receipts={i: 1 for i in range(1, 66)})


def test_peers_confirm_what_their_links_carried(tmp_path, plugins):
    """Real peers: each announce carries the cells a circuit carried over each link (not
    keepalives), and a peer's claim is credited only up to what its neighbour confirmed."""
    from test_limits import plan

    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    t.start()
    nodes = []
    try:
        nodes = start_peers(plugins, t, tmp_path, 2)
        a, b = nodes
        nid = t.graph.nid(a.identity.identity_public, b.identity.identity_public)

        def sink(stream):
            while stream.recv(65536):
                pass
            stream.close()

        b.switch.on_request = lambda request: sink
        a.links.wait_for(nid, 10)
        assert a.links.receipts().get(nid, 0) == b.links.receipts().get(nid, 0) == 0
        stream = a.switch.open_circuit(plan(t, [a, b]), timeout=10)
        stream.sendall(b"x" * 3_000_000)  # b acknowledges with SENDMEs: cells back to a
        with gevent.Timeout(10, AssertionError("the circuit never carried anything")):
            while not (b.links.receipts().get(nid, 0) >= 3_000_000 and a.links.receipts()[nid]):
                gevent.sleep(0.05)
        stream.close()
        a.switch._relayed = 10**12  # a claims far more than it ever sent
        b.announce()
        confirmed = t.accounts[a.identity.identity_public].relayed_confirmed
        assert 0 < confirmed <= b.links.receipts()[nid]
        reply = a.announce()
        assert reply.relayed_claimed == 10**12
        assert (
            reply.relayed == t.accounts[a.identity.identity_public].relayed_confirmed >= confirmed
        )
        assert b.announce().relayed == 0  # b relayed nothing: nothing claimed, nothing credited
    finally:
        for node in nodes:
            node.stop()
        t.stop()


def test_stopped_peers_and_torrents_leave(tracker):
    peers = [Peer(tracker) for _ in range(7)]
    for p in peers:
        p.announce(left=0)
    leaver = peers[0]
    assert leaver.announce(stopped=True).neighbours == ()
    assert leaver.pub not in tracker.graph and leaver.pub not in tracker.swarms[IH]
    for p in peers[1:]:
        reply = p.announce(left=0)
        assert leaver.pub not in {n.identity for n in reply.neighbours}
        assert len(reply.neighbours) >= 4
    peers[1].client.announce(peers[1].address, [TorrentStatus(IH, 0, 0, 0, "stopped")], 0)
    assert peers[1].pub not in tracker.swarms[IH]
    peers[2].announce()  # no longer lists the torrent
    assert peers[2].pub not in tracker.swarms[IH]


@pytest.fixture
def settled_net(tmp_path, plugins):
    """A tracker with a seeded graph and ten peers that all know their neighbours."""
    t = Tracker(
        tmp_path / "tracker",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(edge_settle=0),
        rng=random.Random(7),
    )
    t.start()
    peers = [Peer(t) for _ in range(10)]
    for _ in range(2):
        for p in peers:
            p.announce()
    yield t, peers
    t.stop()


def stored_edges(tracker):
    tracker.flush()
    snap = tracker.store.load()
    by_id = dict(zip(snap.seqs, snap.identities, strict=True))
    return {(frozenset((by_id[a], by_id[b])), nid) for a, b, nid, _ in tracker.store.links()}


def graph_edges(tracker):
    return {(frozenset((e.a, e.b)), e.nid) for e in tracker.graph.edges()}


def test_an_unreachable_neighbour_is_replaced_not_dropped(settled_net):
    tracker, peers = settled_net
    g = tracker.graph
    by_pub = {p.pub: p for p in peers}
    reporter = peers[0]
    victim = by_pub[next(iter(g.neighbours(reporter.pub)))]
    nid = g.nid(reporter.pub, victim.pub)
    victim.announce()  # alive and announcing: a "lost" report about it would be void
    reply = reporter.announce(lost=[LostNeighbour(nid, 0, "unreachable")])
    # The edge is gone, the reporter got the minimum back in this very reply ...
    mine = {n.identity for n in reply.neighbours}
    assert victim.pub not in mine and mine == set(g.neighbours(reporter.pub))
    assert len(mine) >= g.min_neighbours
    assert reply.interval == tracker.interval  # nothing pending: no early recheck
    # ... and the neighbour is not suspected: still in, not dropped, no lost report.
    assert victim.pub in tracker.peers and victim.pub in g
    assert tracker.stats()["dropped"] == 0 and victim.pub not in tracker._lost_reports
    theirs = victim.announce()
    assert reporter.pub not in {n.identity for n in theirs.neighbours}
    assert len(theirs.neighbours) >= g.min_neighbours
    assert g.avoided(reporter.pub, victim.pub)
    # The removal and the new edges went through the normal batch.
    assert stored_edges(tracker) == graph_edges(tracker)


def test_unreachable_reports_beyond_the_per_announce_cap_are_ignored(settled_net, monkeypatch):
    tracker, peers = settled_net
    g = tracker.graph
    reporter = peers[0]
    replaced = []
    replace_edge = g.replace_edge

    def spy(a, b):
        replaced.append((a, b))
        return replace_edge(a, b)

    monkeypatch.setattr(g, "replace_edge", spy)
    cap = server_mod.UNREACHABLE_PER_ANNOUNCE
    nbrs = list(g.neighbours(reporter.pub))[: cap + 1]
    assert len(nbrs) == cap + 1
    lost = [LostNeighbour(g.nid(reporter.pub, n), 0, "unreachable") for n in nbrs]
    reply = reporter.announce(lost=lost)
    assert replaced == [(reporter.pub, n) for n in nbrs[:cap]]
    mine = {n.identity for n in reply.neighbours}
    assert not mine & set(nbrs[:cap])
    assert nbrs[cap] in mine  # over the cap: kept
    assert all(n in tracker.peers for n in nbrs)
    # The next announce may report it again.
    reporter.announce(lost=[LostNeighbour(g.nid(reporter.pub, nbrs[cap]), 0, "unreachable")])
    assert nbrs[cap] not in set(g.neighbours(reporter.pub))
    assert stored_edges(tracker) == graph_edges(tracker)


def test_an_unreachable_report_for_a_nid_that_is_not_the_reporters_is_ignored(settled_net):
    tracker, peers = settled_net
    g = tracker.graph
    reporter = peers[0]
    mine = set(g.neighbours(reporter.pub))
    # An edge elsewhere in the graph whose NID the reporter does not use itself.
    foreign = next(
        e
        for e in g.edges()
        if reporter.pub not in (e.a, e.b) and g.peer_by_nid(reporter.pub, e.nid) is None
    )
    unused = next(n for n in range(1, 1000) if g.peer_by_nid(reporter.pub, n) is None)
    before = graph_edges(tracker)
    reply = reporter.announce(
        lost=[
            LostNeighbour(unused, 0, "unreachable"),
            LostNeighbour(foreign.nid, 0, "unreachable"),
        ]
    )
    assert graph_edges(tracker) == before
    assert {n.identity for n in reply.neighbours} == mine
    assert not any(g.avoided(reporter.pub, p.pub) for p in peers)
    with pytest.raises(TrackerError, match="must be one of lost, protocol, unreachable"):
        reporter.announce(lost=[LostNeighbour(1, 0, "far away")])


def test_silent_peers_expire_and_neighbours_are_repaired(tmp_path, plugins):
    now = [time.time()]
    t = Tracker(
        tmp_path / "t", "127.0.0.1:0", plugins, TrackerSettings(interval=10), clock=lambda: now[0]
    )
    t.start()
    try:
        peers = [Peer(t) for _ in range(12)]
        for p in peers:
            p.announce(relayed=100)
        now[0] += 25
        for p in peers[6:]:
            p.announce(relayed=100)
        now[0] += 10  # peers[:6] last seen 35 s ago: over 3 intervals
        assert t.expire() == 6
        assert set(t.graph) == {p.pub for p in peers[6:]}
        for p in peers[6:]:
            assert t.graph.degree(p.pub) >= 4
        # Back after the blip, same session and counters: nothing is credited twice.
        reply = peers[0].announce(relayed=100)
        assert peers[0].pub in t.graph and reply.relayed_claimed == 100
    finally:
        t.stop()


def test_stats_are_counts_without_addresses(tracker):
    p = Peer(tracker)
    p.announce(left=0)
    host, port = tracker.address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=pinned_context(), timeout=10)
    conn.request("GET", "/stats")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200
    stats = json.loads(body)
    assert stats["peers"] == 1 and stats["torrents"] == 1 and stats["announces"] == 1
    assert p.host.encode() not in body and p.pub.hex().encode() not in body


def test_rate_limit_per_client_ip(tmp_path, plugins):
    t = Tracker(tmp_path / "t", "127.0.0.1:0", plugins, TrackerSettings(rate=0.001, burst=2))
    t.start()
    try:
        p, q = Peer(t), Peer(t)
        p.announce()
        p.announce()
        with pytest.raises(TrackerError, match="too many requests"):
            p.announce()
        q.announce()  # another address has its own bucket
    finally:
        t.stop()


def test_shared_client_address_is_limited_per_identity(tmp_path, plugins):
    """Behind an onion service every peer arrives from tor's address: each identity then
    has its own bucket, so one busy peer cannot lock the others out."""
    host = loopback_host()
    t = Tracker(
        tmp_path / "t",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(rate=0.001, burst=2, shared_clients=[host]),
    )
    t.start()
    try:
        p, q = Peer(t), Peer(t)
        p.client.source_host = q.client.source_host = host  # both come from "tor"
        p.announce()
        p.announce()
        with pytest.raises(TrackerError, match="too many requests"):
            p.announce()
        q.announce()  # same address, another identity: its own bucket
        q.announce()
    finally:
        t.stop()


def test_lifecycle_events(tmp_path, plugins):
    from anomos import hookimpl

    seen = []

    class Watcher:
        @hookimpl
        def anomos_tracker_started(self, tracker):
            seen.append(("started", tracker.url))

        @hookimpl
        def anomos_tracker_stopped(self, tracker):
            seen.append(("stopped", tracker.url))

    plugins.pm.register(Watcher())
    t = Tracker(tmp_path / "t", "127.0.0.1:0", plugins)
    t.start()
    t.stop()
    assert seen == [("started", t.url), ("stopped", t.url)]


# ----------------------------------------------------------------- client vs a bad tracker


@pytest.fixture
def fake_tracker(tmp_path):
    """A pinned TLS server whose answer a test chooses."""
    ident = TrackerIdentity.load_or_create(tmp_path / "fake")
    box = {"status": "200 OK", "body": b""}

    def app(environ, start_response):
        start_response(box["status"], [("Content-Length", str(len(box["body"])))])
        return [box["body"]]

    server = WSGIServer(
        ("127.0.0.1", 0), app, log=None, error_log=None, ssl_context=ident.server_context()
    )
    server.start()
    url = f"https://127.0.0.1:{server.server_port}/announce"
    client = TrackerClient(url, ident.fingerprint, PeerIdentity.generate(), timeout=5)
    yield box, client
    server.stop()


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        ("200 OK", b"x" * (client_mod.MAX_REPLY + 10), "reply over"),
        ("200 OK", b"garbage", "not a bencoded dict"),
        ("200 OK", b"d10:neighbourslee", "malformed announce reply: missing key b'epoch'"),
        ("403 Forbidden", b"d14:failure reason7:go awaye", "refused announce: go away"),
        ("502 Bad Gateway", b"", "answered HTTP 502"),
    ],
)
def test_client_turns_bad_replies_into_one_line_errors(fake_tracker, status, body, message):
    box, client = fake_tracker
    box.update(status=status, body=body)
    with pytest.raises(TrackerError, match=message) as err:
        client.announce("127.0.0.1:7000", [], 0)
    assert "\n" not in str(err.value)


def test_client_times_out_on_a_silent_tracker(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fp = TrackerIdentity.load_or_create(tmp_path / "x").fingerprint
    client = TrackerClient(
        f"https://127.0.0.1:{port}/announce", fp, PeerIdentity.generate(), timeout=0.5
    )
    try:
        with gevent.Timeout(10), pytest.raises(TrackerError, match="timed out"):
            client.announce("127.0.0.1:7000", [], 0)
    finally:
        listener.close()


def test_client_refuses_bad_urls_and_fingerprints():
    ident = PeerIdentity.generate()
    with pytest.raises(ConfigError, match="is not https://"):
        TrackerClient("http://x:1/announce", "00" * 32, ident)
    with pytest.raises(ConfigError, match="not 64 hex digits"):
        TrackerClient("https://x:1/announce", "abc", ident)


def test_signature_covers_context_tracker_path_and_message():
    ident = PeerIdentity.generate()
    fingerprint = "ab" * 32
    outer = bencode.decode(signed_body(ident, "/announce", {"time": 1}, fingerprint))
    nacl.signing.VerifyKey(outer[b"peer"]).verify(
        b"anomos-tracker-v2" + bytes.fromhex(fingerprint) + b"/announce" + outer[b"msg"],
        outer[b"sig"],
    )


def test_sources_near_the_downloader_are_found_in_a_big_sparse_graph(tmp_path, plugins):
    """With 1 relay only peers within 2 hops are reachable (~37 of 2000): blind sampling
    of 16 sources would rarely find one, so the tracker also looks around the downloader."""
    t = Tracker(
        tmp_path / "t",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(min_relays=1, max_relays=1, edge_settle=0),
    )
    keys = PeerIdentity.generate()
    pubs = [bytes([i >> 8, i & 255]) * 16 for i in range(2000)]
    for i, pub in enumerate(pubs * 2):  # twice, so both ends of every edge know it
        inner = {
            b"time": int(time.time()),
            b"session": b"s",
            b"onion": keys.onion_public,
            b"box": keys.box_public,
            b"address": f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}:7000".encode(),
            b"relayed": 0,
            b"stopped": 0,
            b"torrents": [
                {
                    b"infohash": IH,
                    b"uploaded": 0,
                    b"downloaded": 0,
                    b"left": 0 if pub[1] % 2 else SIZE,
                    b"event": b"",
                }
            ],
        }
        t.announce(pub, inner)
    try:
        got = [
            len(t.circuits(downloader, {b"infohash": IH, b"count": 4})[b"circuits"])
            for downloader in pubs[:40:2]
        ]
        # A random graph may leave a downloader with fewer than 4 sources within 2
        # hops (seen in CI: one with 3; 70 of 80 overall once); blind sampling
        # would find next to none.
        assert min(got) >= 1 and sum(got) >= 0.75 * 4 * len(got), got
    finally:
        t.stop()


@pytest.mark.parametrize("key", ["onion", "box"])
def test_low_order_keys_are_refused(tracker, key):
    """A low-order X25519 key would make every circuit through the peer fail to build."""
    p = Peer(tracker)
    inner = announce_fields(p, **{key: bytes(32)})
    status, reply = raw_post(
        tracker, "/announce", signed_body(p.identity, "/announce", inner, tracker.fingerprint)
    )
    assert status == 400
    assert reply[b"failure reason"] == f"field {key!r} is not a usable X25519 public key".encode()
    assert p.pub not in tracker.peers


def test_low_order_x25519_keys_are_found_by_comparison():
    """The comparison list is exactly what the scalar multiplication would refuse:
    every listed point (top bit set or not) gives an all-zero secret, random keys do not."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    probe = X25519PrivateKey.generate()

    def refused_by_exchange(key: bytes) -> bool:
        try:
            probe.exchange(X25519PublicKey.from_public_bytes(key))
        except ValueError:
            return True
        return False

    listed = [u.to_bytes(32, "little") for u in server_mod.LOW_ORDER_X25519]
    for key in listed + [k[:31] + bytes([k[31] | 0x80]) for k in listed]:
        assert server_mod.low_order_x25519(key) and refused_by_exchange(key), key.hex()
    rng = random.Random(7)
    for _ in range(300):
        key = rng.randbytes(32)
        assert server_mod.low_order_x25519(key) == refused_by_exchange(key) is False
    # A real key is never of small order.
    assert not server_mod.low_order_x25519(PeerIdentity.generate().onion_public)


def test_the_state_is_frozen_once_the_peer_count_moved_enough(tmp_path, plugins, monkeypatch):
    """A full garbage collection walks what was made since the last gc.freeze(): a burst
    of joins must bring the next freeze forward, not wait for FREEZE_INTERVAL."""
    frozen = []
    monkeypatch.setattr(persistence_mod, "FLUSH_INTERVAL", 0.01)
    monkeypatch.setattr(persistence_mod, "FREEZE_PEERS", 20)
    monkeypatch.setattr(persistence_mod, "freeze", lambda: frozen.append(time.monotonic()))
    settings = TrackerSettings(edge_settle=0, rate=1e9, burst=1e9)
    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, settings)
    t.start()
    gevent.sleep(0.05)  # the flush loop starts counting
    frozen.clear()  # the restore's own freeze
    try:
        inner = {
            b"session": b"s",
            b"onion": PeerIdentity.generate().onion_public,
            b"box": PeerIdentity.generate().box_public,
            b"address": b"10.0.0.1:1",
            b"torrents": [],
            b"relayed": 0,
            b"stopped": 0,
        }
        for _ in range(19):
            t.announce(PeerIdentity.generate().identity_public, dict(inner))
        gevent.sleep(0.1)
        assert not frozen  # 19 new peers: not yet
        t.announce(PeerIdentity.generate().identity_public, dict(inner))
        deadline = time.monotonic() + 10
        while not frozen and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert len(frozen) == 1
    finally:
        t.stop()
