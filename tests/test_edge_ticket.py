"""Edge tickets (issue 13, fast start): a listener takes a newcomer's link on the
tracker's signed ticket instead of asking the tracker first, and refuses every
ticket that is not good for exactly that edge, now, from the tracker it pins.

The attacks run over real TLS links on loopback (a forged, a tampered, an
expired ticket, one replayed to another listener, one stolen by another
identity); the tracker's side runs a real tracker with real in-process peers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from test_link import Node, make_node, neighbour, wait_until  # noqa: F401 (fixture)

from anomos.errors import CryptoError
from anomos.identity import PeerIdentity
from anomos.net import link as linkmod
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.protocol import ticket as ticketmod
from anomos.protocol.request import tracker_fingerprint
from anomos.protocol.ticket import (
    TICKET_TTL,
    EdgeTicket,
    issue_ticket,
    offerable,
    open_ticket,
)
from anomos.testing import start_peers
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

TRACKER_KEY = ec.generate_private_key(ec.SECP256R1())
TRACKER = tracker_fingerprint(TRACKER_KEY.public_key())
A, B, C = (bytes([i]) * 32 for i in (1, 2, 3))


def ticket_for(
    dialer: bytes,
    listener: bytes,
    nid: int,
    *,
    key: ec.EllipticCurvePrivateKey = TRACKER_KEY,
    expires: float | None = None,
    address: str = "127.0.0.1:4000",
) -> bytes:
    expires = time.time() + TICKET_TTL if expires is None else expires
    return issue_ticket(EdgeTicket(nid, dialer, listener, address, int(expires)), key)


# ----------------------------------------------------------------------------- the codec


def test_a_good_ticket_opens_for_exactly_its_edge() -> None:
    blob = ticket_for(A, B, 7, address="10.0.0.1:6881")
    got = open_ticket(blob, {TRACKER}, dialer=A, listener=B, nid=7)
    assert (got.nid, got.dialer, got.listener, got.address) == (7, A, B, "10.0.0.1:6881")
    assert offerable(blob)
    for wrong, why in [
        ({"dialer": C, "listener": B, "nid": 7}, "issued to another peer"),
        ({"dialer": A, "listener": C, "nid": 7}, "issued for another listener"),
        ({"dialer": A, "listener": B, "nid": 8}, "is for NID 7, not 8"),
    ]:
        with pytest.raises(CryptoError, match=why):
            open_ticket(blob, {TRACKER}, **wrong)  # type: ignore[arg-type]


def test_forged_tampered_and_expired_tickets_are_refused() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CryptoError, match="signed by an untrusted tracker"):
        open_ticket(ticket_for(A, B, 7, key=other), {TRACKER}, dialer=A, listener=B, nid=7)
    blob = bytearray(ticket_for(A, B, 7))
    blob[10] ^= 1  # the expiry, under the signature
    with pytest.raises(CryptoError, match="bad tracker signature"):
        open_ticket(bytes(blob), {TRACKER}, dialer=A, listener=B, nid=7)
    old = ticket_for(A, B, 7, expires=time.time() - 5)
    with pytest.raises(CryptoError, match="expired"):
        open_ticket(old, {TRACKER}, dialer=A, listener=B, nid=7)
    assert not offerable(old)
    assert not offerable(ticket_for(A, B, 7, expires=time.time() + ticketmod.TICKET_MARGIN / 2))
    forever = ticket_for(A, B, 7, expires=time.time() + 10 * TICKET_TTL)
    with pytest.raises(CryptoError, match="too long"):
        open_ticket(forever, {TRACKER}, dialer=A, listener=B, nid=7)
    for junk in (b"", b"x" * 50, bytes(blob[:-1]), bytes(blob) + b"x" * 400):
        with pytest.raises(CryptoError):
            open_ticket(junk, {TRACKER}, dialer=A, listener=B, nid=7)


# ----------------------------------------------------------------------------- over links


@attrs.define(eq=False)
class Listener:
    """What a node's link manager asked of its peer: tracker refreshes, admissions."""

    asked: list[int] = attrs.field(factory=list)
    admitted: list[int] = attrs.field(factory=list)


CALLS: dict[int, Listener] = {}


def calls(node: Node) -> Listener:
    return CALLS[id(node)]


@pytest.fixture
def ticketed(make_node: Any) -> Iterator[Any]:  # noqa: F811 (the fixture of test_link)
    """Nodes whose listener takes tickets of TRACKER, recording what it asks its peer."""

    def make() -> Node:
        node: Node = make_node()
        seen = CALLS[id(node)] = Listener()
        node.links.trackers = frozenset({TRACKER})
        node.links.on_unknown_nid = seen.asked.append
        node.links.on_admitted = seen.admitted.append
        return node

    yield make
    CALLS.clear()


def dial_with(a: Node, b: Node, nid: int, blob: bytes) -> None:
    """``a`` dials ``b`` on ``nid``, carrying ``blob``; ``b`` was told of nothing."""
    a.assign(attrs.evolve(neighbour(b, nid, True), ticket=blob))


def refused(a: Node, b: Node, nid: int, caplog: Any, why: str) -> None:
    with caplog.at_level(logging.INFO, logger="anomos.net.link"):
        wait_until(lambda: f"cannot link to NID {nid}" in caplog.text)  # no AUTH_OK came
    assert not b.links.links and not b.events.up and not a.events.up
    assert not calls(b).asked and not calls(b).admitted
    assert nid not in b.links.neighbours()
    wait_until(lambda: why in caplog.text)


def test_a_newcomer_with_a_ticket_is_linked_without_asking_the_tracker(ticketed: Any) -> None:
    a, b = ticketed(), ticketed()
    pub_a, pub_b = a.identity.identity_public, b.identity.identity_public
    dial_with(a, b, 5, ticket_for(pub_a, pub_b, 5, address=a.links.address))
    assert b.links.wait_for(5, 5).identity == pub_a
    assert a.links.wait_for(5, 5).identity == pub_b
    assert calls(b).asked == [] and calls(b).admitted == [5]
    nb = b.links.neighbours()[5]
    assert (bytes(nb.identity), nb.address, nb.dial) == (pub_a, a.links.address, False)


def test_a_forged_ticket_is_refused(ticketed: Any, caplog: Any) -> None:
    a, b = ticketed(), ticketed()
    forger = ec.generate_private_key(ec.SECP256R1())
    pub_a, pub_b = a.identity.identity_public, b.identity.identity_public
    dial_with(a, b, 5, ticket_for(pub_a, pub_b, 5, key=forger))
    refused(a, b, 5, caplog, "edge ticket is signed by an untrusted tracker")


def test_an_expired_ticket_is_refused(ticketed: Any, caplog: Any, monkeypatch: Any) -> None:
    a, b = ticketed(), ticketed()
    # A hostile dialler offers what an honest one would drop as stale.
    monkeypatch.setattr(linkmod, "offerable", lambda blob: True)
    pub_a, pub_b = a.identity.identity_public, b.identity.identity_public
    dial_with(a, b, 5, ticket_for(pub_a, pub_b, 5, expires=time.time() - 1))
    refused(a, b, 5, caplog, "edge ticket expired")


def test_a_ticket_replayed_to_another_listener_is_refused(ticketed: Any, caplog: Any) -> None:
    a, b, c = ticketed(), ticketed(), ticketed()
    pub_a, pub_b = a.identity.identity_public, b.identity.identity_public
    dial_with(a, c, 5, ticket_for(pub_a, pub_b, 5))  # b's ticket, shown to c
    refused(a, c, 5, caplog, "edge ticket was issued for another listener")


def test_a_ticket_stolen_by_another_identity_is_refused(ticketed: Any, caplog: Any) -> None:
    a, b, thief = ticketed(), ticketed(), ticketed()
    pub_a, pub_b = a.identity.identity_public, b.identity.identity_public
    # The thief has a's ticket but signs its AUTH with its own key (it lacks a's).
    dial_with(thief, b, 5, ticket_for(pub_a, pub_b, 5))
    refused(thief, b, 5, caplog, "edge ticket was issued to another peer")


def test_a_ticketed_neighbour_lasts_until_an_assignment_asked_after_it(ticketed: Any) -> None:
    a, b = ticketed(), ticketed()
    pub_a, pub_b = a.identity.identity_public, b.identity.identity_public
    asked = time.monotonic()  # an announce of b's in flight as a dials
    dial_with(a, b, 5, ticket_for(pub_a, pub_b, 5, address=a.links.address))
    link = b.links.wait_for(5, 5)
    b.links.set_neighbours([], asked_at=asked)  # answered before the tracker issued it
    assert not link.closed and 5 in b.links.neighbours()
    b.links.set_neighbours([], asked_at=time.monotonic())  # asked after: it is gone
    wait_until(lambda: link.closed)
    assert 5 not in b.links.neighbours()


# ----------------------------------------------------------------------------- the tracker


@pytest.fixture
def tracker(tmp_path: Path, plugins: Plugins) -> Iterator[Tracker]:
    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, TrackerSettings(min_neighbours=2))
    t.start()
    yield t
    t.stop()


def test_the_tracker_tickets_edges_whose_far_end_was_not_told(
    tracker: Tracker, tmp_path: Path, plugins: Plugins, monkeypatch: Any
) -> None:
    """A newcomer's neighbours take its links on its tickets: none asks the tracker."""
    asked: list[int] = []
    monkeypatch.setattr(Peer, "_on_unknown_nid", lambda self, nid: asked.append(nid))
    old = start_peers(plugins, tracker, tmp_path, 3)  # every edge known at both ends
    (new,) = start_peers(plugins, tracker, tmp_path / "new", 1, announce=False)
    try:
        dialled = [nb for nb in new.links.neighbours().values() if nb.dial]
        assert len(dialled) >= 2 and all(nb.ticket for nb in dialled)
        for nb in dialled:
            new.links.wait_for(nb.nid, 10)
        by_identity = {p.identity.identity_public: p for p in old}
        for nb in dialled:
            listener = by_identity[bytes(nb.identity)]
            wait_until(lambda: listener.links.get(nb.nid) is not None, 10)  # noqa: B023
        assert asked == []
        # Once the far end has announced (it is asked to soon), no more tickets.
        for p in old:
            p.announce()
        reply = new.announce()
        assert {nb.nid for nb in reply.neighbours if nb.dial} == {nb.nid for nb in dialled}
        assert not any(nb.ticket for nb in reply.neighbours)
    finally:
        for p in [*old, new]:
            p.stop()


def test_a_ticket_of_the_tracker_opens_only_at_the_listener_it_names(
    tracker: Tracker, tmp_path: Path, plugins: Plugins
) -> None:
    old = start_peers(plugins, tracker, tmp_path, 3)
    (new,) = start_peers(plugins, tracker, tmp_path / "new", 1, announce=False)
    try:
        nb = next(nb for nb in new.links.neighbours().values() if nb.dial)
        me, pins = new.identity.identity_public, {tracker.fingerprint}
        got = open_ticket(nb.ticket, pins, dialer=me, listener=nb.identity, nid=nb.nid)
        assert got.address == new.address and got.expires <= time.time() + TICKET_TTL + 1
        stranger = PeerIdentity.generate().identity_public
        with pytest.raises(CryptoError, match="another listener"):
            open_ticket(nb.ticket, pins, dialer=me, listener=stranger, nid=nb.nid)
    finally:
        for p in [*old, new]:
            p.stop()
