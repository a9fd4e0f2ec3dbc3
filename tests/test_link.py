"""Authenticated TLS neighbour links: who may connect, and fair multiplexing."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import gevent
import gevent.event
import nacl.signing
import pytest

from anomos import hookimpl
from anomos.config import Settings, split_address
from anomos.errors import TransportError
from anomos.identity import PeerIdentity
from anomos.net import link as linkmod
from anomos.net.frames import Cmd
from anomos.net.link import CloseCause, CloseReason, LinkManager
from anomos.pluginmanager import get_plugins
from anomos.protocol.onion import TRACKING_CODE_SIZE
from anomos.testing import MemoryTransportPlugin, loopback_host
from anomos.tracker.client import Neighbour

BREAK_PAYLOAD = b"\x00"


class Events:
    """Records the neighbour hooks."""

    def __init__(self) -> None:
        self.up: list[tuple[int, str]] = []
        self.down: list[tuple[int, str]] = []

    @hookimpl
    def anomos_neighbour_up(self, peer: Any, nid: int, address: str) -> None:
        self.up.append((nid, address))

    @hookimpl
    def anomos_neighbour_down(self, peer: Any, nid: int, reason: str) -> None:
        self.down.append((nid, reason))


@attrs.define(eq=False)
class Node:
    identity: PeerIdentity
    links: LinkManager
    events: Events
    frames: list[tuple[int, int, bytes]] = attrs.field(factory=list)
    assigned: dict[int, Neighbour] = attrs.field(factory=dict)

    def assign(self, nb: Neighbour) -> None:
        self.assigned[nb.nid] = nb
        self.links.set_neighbours(self.assigned.values())

    def unassign(self, nid: int) -> None:
        del self.assigned[nid]
        self.links.set_neighbours(self.assigned.values())


@pytest.fixture
def make_node() -> Iterator[Any]:
    nodes: list[Node] = []

    def make(transport: str = "tcp", **settings: Any) -> Node:
        events = Events()
        plugins = get_plugins(load_entrypoints=False, extra=[events, MemoryTransportPlugin()])
        listen = f"{loopback_host()}:0" if transport == "tcp" else "memory:0"
        identity = PeerIdentity.generate()
        node = Node(identity, None, events)  # type: ignore[arg-type]
        node.links = LinkManager(
            identity,
            plugins,
            Settings(listen=listen, transport=transport, **settings),
            on_frame=lambda link, c, cmd, p: node.frames.append((c, cmd, bytes(p))),
        )
        node.links.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.links.close()


def neighbour(node: Node, nid: int, dial: bool, identity: bytes | None = None) -> Neighbour:
    return Neighbour(nid, node.links.address, identity or node.identity.identity_public, dial)


def pair(a: Node, b: Node, nid: int = 7) -> None:
    """Assign a and b to each other; a dials."""
    b.assign(neighbour(a, nid, False))
    a.assign(neighbour(b, nid, True))


def wait_until(predicate: Any, timeout: float = 3.0) -> None:
    with gevent.Timeout(timeout, AssertionError("condition not reached in time")):
        while not predicate():
            gevent.sleep(0.01)


def test_handshake_between_assigned_neighbours(make_node: Any) -> None:
    a, b = make_node(), make_node()
    pair(a, b)
    la, lb = a.links.wait_for(7, 5), b.links.wait_for(7, 5)
    assert la.dialler and not lb.dialler
    assert la.identity == b.identity.identity_public
    assert lb.identity == a.identity.identity_public
    # Both ends are on their own loopback hosts: the dialler used its listen host as source.
    assert lb.sock.getpeername()[0] == a.links.settings.listen_host
    wait_until(lambda: la.accepted)  # the dialler's link is up for the hooks at AUTH_OK
    assert a.events.up == [(7, b.links.address)]
    assert b.events.up == [(7, a.links.address)]
    # Circuit ids: the dialler allocates with the high bit set, the listener without.
    ca, cb = la.allocate_circ_id(), lb.allocate_circ_id()
    assert ca & 0x80000000 and not cb & 0x80000000
    assert la.send(ca, Cmd.CREATED) and lb.send(cb, Cmd.BREAK, BREAK_PAYLOAD)
    wait_until(lambda: b.frames and a.frames)
    assert b.frames == [(ca, Cmd.CREATED, b"")]
    assert a.frames == [(cb, Cmd.BREAK, BREAK_PAYLOAD)]
    assert la.bytes_out > 0 and lb.bytes_in > 0


def test_caller_claiming_an_unassigned_nid_is_refused(make_node: Any, caplog: Any) -> None:
    a, b = make_node(), make_node()
    asked: list[int] = []
    b.links.on_unknown_nid = asked.append  # a refresh that learns nothing new
    with caplog.at_level(logging.INFO, logger="anomos.net.link"):
        a.assign(neighbour(b, 9, True))
        wait_until(lambda: "cannot link to NID 9" in caplog.text)  # no AUTH_OK came
    assert asked and set(asked) == {9}
    assert not b.links.links and not b.events.up and not a.events.up
    assert all(not link.accepted for link in a.links.links.values())
    assert "caller claimed NID 9, which is not our neighbour" in caplog.text


def test_unknown_nid_refresh_admits_a_new_neighbour(make_node: Any) -> None:
    a, b = make_node(), make_node()
    b.links.on_unknown_nid = lambda nid: b.assign(neighbour(a, nid, False))
    a.assign(neighbour(b, 3, True))
    assert b.links.wait_for(3, 5).identity == a.identity.identity_public


def test_caller_told_first_waits_for_the_reply_on_its_way(make_node: Any) -> None:
    """The tracker told the dialler of a new edge after answering the listener, whose
    reply naming the dialler is still on its way: the caller is admitted once that
    reply is adopted, without a refresh (which might be refused as too soon)."""
    a, b = make_node(), make_node()
    asked: list[int] = []
    b.links.on_unknown_nid = asked.append  # a refresh that learns nothing new
    called = gevent.event.Event()

    def announce_answered_late() -> None:
        with b.links.asking_tracker():
            called.set()
            wait_until(lambda: b.links._handshakes)  # the caller is at the door
            gevent.sleep(0.2)
            b.assign(neighbour(a, 11, False))

    announcing = gevent.spawn(announce_answered_late)
    called.wait(5)
    a.assign(neighbour(b, 11, True))
    assert b.links.wait_for(11, 5).identity == a.identity.identity_public
    announcing.get(timeout=5)
    assert asked == []


def test_caller_with_the_wrong_key_is_refused(make_node: Any, caplog: Any) -> None:
    a, b, mallory = make_node(), make_node(), make_node()
    b.assign(neighbour(a, 4, False))  # NID 4 belongs to a...
    with caplog.at_level(logging.INFO, logger="anomos.net.link"):
        mallory.assign(neighbour(b, 4, True))  # ...but mallory claims it with her own key
        wait_until(lambda: "cannot link to NID 4" in caplog.text)
    assert not b.links.links and not b.events.up and not mallory.events.up
    assert "caller claimed NID 4 with the wrong identity key" in caplog.text


def test_listener_with_the_wrong_identity_is_refused(make_node: Any, caplog: Any) -> None:
    a, b, c = make_node(), make_node(), make_node()
    b.assign(neighbour(a, 5, False))
    # The tracker announced c's identity at b's address: b's certificate must not pass.
    a.assign(neighbour(b, 5, True, identity=c.identity.identity_public))
    with caplog.at_level(logging.INFO, logger="anomos.net.link"), pytest.raises(TransportError):
        a.links.wait_for(5, 1.0)
    assert not b.links.links and not a.links.links
    assert "neighbour NID 5 presented the wrong identity" in caplog.text


def test_unassigning_closes_the_link_and_dialler_reconnects(
    make_node: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(linkmod, "DIAL_BACKOFF_MIN", 0.05)
    a, b = make_node(), make_node()
    pair(a, b, nid=2)
    first = a.links.wait_for(2, 5)
    b.links.wait_for(2, 5).close(CloseReason(CloseCause.STOPPED, "test closes it"))
    assert first.wait_closed(2)
    assert first.closed_reason is not None and first.closed_reason.cause.lost  # not ours
    wait_until(lambda: 2 in a.links.links and a.links.links[2] is not first)
    wait_until(lambda: a.links.links[2].accepted)  # (up for the hooks at AUTH_OK)
    assert len(a.events.up) == 2 and a.events.down[0][0] == 2
    a.unassign(2)
    wait_until(lambda: not a.links.links and not b.links.links)
    assert a.events.down[-1] == (2, "neighbour no longer assigned")


def test_handshake_timeout_drops_silent_callers(make_node: Any) -> None:
    b = make_node(handshake_timeout=0.3)
    host, port = split_address(b.links.address)
    with socket.create_connection((host, port)) as raw:
        raw.settimeout(3)
        assert raw.recv(100) == b""  # closed by b without a TLS handshake


def test_handshake_slots_per_address_and_eviction_of_strangers(
    make_node: Any, monkeypatch: Any
) -> None:
    """Idle callers hold no slot a neighbour needs: 8 per address, and when all are
    taken a newcomer evicts the oldest stranger (the 3 s first-bytes deadline is
    lifted here, so only the eviction can let the neighbour in)."""
    monkeypatch.setattr(linkmod, "FIRST_BYTES_TIMEOUT", 30.0)
    monkeypatch.setattr(linkmod, "MAX_PENDING_HANDSHAKES", 12)
    a, b = make_node(), make_node(handshake_timeout=30.0)
    host, port = split_address(b.links.address)

    def stranger(source: str) -> socket.socket:
        sock = socket.create_connection((host, port), 5, (source, 0))
        sock.settimeout(5)
        return sock

    same = loopback_host()
    crowd = [stranger(same) for _ in range(linkmod.MAX_HANDSHAKES_PER_ADDRESS)]
    wait_until(lambda: len(b.links._handshakes) == len(crowd))
    extra = stranger(same)
    assert extra.recv(1) == b""  # one address over its cap: dropped at once
    crowd += [stranger(loopback_host()) for _ in range(4)]  # all 12 slots taken
    wait_until(lambda: len(b.links._handshakes) == 12)
    newcomer = stranger(loopback_host())  # a stranger evicts the oldest stranger
    assert crowd[0].recv(1) == b""
    wait_until(lambda: len(b.links._handshakes) == 12)
    # The assigned neighbour, from its own address, evicts the next oldest and links.
    pair(a, b)
    a.links.wait_for(7, 5)
    assert crowd[1].recv(1) == b""
    for sock in [*crowd, extra, newcomer]:
        sock.close()


def test_keepalive_and_idle_timeout(make_node: Any, monkeypatch: Any) -> None:
    # Padding every 0.1 s against a 1.5 s idle limit: a busy machine may stall the
    # writers a good while without the link looking idle.
    monkeypatch.setattr(linkmod, "KEEPALIVE_INTERVAL", 0.1)
    monkeypatch.setattr(linkmod, "IDLE_TIMEOUT", 1.5)
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la, lb = a.links.wait_for(7, 5), b.links.wait_for(7, 5)
    gevent.sleep(3.0)  # twice the idle timeout: padding keeps the link up
    assert not la.closed and not lb.closed
    assert la.bytes_in > 0
    lb._writer.kill()  # b goes silent
    assert la.wait_closed(10)
    assert la.closed_reason == CloseReason(CloseCause.IDLE, "idle for 1.5 s")
    assert la.closed_reason.cause.lost and not la.closed_reason.cause.local


def test_a_neighbour_that_stops_reading_is_cut_as_send_stuck(
    make_node: Any, monkeypatch: Any
) -> None:
    # b keeps its link alive (its watchdog queues PADDING, its writer sends it) but its
    # reader hangs in a frame handler: a's sends fill the socket and stop. The link's
    # watchdog, not a timeout on the socket, must notice and cut it.
    monkeypatch.setattr(linkmod, "KEEPALIVE_INTERVAL", 0.1)
    monkeypatch.setattr(linkmod, "IDLE_TIMEOUT", 1.5)
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la, lb = a.links.wait_for(7, 5), b.links.wait_for(7, 5)
    lb._watchdog.kill()  # b pads as before but never gives up on a: only a is timed
    lb._watchdog = gevent.spawn(lb._watch, 0.1, 3600.0)
    b.links.on_frame = lambda link, c, cmd, p: gevent.sleep(3600)
    circ = la.allocate_circ_id()
    cell = bytes(linkmod.CELL_BODY)
    for _ in range(256):  # 8 MiB: far more than the socket pair buffers
        assert la.send(circ, Cmd.DATA, cell)
    assert la.wait_closed(10)
    assert la.closed_reason == CloseReason(CloseCause.SEND_STUCK, "send stuck for 1.5 s")
    assert not lb.closed  # b's own sends went through all along


def test_garbage_after_handshake_closes_the_link(make_node: Any) -> None:
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la, lb = a.links.wait_for(7, 5), b.links.wait_for(7, 5)
    la.sock.sendall(b"\x00\x00\x00\x01\xff\x00\x00\x00")
    assert lb.wait_closed(2)
    assert lb.closed_reason == CloseReason(CloseCause.VIOLATION, "unknown frame command 255")
    assert not lb.closed_reason.cause.lost and not lb.closed_reason.cause.local
    assert b.events.down == [(7, "unknown frame command 255")]


def test_round_robin_between_circuits(make_node: Any) -> None:
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la = a.links.wait_for(7, 5)
    busy, quiet = la.allocate_circ_id(), la.allocate_circ_id()
    for _ in range(20):
        assert la.send(busy, Cmd.CREATED)
    assert la.send(quiet, Cmd.CREATED)
    wait_until(lambda: len(b.frames) == 21)
    order = [c for c, _, _ in b.frames]
    assert order.index(quiet) <= 1  # served in the first round, not after the 20 others


def test_overflowing_circuit_queue_spares_the_link(make_node: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(linkmod, "CIRCUIT_QUEUE_FRAMES", 4)
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la = a.links.wait_for(7, 5)
    full, other = la.allocate_circ_id(), la.allocate_circ_id()
    accepted = [la.send(full, Cmd.CREATED) for _ in range(6)]
    assert accepted == [True] * 4 + [False] * 2
    assert la.send(other, Cmd.CREATED)
    assert la.send(full, Cmd.BREAK, BREAK_PAYLOAD, force=True)  # the one BREAK still fits
    wait_until(lambda: len(b.frames) == 6)
    assert not la.closed


def test_the_whole_link_queue_is_capped_greediest_circuits_first(
    make_node: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(linkmod, "LINK_QUEUE_FRAMES", 8)
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la = a.links.wait_for(7, 5)
    assert la._writer is not None
    la._writer.kill()  # the neighbour stops draining: every frame stays queued

    def fill(circ_id: int) -> int:
        n = 0
        while la.send(circ_id, Cmd.CREATED):
            n += 1
        return n

    hog = la.allocate_circ_id()
    assert fill(hog) == 8  # alone below the link's cap (the circuit's own is 256)
    # Over the cap, a circuit may still queue up to an equal share (8 / circuits)...
    second = la.allocate_circ_id()
    assert fill(second) == 4
    third = la.allocate_circ_id()
    assert fill(third) == 3  # while below 8 / 3
    fourth = la.allocate_circ_id()
    assert fill(fourth) == 1  # the total reached twice the cap...
    late = la.allocate_circ_id()
    assert fill(late) == 0  # ...and nothing goes above it
    assert la.queued() == 16 == 2 * la.link_limit
    assert la.queued(hog) == 8 and not la.send(hog, Cmd.CREATED)
    assert la.send(hog, Cmd.BREAK, BREAK_PAYLOAD, force=True)  # the one BREAK still fits
    la.discard(hog)
    assert la.queued() == 8 and not la.closed


def test_our_senders_wait_for_room_on_a_full_link(make_node: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(linkmod, "LINK_QUEUE_FRAMES", 4)
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la = a.links.wait_for(7, 5)
    assert la._writer is not None
    la._writer.kill()
    circ_id = la.allocate_circ_id()
    for _ in range(4):
        assert la.send(circ_id, Cmd.CREATED)
    assert la.over_limit()
    assert not la.wait_for_room(0.05)  # nothing drains
    waiter = gevent.spawn(la.wait_for_room, 5)
    gevent.sleep(0.05)
    assert not waiter.ready()
    la._writer = gevent.spawn(la._write_loop)  # the neighbour reads again
    assert waiter.get(timeout=3) is True
    wait_until(lambda: len(b.frames) == 4)
    assert la.queued() == 0


def test_create_tokens_refill_at_the_rate(make_node: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(linkmod, "CREATE_BURST", 3)
    monkeypatch.setattr(linkmod, "CREATE_RATE", 20.0)
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la = a.links.wait_for(7, 5)
    assert [la.allow_create() for _ in range(4)] == [True, True, True, False]
    gevent.sleep(0.12)  # 20/s: two more tokens
    assert la.allow_create()


def test_circuit_id_limits(make_node: Any, monkeypatch: Any) -> None:
    from anomos.errors import ProtocolError

    monkeypatch.setattr(linkmod, "MAX_CIRCUITS_PER_LINK", 2)
    a, b = make_node("memory"), make_node("memory")
    pair(a, b)
    la = a.links.wait_for(7, 5)
    la.allocate_circ_id()
    la.accept_circ_id(5)  # the listener's half: no high bit
    with pytest.raises(ProtocolError, match="too many circuits"):
        la.allocate_circ_id()
    la.release_circ_id(5)
    with pytest.raises(ProtocolError, match="from our half"):
        la.accept_circ_id(0x80000001)


def test_raw_dial_goes_through_the_configured_transports(make_node: Any) -> None:
    a, b = make_node(), make_node()
    with a.links.dial(b.links.address, timeout=2) as raw:
        assert raw.getsockname()[0] == a.links.settings.listen_host
    with pytest.raises(TransportError, match="onion"):
        a.links.dial("abcdefghijklmnop.onion:80", timeout=2)


def tls_stream_pair() -> tuple[linkmod.TLSStream, linkmod.TLSStream]:
    """Server and client ends of a TLS stream over a socketpair, handshake done."""
    a, b = socket.socketpair()
    server = linkmod.TLSStream(a, linkmod.server_context(PeerIdentity.generate()), server_side=True)
    client = linkmod.TLSStream(b, linkmod.client_context(), server_side=False)
    done = gevent.spawn(server.do_handshake)
    client.do_handshake()
    done.get(timeout=5)
    return server, client


def test_tls_stream_returns_every_buffered_record_in_one_call() -> None:
    """One recv_into hands over all the TLS records already in, not one 16 KiB record."""
    server, client = tls_stream_pair()
    message = bytes(range(256)) * 400  # 100 KiB: seven TLS records
    writer = gevent.spawn(client.sendall, message)  # one write of seven records
    buf = bytearray(256 * 1024)
    got = 0
    calls = 0
    with gevent.Timeout(5):
        while got < len(message):
            got += server.recv_into(memoryview(buf)[got:])
            calls += 1
    writer.get(timeout=5)
    assert bytes(buf[:got]) == message
    assert calls <= 2  # the socket may deliver it in two reads; never a call per record
    client.close()
    assert server.recv_into(buf) == 0
    server.close()


def test_tls_stream_sends_more_than_the_socket_holds_intact() -> None:
    """A write far beyond the socket's buffers goes out in several partial sends,
    each resumed where the last stopped: every byte arrives once, in order."""
    server, client = tls_stream_pair()
    message = os.urandom(8 << 20)
    writer = gevent.spawn(client.sendall, message)
    buf = bytearray(len(message))
    got = 0
    with gevent.Timeout(20):
        while got < len(message):
            got += server.recv_into(memoryview(buf)[got : got + 65536])
            gevent.sleep(0)  # a slow reader: the writer meets a full socket often
    writer.get(timeout=5)
    assert buf == message
    client.close()
    server.close()


def test_receipts_count_what_each_neighbour_sent_across_reconnections(
    make_node: Any, monkeypatch: Any
) -> None:
    """The cell bytes credited per NID survive a reconnect, and the announce carries them.

    Here every DATA cell counts as on an established circuit (a CircuitSwitch decides
    that: tests/test_link_abuse.py); other frames never count."""
    from anomos.protocol.e2e import CELL_BODY
    from anomos.tracker.client import TrackerClient

    monkeypatch.setattr(linkmod, "DIAL_BACKOFF_MIN", 0.05)
    a, b = make_node("memory"), make_node("memory")

    def on_frame(link: Any, circ_id: int, cmd: int, payload: memoryview) -> None:
        if cmd == Cmd.DATA:
            link.credit(payload)
        a.frames.append((circ_id, cmd, bytes(payload)))

    a.links.on_frame = on_frame
    cell = linkmod.HEADER_SIZE + CELL_BODY
    assert a.links.receipts() == {}  # assigned but never linked: nothing to confirm
    pair(a, b, nid=2)
    first_a, first_b = a.links.wait_for(2, 5), b.links.wait_for(2, 5)
    circ_id = first_b.allocate_circ_id()
    assert first_b.send(circ_id, Cmd.CREATED)
    for _ in range(5):
        assert first_b.send(circ_id, Cmd.DATA, bytes(CELL_BODY))
    wait_until(lambda: len(a.frames) == 6)
    assert a.links.receipts() == {2: 5 * cell}  # the CREATED and keepalives: not credited
    first_b.close(CloseReason(CloseCause.STOPPED, "test closes it"))
    assert first_a.wait_closed(2)
    wait_until(lambda: a.links.get(2) not in (None, first_a))
    second_b = b.links.wait_for(2, 5)
    circ_id = second_b.allocate_circ_id()
    assert second_b.send(circ_id, Cmd.DATA, bytes(CELL_BODY))
    wait_until(lambda: len(a.frames) == 7)
    assert a.links.receipts() == {2: 6 * cell}

    sent: list[dict[str, Any]] = []
    client = TrackerClient("https://127.0.0.1:9/announce", "00" * 32, a.identity)
    monkeypatch.setattr(client, "_post", lambda _path, inner: sent.append(inner) or {})
    with pytest.raises(Exception, match="malformed announce reply"):
        client.announce("127.0.0.1:7000", [], 0, receipts=a.links.receipts())
    assert sent[0]["receipts"] == [{"nid": 2, "received": 6 * cell}]

    # Another neighbour at that NID starts from zero; an unassigned NID is forgotten.
    c = make_node("memory")
    a.assign(neighbour(c, 2, False))
    assert a.links.receipts() == {}
    assert not a.links._received


def test_a_new_link_warms_tcp_with_padding_unless_our_circuit_waits_for_it(
    make_node: Any,
) -> None:
    """A new link sends WARM_UP_BYTES of PADDING first (TCP's window grows before a
    circuit's 32 KiB cells need it), except at a dialler whose own circuit waits for
    the link: that circuit's CREATE and HELLO must not queue behind the padding."""
    a, b = make_node(), make_node()
    pair(a, b)
    la = a.links.wait_for(7, 5)  # a circuit of a's waits for this link
    lb = b.links.wait_for(7, 5)
    wait_until(lambda: la.bytes_in >= linkmod.WARM_UP_BYTES)  # b's warm-up
    assert lb.bytes_in < linkmod.WARM_UP_BYTES // 4  # a sent none
    c, d = make_node(), make_node()
    pair(c, d, nid=9)  # nobody waits: both ends warm their direction
    wait_until(lambda: 9 in c.links.links and 9 in d.links.links)
    warm = linkmod.WARM_UP_BYTES
    wait_until(lambda: min(c.links.links[9].bytes_in, d.links.links[9].bytes_in) >= warm)
    assert not c.links.awaited(9) and not a.links.awaited(7)
    e, f = make_node(max_send_rate=1 << 20), make_node()  # e has an upload limit
    pair(e, f, nid=11)
    wait_until(lambda: 11 in e.links.links and 11 in f.links.links)
    wait_until(lambda: e.links.links[11].bytes_in >= warm)  # f warms its direction
    assert f.links.links[11].bytes_in < warm // 4  # e does not


def test_a_dialler_sends_its_first_frames_without_waiting_for_auth_ok(make_node: Any) -> None:
    """A dialler's link is usable once its AUTH is sent: a circuit's CREATE follows the
    AUTH at once instead of a round trip later, behind the listener's AUTH_OK (the
    listener, whose identity TLS proved, reads it only after accepting the dialler).

    The listener here is the protocol written out by hand over real TCP and TLS, and
    it answers AUTH_OK only once it has read a frame after the AUTH: a dialler that
    waited for AUTH_OK before sending anything would never get its link.
    """
    a = make_node()
    listener_id = PeerIdentity.generate()
    server = socket.socket()
    server.bind((loopback_host(), 0))
    server.listen(1)
    seen: list[tuple[int, int, bytes]] = []

    def listen() -> None:
        raw, _ = server.accept()
        tls = linkmod.TLSStream(raw, linkmod.server_context(listener_id), server_side=True)
        tls.do_handshake()
        reader = linkmod.FrameReader(tls)
        challenge = bytes(32)
        tls.sendall(linkmod.encode_frame(linkmod.LINK_CIRC_ID, Cmd.AUTH_CHALLENGE, challenge))
        nid, identity, signature, _ticket = linkmod.decode_auth(next(reader)[2])
        assert identity == a.identity.identity_public and nid == 7
        message = linkmod.auth_message(challenge, listener_id.identity_public, nid)
        nacl.signing.VerifyKey(identity).verify(message, signature)
        for circ_id, cmd, payload in reader:
            if cmd != Cmd.PADDING:  # (a warm-up may come first)
                seen.append((circ_id, cmd, bytes(payload)))
                break
        tls.sendall(linkmod.encode_frame(linkmod.LINK_CIRC_ID, Cmd.AUTH_OK))
        gevent.sleep(5)  # keep the connection while the test looks
        raw.close()

    g = gevent.spawn(listen)
    try:
        host, port = server.getsockname()[:2]
        a.assign(Neighbour(7, f"{host}:{port}", listener_id.identity_public, True))
        link = a.links.wait_for(7, 5)
        assert not link.accepted and not a.events.up  # no AUTH_OK yet: it waits for this
        circ_id, code = link.allocate_circ_id(), bytes(TRACKING_CODE_SIZE)
        assert link.send(circ_id, Cmd.CREATE, code)
        wait_until(lambda: link.accepted)
        assert seen == [(circ_id, Cmd.CREATE, code)]
        assert a.events.up == [(7, f"{host}:{port}")] and a.links.get(7) is link
    finally:
        g.kill()
        server.close()


def test_a_circuit_frame_never_queues_behind_the_warm_up(make_node: Any, monkeypatch: Any) -> None:
    """The warm-up padding yields to circuits: a frame queued as the link comes up goes
    out first, and the rest of the warm-up is dropped (the circuit's cells warm the
    link), so a REPLY crossing a new link never waits behind the padding."""
    a, b = make_node(), make_node()
    accepted = LinkManager.link_accepted
    sent: list[int] = []

    def at_accept(self: LinkManager, link: Any) -> None:
        accepted(self, link)
        if self is b.links:  # the listener, which warms its direction
            sent.append(link.allocate_circ_id())
            assert link.send(sent[0], Cmd.CREATED)

    monkeypatch.setattr(LinkManager, "link_accepted", at_accept)
    arrived: list[tuple[int, int]] = []

    def on_frame(link: Any, circ_id: int, cmd: int, payload: Any) -> None:
        arrived.append((cmd, link.reader.bytes_in))

    a.links.on_frame = on_frame
    pair(a, b)
    wait_until(lambda: arrived)
    assert arrived[0][0] == Cmd.CREATED and arrived[0][1] < linkmod.WARM_UP_CHUNK
    assert b.links.get(7) is not None
    b.links.get(7).send(sent[0], Cmd.BREAK, BREAK_PAYLOAD)  # type: ignore[union-attr]
    wait_until(lambda: len(arrived) == 2)
    assert arrived[1][0] == Cmd.BREAK and arrived[1][1] < linkmod.WARM_UP_CHUNK  # no more
