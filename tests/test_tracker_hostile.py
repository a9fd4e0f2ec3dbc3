"""Hostile parties against a real tracker over HTTPS on loopback (issue 11, items 6, 7, 9).

Each test performs the attack the adversarial review ran, with the real
client or raw signed requests, and checks that the tracker refuses it.
"""

from __future__ import annotations

import http.client
import io
import itertools
import os
import time

import pytest

from anomos import bencode
from anomos.bench.enumeration import enumerate_membership
from anomos.errors import TrackerError
from anomos.identity import PeerIdentity
from anomos.tracker.client import LostNeighbour, TorrentStatus, TrackerClient
from anomos.tracker.identity import pinned_context
from anomos.tracker.limits import LimitSettings
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

IH = bytes(range(20))
#: A /16 of loopback for this test process; each test picks /24s inside it.
_BLOCK = 20 + os.getpid() % 200
_subnets = itertools.count(100)


def subnet() -> str:
    """A fresh loopback /24 (its first three octets) for one party of a test."""
    return f"127.{_BLOCK}.{next(_subnets) % 250}"


@pytest.fixture
def tracker(tmp_path, plugins):
    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    t.start()
    yield t
    t.stop()


def raw_post(tracker: Tracker, path: str, body: bytes, source: str = "127.0.0.1"):
    """POST ``body`` as is from ``source``; (status, failure reason or None)."""
    host, port = tracker.address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(
        host, int(port), context=pinned_context(), timeout=10, source_address=(source, 0)
    )
    try:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        reply = bencode.decode(resp.read())
        return resp.status, reply.get(b"failure reason")
    finally:
        conn.close()


def client(tracker: Tracker, host: str, identity: PeerIdentity | None = None) -> TrackerClient:
    ident = identity or PeerIdentity.generate()
    return TrackerClient(tracker.url, tracker.fingerprint, ident, source_host=host)


def record_bodies(tracker: Tracker) -> list[bytes]:
    """Make ``tracker`` (not yet started) keep every request body it is sent: a hostile
    tracker, or anyone who captured the requests."""
    bodies: list[bytes] = []
    serve = tracker.wsgi

    def recording(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        bodies.append(body)
        environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
        return serve(environ, start_response)

    tracker.wsgi = recording  # type: ignore[method-assign]
    return bodies


# ---------------------------------------------------------------------------- item 9


def test_a_stopped_announce_made_for_one_tracker_cannot_drop_the_peer_from_another(
    tmp_path, plugins
):
    """Tracker A replays a peer's signed `stopped` announce to tracker B: B keeps the peer."""
    a = Tracker(tmp_path / "a", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    b = Tracker(tmp_path / "b", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    captured = record_bodies(a)
    a.start()
    b.start()
    try:
        host = f"{subnet()}.2"
        ident = PeerIdentity.generate()
        to_a, to_b = client(a, host, ident), client(b, host, ident)
        to_a.announce(f"{host}:7000", [], 0)
        to_b.announce(f"{host}:7000", [], 0)
        to_a.announce(f"{host}:7000", [], 0, stopped=True)
        assert ident.identity_public not in a.peers
        status, reason = raw_post(b, "/announce", captured[-1])
        assert status == 403, reason
        assert reason == b"bad signature: request not signed by the claimed peer for this tracker"
        assert ident.identity_public in b.peers
    finally:
        a.stop()
        b.stop()


def test_a_captured_request_is_refused_when_played_again(tmp_path, plugins):
    """A peer leaves and comes back; its captured `stopped` announce, played again, no
    longer drops it, and a captured circuit request is not served twice."""
    t = Tracker(tmp_path / "t", "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    captured = record_bodies(t)
    t.start()
    try:
        host = f"{subnet()}.2"
        peer = client(t, host)
        me = peer.identity.identity_public
        peer.announce(f"{host}:7000", [], 0, stopped=True)
        goodbye = captured[-1]
        peer.announce(f"{host}:7000", [TorrentStatus(IH, 0, 0, 5)], 0)
        assert me in t.peers
        status, reason = raw_post(t, "/announce", goodbye)
        assert (status, reason) == (403, b"request replayed: this signed request was seen already")
        assert me in t.peers
        peer.request_circuits(IH, 2)
        status, reason = raw_post(t, "/circuits", captured[-1])
        assert status == 403 and reason.startswith(b"request replayed")
    finally:
        t.stop()


# ---------------------------------------------------------------------------- item 6


def honest_network(t: Tracker, n: int) -> dict[bytes, str]:
    """``n`` peers announced over HTTPS, each from its own /24; identity -> address."""
    members = {}
    for _ in range(n):
        host = f"{subnet()}.2"
        peer = client(t, host)
        peer.announce(f"{host}:7000", [], 0)
        members[peer.identity.identity_public] = f"{host}:7000"
    return members


def test_throwaway_identities_from_one_network_are_limited(tracker):
    """The review's attack: a fresh identity per announce, from one network, each
    learning 4-6 neighbours. Past the network's join allowance (16 back to back,
    then one a minute) the tracker answers 429 and names no one."""
    members = honest_network(tracker, 30)
    net = subnet()
    learned: set[str] = set()
    joined = refused = 0
    started = time.monotonic()
    for i in range(40):
        host = f"{net}.{2 + i % 4}"  # four addresses of one /24
        try:
            reply = client(tracker, host).announce(f"{host}:7000", [], 0)
        except TrackerError as exc:
            assert f"too many new peers from {net}.0/24" in str(exc)
            refused += 1
            continue
        joined += 1
        learned |= {n.address for n in reply.neighbours}
    settings = LimitSettings()
    refilled = (time.monotonic() - started) // settings.join_every
    assert settings.join_burst <= joined <= settings.join_burst + refilled
    assert refused == 40 - joined
    assert len(learned & set(members.values())) < len(members)
    # Another network is not held back by this one.
    other = f"{subnet()}.2"
    assert client(tracker, other).announce(f"{other}:7000", [], 0).neighbours


def test_one_identity_reporting_unreachable_neighbours_learns_few(tracker):
    """The review's second attack: one identity reports its neighbours `unreachable`
    again and again and is given new ones each time. Only `replace_burst` of its
    reports replace an edge; the rest are ignored."""
    members = honest_network(tracker, 40)
    host = f"{subnet()}.2"
    spy = client(tracker, host)
    reply = spy.announce(f"{host}:7000", [], 0)
    learned = {n.identity for n in reply.neighbours}
    first = len(learned)
    for _ in range(7):  # the first announce and these fit in the announce burst
        lost = [LostNeighbour(n.nid, 0, "unreachable") for n in reply.neighbours[:2]]
        reply = spy.announce(f"{host}:7000", [], 0, lost=lost)
        learned |= {n.identity for n in reply.neighbours}
    assert learned <= set(members)
    assert len(learned) <= first + LimitSettings().replace_burst


def test_identities_of_one_network_share_a_replacement_allowance(tracker):
    """Many identities (within the join allowance) each reporting neighbours
    `unreachable`: together they get `network_replace_burst` edges replaced, not
    `replace_burst` each."""
    honest_network(tracker, 50)
    net = subnet()
    spies = []
    # The network's allowance may start refilling from its first join: count from there.
    started = time.monotonic()
    for i in range(8):
        host = f"{net}.{2 + i}"
        spy = client(tracker, host)
        spies.append([spy, host, spy.announce(f"{host}:7000", [], 0)])
    removed: set[frozenset[bytes]] = set()  # edges taken away, each counted once
    # Count the replacements the tracker grants (edges can also vanish from a spy's
    # list when the graph rewires around a replacement made for another spy).
    granted = []
    on_unreachable = tracker._on_unreachable

    def counted(*args, **kwargs):
        granted.append(args[:2])
        return on_unreachable(*args, **kwargs)

    tracker._on_unreachable = counted
    for _ in range(2):  # 8 identities x 2 announces x 2 reports: 32 asked for
        for entry in spies:
            spy, host, reply = entry
            reported = reply.neighbours[:2]
            lost = [LostNeighbour(n.nid, 0, "unreachable") for n in reported]
            entry[2] = spy.announce(f"{host}:7000", [], 0, lost=lost)
            still = {n.identity for n in entry[2].neighbours}
            me = spy.identity.identity_public
            removed |= {frozenset((me, n.identity)) for n in reported if n.identity not in still}
    settings = LimitSettings()
    refilled = (time.monotonic() - started) // settings.network_replace_every
    assert removed, "no report replaced anything"
    assert 0 < len(granted) <= settings.network_replace_burst + refilled
    assert settings.network_replace_burst < 8 * settings.replace_burst


def test_announcing_faster_than_min_interval_is_refused(tracker):
    """min_interval is enforced per identity (on average: a burst of 8, then one per
    min_interval); a goodbye is never refused."""
    host = f"{subnet()}.2"
    peer = client(tracker, host)
    done = 0
    with pytest.raises(TrackerError, match="announcing too often: at most one per 5 s"):
        for done in range(1, 30):  # noqa: B007
            peer.announce(f"{host}:7000", [], 0)
    assert done > LimitSettings().announce_burst
    peer.announce(f"{host}:7000", [], 0, stopped=True)
    assert peer.identity.identity_public not in tracker.peers


# ---------------------------------------------------------------------------- item 7


def test_a_forged_upload_count_neither_raises_the_ratio_nor_passes_min_ratio(tmp_path, plugins):
    """The review's attack: announcing uploaded=10^13 took a ratio from 0 to 931 and
    got circuits past --min-ratio. Only uploads the peer's neighbours confirm count."""
    t = Tracker(
        tmp_path / "t",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(edge_settle=0, min_ratio=0.5, ratio_grace=1000),
    )
    t.start()
    try:
        host, other = f"{subnet()}.2", f"{subnet()}.2"
        cheat, witness = client(t, host), client(t, other)
        torrent = [TorrentStatus(IH, 0, 4000, 5)]
        cheat.announce(f"{host}:7000", torrent, 0)
        witness.announce(f"{other}:7000", [], 0)
        with pytest.raises(TrackerError, match=r"share ratio 0\.00 is below"):
            cheat.request_circuits(IH, 1)
        forged = [TorrentStatus(IH, 10**13, 4000, 5)]
        reply = cheat.announce(f"{host}:7000", forged, 0)
        assert reply.ratio == 0.0
        with pytest.raises(TrackerError, match=r"share ratio 0\.00 is below"):
            cheat.request_circuits(IH, 1)
        assert (reply.uploaded, reply.uploaded_claimed) == (0, 10**13)
        # What its neighbour confirms receiving from it is credited, and no more.
        nid = t.graph.nid(witness.identity.identity_public, cheat.identity.identity_public)
        witness.announce(f"{other}:7000", [], 0, receipts={nid: 3000})
        reply = cheat.announce(f"{host}:7000", forged, 0)
        assert (reply.uploaded, reply.ratio) == (3000, pytest.approx(3000 / 4000))
        assert cheat.request_circuits(IH, 1) == []  # served (there is no source)
    finally:
        t.stop()


def test_the_enumeration_bench_meets_the_limits(plugins):
    """anomos.bench.enumeration (the figures in docs/threat-model.md) runs the attack
    over HTTPS: six simulated minutes from one IP join the burst plus one a minute."""
    result = enumerate_membership(plugins, peers=60, hours=0.1)
    settings = LimitSettings()
    assert settings.join_burst < result["identities_joined"] <= settings.join_burst + 6
    assert result["joins_refused"] > 0
    assert 0 < result["addresses_learned"] < 60
