"""Circuits through real neighbour links: switching, layers, BREAK, flow control.

Tracking codes are built directly with ``build_tracking_code`` and neighbours
assigned by hand, so no tracker is involved. Most tests run over TCP on
distinct 127.0.0.X hosts; a few fast ones use the memory transport.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import gevent
import gevent.event
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from anomos import hookimpl
from anomos.config import Settings
from anomos.errors import ProtocolError
from anomos.identity import PeerIdentity
from anomos.net import circuit as circuitmod
from anomos.net import link as linkmod
from anomos.net.circuit import CircuitClosed, CircuitStream, CircuitSwitch, RelayCircuit
from anomos.net.frames import JOINED_BREAK, BreakReason, Cmd
from anomos.net.link import CloseCause, CloseReason, LinkManager
from anomos.pluginmanager import Plugins, get_plugins
from anomos.protocol import e2e
from anomos.protocol.onion import Hop, build_tracking_code, current_epoch
from anomos.protocol.request import SourceRequest, seal_request
from anomos.testing import MemoryTransportPlugin, loopback_host, tracker_key, tracker_trust
from anomos.tracker.client import CircuitPlan, Neighbour

INFOHASH = b"\x42" * 20
Serve = Callable[[CircuitStream], None]


class Events:
    """Records the circuit hooks of one node."""

    def __init__(self) -> None:
        self.opened: list[Any] = []
        self.closed: list[tuple[Any, str]] = []

    @hookimpl
    def anomos_circuit_opened(self, peer: Any, circuit: Any) -> None:
        self.opened.append(circuit)

    @hookimpl
    def anomos_circuit_closed(self, peer: Any, circuit: Any, reason: str) -> None:
        self.closed.append((circuit, reason))


@attrs.define(eq=False)
class Node:
    identity: PeerIdentity
    plugins: Plugins
    links: LinkManager
    switch: CircuitSwitch
    events: Events
    assigned: list[Neighbour] = attrs.field(factory=list)
    #: Streams this node served as a source.
    served: list[CircuitStream] = attrs.field(factory=list)
    #: What the source does with a new stream; None refuses every request.
    serve: Serve | None = None
    #: Every frame this node received: (link nid, circ_id, cmd, payload copy).
    seen: list[tuple[int, int, int, bytes]] | None = None

    def instrument(self) -> None:
        """Record every frame before switching it."""
        self.seen = []
        handle = self.switch.handle_frame

        def spy(link: Any, circ_id: int, cmd: int, payload: memoryview) -> None:
            assert self.seen is not None
            self.seen.append((link.nid, circ_id, cmd, bytes(payload)))
            handle(link, circ_id, cmd, payload)

        self.links.on_frame = spy

    def relays(self) -> list[RelayCircuit]:
        return [c for c in self.switch.circuits() if isinstance(c, RelayCircuit)]


@pytest.fixture
def net() -> Iterator[Callable[..., list[Node]]]:
    """``net(n, transport)``: n nodes in a chain, node i linked to i+1 with NID i+1."""
    made: list[Node] = []

    def build(count: int, transport: str = "tcp") -> list[Node]:
        nodes = [make_node(transport) for _ in range(count)]
        made.extend(nodes)
        for i in range(count - 1):
            connect(nodes[i], nodes[i + 1], i + 1)
        return nodes

    yield build
    for node in made:
        node.switch.close()
        node.links.close()


def make_node(transport: str) -> Node:
    events = Events()
    plugins = get_plugins(load_entrypoints=False, extra=[events, MemoryTransportPlugin()])
    identity = PeerIdentity.generate()
    listen = f"{loopback_host()}:0" if transport == "tcp" else "memory:0"
    links = LinkManager(
        identity, plugins, Settings(listen=listen, transport=transport), on_frame=None
    )
    node = Node(identity, plugins, links, None, events)  # type: ignore[arg-type]

    def on_request(request: SourceRequest) -> Serve | None:
        if request.infohash != INFOHASH or node.serve is None:
            return None
        serve = node.serve

        def run(stream: CircuitStream) -> None:
            node.served.append(stream)
            serve(stream)

        return run

    node.switch = CircuitSwitch(
        links, identity, plugins, on_request=on_request, trackers=tracker_trust()
    )
    links.start()
    return node


def connect(a: Node, b: Node, nid: int) -> None:
    a.assigned.append(Neighbour(nid, b.links.address, b.identity.identity_public, True))
    b.assigned.append(Neighbour(nid, a.links.address, a.identity.identity_public, False))
    a.links.set_neighbours(a.assigned)
    b.links.set_neighbours(b.assigned)
    a.links.wait_for(nid, 5)
    b.links.wait_for(nid, 5)


def plan_for(
    path: list[Node],
    *,
    infohash: bytes = INFOHASH,
    request_blob: bytes = b"",
    suite_name: str = "x25519",
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> Any:
    """The plan a tracker would give path[0] for the route path[1:] (NIDs as in ``net``)."""
    first = path[0].links.links
    first_nid = min(first)  # the link towards path[1] in a chain built left to right
    hops = []
    for i, node in enumerate(path[1:], start=1):
        last = i == len(path) - 1
        hops.append(Hop(node.identity.onion_public, None if last else first_nid + i))
    code, layers = build_tracking_code(hops, current_epoch())
    suite = path[0].plugins.cipher_suite(suite_name)
    material = suite.tracker_material()
    request = SourceRequest(
        infohash=infohash, suite=suite_name, material=material, expires=int(time.time()) + 600
    )
    signer = signer or tracker_key()
    blob = request_blob or seal_request(request, path[-1].identity.box_public, signer)
    return CircuitPlan(
        first_nid=first_nid,
        tracking_code=code,
        layers=layers,
        request_blob=blob,
        suite=suite_name,
        material=material,
    )


def read_exactly(stream: CircuitStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def exchange(stream: CircuitStream) -> None:
    """Source behaviour: read a length-prefixed message, answer its reversal."""
    size = int.from_bytes(read_exactly(stream, 4), "big")
    data = read_exactly(stream, size)
    stream.sendall(data[::-1])
    assert stream.recv(1) == b""  # the downloader closes cleanly
    stream.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 3.0) -> None:
    with gevent.Timeout(timeout, AssertionError("condition not reached in time")):
        while not predicate():
            gevent.sleep(0.01)


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("relays", [0, 1, 2, 3])
def test_data_both_ways_through_relays(net: Any, relays: int) -> None:
    nodes = net(relays + 2)
    source = nodes[-1]
    source.serve = exchange
    stream = nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    message = os.urandom(3 * e2e.MAX_RECORD_DATA + 1234)
    stream.sendall(len(message).to_bytes(4, "big") + message)
    assert read_exactly(stream, len(message)) == message[::-1]
    stream.close()
    wait_until(lambda: all(not n.switch.circuits() for n in nodes))
    assert source.served[0].request is not None
    assert source.served[0].request.infohash == INFOHASH
    for node in nodes:
        # every node saw the circuit open and close once; relays saw only their own part
        assert len(node.events.opened) == 1 and len(node.events.closed) == 1
        assert all(link.circuit_count == 0 for link in node.links.links.values())
    for relay in nodes[1:-1]:
        assert relay.switch.relayed_bytes >= 2 * len(message)
        # Both its links carried every byte it relayed (the daemon's neighbourhood view).
        relayed = [link.relayed for link in relay.links.links.values()]
        assert relayed == [relay.switch.relayed_bytes] * 2
    assert nodes[0].switch.relayed_bytes == source.switch.relayed_bytes == 0
    assert all(link.relayed == 0 for n in (nodes[0], source) for link in n.links.links.values())
    assert stream.bytes_sent == len(message) + 4
    assert stream.bytes_received == len(message)


def test_records_that_fit_travel_in_short_cells_and_relays_keep_their_size(net: Any) -> None:
    """Small writes (request batches, SENDMEs, END) go in 2 KiB frames, big ones in
    32 KiB; each hop passes a cell on at the size it came; the stream counts them."""
    nodes = net(3)
    downloader, relay, source = nodes
    relay.instrument()
    source.serve = exchange
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    message = os.urandom(e2e.MAX_RECORD_DATA + 100)  # one full record, one short
    stream.sendall(len(message).to_bytes(4, "big"))  # short
    stream.sendall(message)
    assert read_exactly(stream, len(message)) == message[::-1]
    stream.close()
    wait_until(lambda: all(not n.switch.circuits() for n in nodes))
    assert relay.seen is not None
    toward_source = [len(p) for nid, _c, cmd, p in relay.seen if cmd == Cmd.DATA and nid == 1]
    toward_us = [len(p) for nid, _c, cmd, p in relay.seen if cmd == Cmd.DATA and nid == 2]
    full, short = e2e.CELL_BODY, e2e.SHORT_BODY
    # HELLO (full), the length (short), the message (full, short), END (short)
    assert toward_source == [full, short, full, short, short]
    assert toward_us[0] == full and sorted(toward_us[1:]) == [short, full]  # REPLY, reply
    assert stream.cells_sent == 5
    assert stream.cell_bytes_sent == sum(8 + n for n in toward_source)
    assert relay.switch.relayed_bytes == sum(toward_source) + sum(toward_us)


def test_a_short_hello_is_refused_with_one_line(net: Any, monkeypatch: Any, caplog: Any) -> None:
    """The first cell must be full: a HELLO cut to a short cell is refused, named."""
    nodes = net(2)
    nodes[-1].serve = exchange
    encode = e2e.encode_hello
    monkeypatch.setattr(e2e, "encode_hello", lambda *a: encode(*a)[: e2e.SHORT_BODY])
    with caplog.at_level("INFO"), pytest.raises(ProtocolError, match="protocol violation"):
        nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    assert "bad HELLO: HELLO cell is 2040 bytes, expected 32760" in caplog.text
    assert nodes[-1].served == []


def test_the_hello_goes_out_behind_the_create_without_waiting_for_created(net: Any) -> None:
    # The relay swallows the CREATED coming back from the source: the downloader
    # never learns the circuit was built, yet the source gets the HELLO and serves,
    # because the HELLO travelled right behind the CREATE (one round trip saved).
    nodes = net(3)
    downloader, relay, source = nodes
    source.serve = lambda stream: stream.recv(1)
    handle = relay.switch.handle_frame

    def hold_created(link: Any, circ_id: int, cmd: int, payload: memoryview) -> None:
        if cmd != Cmd.CREATED:
            handle(link, circ_id, cmd, payload)

    relay.links.on_frame = hold_created
    building = gevent.spawn(downloader.switch.open_circuit, plan_for(nodes), timeout=2)
    wait_until(lambda: source.served, timeout=5)
    assert source.served[0].request is not None
    assert source.served[0].request.infohash == INFOHASH
    building.join(5)
    assert building.exception is not None  # the downloader itself never saw CREATED


def test_classic_suite_over_memory_transport(net: Any) -> None:
    nodes = net(3, "memory")
    nodes[-1].serve = exchange
    stream = nodes[0].switch.open_circuit(plan_for(nodes, suite_name="classic"), timeout=5)
    message = os.urandom(100_000)
    stream.sendall(len(message).to_bytes(4, "big") + message)
    assert read_exactly(stream, len(message)) == message[::-1]
    stream.close()


def test_recv_into_and_timeouts_over_memory_transport(net: Any) -> None:
    nodes = net(3, "memory")
    gate = gevent.event.Event()

    def slow(stream: CircuitStream) -> None:
        gate.wait()
        stream.sendall(b"hello world")
        stream.close()

    nodes[-1].serve = slow
    stream = nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    stream.settimeout(0.1)
    with pytest.raises(TimeoutError):
        stream.recv(10)
    gate.set()
    stream.settimeout(5)
    buf = bytearray(64)
    n = stream.recv_into(buf)
    while n < 11:
        n += stream.recv_into(memoryview(buf)[n:])
    assert bytes(buf[:n]) == b"hello world"
    assert stream.recv_into(buf) == 0  # END arrived: a clean end of stream
    assert stream.recv(10) == b""


def test_recv_returns_every_buffered_record_that_fits_and_acknowledges_them(net: Any) -> None:
    nodes = net(3, "memory")
    per_round = circuitmod.SENDME_EVERY + 3  # records
    size = per_round * e2e.MAX_RECORD_DATA
    payloads = [os.urandom(size) for _ in range(5)]
    sent: list[CircuitStream] = []
    go = gevent.event.Event()

    def burst(stream: CircuitStream) -> None:
        sent.append(stream)
        for payload in payloads:
            go.wait()
            go.clear()
            stream.sendall(payload)
        stream.close()

    nodes[-1].serve = burst
    stream = nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    for payload in payloads:
        go.set()
        wait_until(lambda: stream.buffered() == size)
        # Everything buffered comes back in one call (one copy), not a record per call.
        assert stream.recv(1 << 30) == payload
        # Records are still acknowledged as they are consumed, or the sender would stall:
        # five rounds need more credit than one window holds.
    assert len(payloads) * per_round > circuitmod.CIRCUIT_WINDOW
    assert stream.recv(100) == b""
    wait_until(lambda: sent[0].closed)


def test_relays_never_see_the_same_bytes(net: Any) -> None:
    nodes = net(4)
    downloader, r1, r2, source = nodes
    source.serve = exchange
    r1.instrument()
    r2.instrument()
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    message = bytes(5 * e2e.MAX_RECORD_DATA)  # zeros: any leak would show at once
    stream.sendall(len(message).to_bytes(4, "big") + message)
    assert read_exactly(stream, len(message)) == message
    stream.close()
    wait_until(lambda: not source.switch.circuits())
    assert r1.seen is not None and r2.seen is not None
    cells1 = [p for nid, _, cmd, p in r1.seen if cmd == Cmd.DATA]
    cells2 = [p for nid, _, cmd, p in r2.seen if cmd == Cmd.DATA]
    assert len(cells1) >= 12 and len(cells1) == len(cells2)
    assert not set(cells1) & set(cells2)
    # Cell by cell, the two relays' views agree no more than random bytes would (1/256).
    for a, b in zip(cells1, cells2, strict=True):
        same = sum(x == y for x, y in zip(a[:4096], b[:4096], strict=True))
        assert same < 4096 * 0.02
    # and no relay sees a run of the zero plaintext
    for cell in cells1 + cells2:
        assert bytes(64) not in cell


# ----------------------------------------------------------------------------- refusals


def test_replayed_create_is_refused_with_break(net: Any) -> None:
    nodes = net(3)
    downloader, relay, source = nodes
    source.serve = exchange
    source.instrument()
    plan = plan_for(nodes)
    first = downloader.switch.open_circuit(plan, timeout=5)
    with pytest.raises(ProtocolError, match="tracking code refused"):
        downloader.switch.open_circuit(plan, timeout=5)
    assert source.seen is not None
    assert [cmd for _, _, cmd, _ in source.seen].count(Cmd.CREATE) == 1  # nothing forwarded
    assert len(relay.relays()) == 1  # the first circuit is untouched
    first.close()


def test_tampered_create_and_unknown_next_hop(net: Any) -> None:
    nodes = net(3)
    plan = plan_for(nodes)
    code = bytearray(plan.tracking_code)
    code[50] ^= 1
    with pytest.raises(ProtocolError, match="tracking code refused"):
        nodes[0].switch.open_circuit(attrs.evolve(plan, tracking_code=bytes(code)), timeout=5)
    # A path through NID 99, which the relay does not have.
    hops = [Hop(nodes[1].identity.onion_public, 99), Hop(nodes[2].identity.onion_public, None)]
    code2, layers = build_tracking_code(hops, current_epoch())
    bad = attrs.evolve(plan_for(nodes), tracking_code=code2, layers=layers)
    with pytest.raises(ProtocolError, match="next hop is not a neighbour"):
        nodes[0].switch.open_circuit(bad, timeout=5)
    assert not nodes[1].switch.circuits()
    assert all(link.circuit_count == 0 for n in nodes for link in n.links.links.values())


def test_a_hello_behind_a_refused_create_is_a_late_frame_not_junk(
    net: Any, monkeypatch: Any
) -> None:
    # The downloader sends its HELLO right behind the CREATE; when the first hop
    # refuses the CREATE, that HELLO arrives for a circuit id it no longer knows.
    # It must not count as junk, or honest refusals would cut the link.
    monkeypatch.setattr(linkmod, "JUNK_BURST", 1)
    monkeypatch.setattr(linkmod, "JUNK_RATE", 1e-6)
    nodes = net(3)
    hops = [Hop(nodes[1].identity.onion_public, 99), Hop(nodes[2].identity.onion_public, None)]
    for _ in range(3):
        code, layers = build_tracking_code(hops, current_epoch())
        bad = attrs.evolve(plan_for(nodes), tracking_code=code, layers=layers)
        with pytest.raises(ProtocolError, match="next hop is not a neighbour"):
            nodes[0].switch.open_circuit(bad, timeout=5)
    gevent.sleep(0.2)  # the last HELLO reaches the relay
    link = nodes[1].links.get(1)
    assert link is not None and not link.closed


def test_source_refuses_unknown_torrent_and_replayed_request(net: Any) -> None:
    nodes = net(3)
    nodes[-1].serve = exchange
    with pytest.raises(ProtocolError, match="source refused the request"):
        nodes[0].switch.open_circuit(plan_for(nodes, infohash=b"\x01" * 20), timeout=5)
    plan = plan_for(nodes)
    nodes[0].switch.open_circuit(plan, timeout=5).close()
    # Same sealed request in a fresh tracking code: the source must not answer it twice.
    again = plan_for(nodes, request_blob=plan.request_blob)
    again = attrs.evolve(again, material=plan.material)
    with pytest.raises(ProtocolError, match="protocol violation"):
        nodes[0].switch.open_circuit(again, timeout=5)
    assert len(nodes[-1].served) == 1


def test_source_refuses_a_request_its_tracker_did_not_sign(net: Any) -> None:
    nodes = net(3)
    nodes[-1].serve = exchange
    impostor = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ProtocolError, match="protocol violation"):
        nodes[0].switch.open_circuit(plan_for(nodes, signer=impostor), timeout=5)
    assert nodes[-1].served == []
    nodes[0].switch.open_circuit(plan_for(nodes), timeout=5).close()  # the real one is served
    assert len(nodes[-1].served) == 1


def test_hello_timeout_at_the_terminal(net: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(circuitmod, "HELLO_TIMEOUT", 0.2)
    nodes = net(2, "memory")
    downloader, source = nodes
    downloader.instrument()
    link = downloader.links.get(1)
    assert link is not None
    circ_id = link.allocate_circ_id()
    link.send(circ_id, Cmd.CREATE, plan_for(nodes).tracking_code)
    wait_until(lambda: downloader.seen and downloader.seen[-1][2] == Cmd.BREAK)
    assert downloader.seen is not None
    assert [cmd for _, c, cmd, _ in downloader.seen if c == circ_id] == [Cmd.CREATED, Cmd.BREAK]
    assert downloader.seen[-1][3] == JOINED_BREAK  # joined: no reason on the wire
    assert not source.switch.circuits()


# ----------------------------------------------------------------------------- teardown


def test_break_mid_stream_reaches_both_ends(net: Any) -> None:
    nodes = net(4)
    downloader, _, r2, source = nodes
    started = gevent.event.Event()

    def stream_forever(stream: CircuitStream) -> None:
        started.set()
        while True:
            stream.sendall(b"x" * 1000)
            gevent.sleep(0.01)

    source.serve = stream_forever
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    assert stream.recv(1000)
    (relay,) = r2.relays()
    relay.end(BreakReason.INTERNAL)
    with gevent.Timeout(2):
        with pytest.raises(CircuitClosed, match="broken by the circuit"):
            while True:
                stream.recv(100000)
        wait_until(lambda: source.served and source.served[0].closed)
    # Only relay 2 knows why: a BREAK carries no reason once a circuit is joined.
    assert source.served[0].closed_reason == "broken by the circuit"
    for node in nodes:
        assert len(node.events.closed) == 1
        assert not node.switch.circuits()
    assert downloader.events.closed[0][1] == "broken by the circuit"
    assert r2.events.closed[0][1] == "internal error"


def test_killing_a_relays_links_breaks_the_circuit_at_both_ends(net: Any) -> None:
    nodes = net(4)
    downloader, r1, _, source = nodes
    source.serve = exchange
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    wait_until(lambda: source.served)
    start = time.monotonic()
    for link in list(r1.links.links.values()):
        link.close(CloseReason(CloseCause.STOPPED, "killed by the test"))
    with gevent.Timeout(1):
        with pytest.raises(CircuitClosed, match="lost"):
            stream.recv(10)
        wait_until(lambda: source.served[0].closed, timeout=1)
    assert time.monotonic() - start < 1
    with pytest.raises(CircuitClosed):
        stream.sendall(b"more")
    assert all(not n.switch.circuits() for n in nodes)


# ----------------------------------------------------------------------------- fairness


def test_stalled_circuit_does_not_block_another_on_the_same_links(net: Any) -> None:
    nodes = net(3)
    downloader, relay, source = nodes
    total = 8 << 20

    def flood(stream: CircuitStream) -> None:
        block = bytes(1 << 20)
        sent = 0
        while sent < total:
            stream.sendall(block)
            sent += len(block)
        stream.close()

    source.serve = flood
    stalled = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    busy = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    # Nobody reads `stalled`; `busy` must still move all its data over the shared links.
    got = 0
    with gevent.Timeout(20):
        while True:
            n = len(busy.recv(1 << 20))
            if not n:
                break
            got += n
    assert got == total
    # The stalled circuit's sender sits on a closed window, with buffers bounded by it.
    wait_until(lambda: source.served[0].send_window == 0)
    assert 0 < stalled.buffered() <= circuitmod.CIRCUIT_WINDOW * e2e.MAX_RECORD_DATA
    in_flight = sum(
        link.queued(circ_id)
        for link in relay.links.links.values()
        for circ_id in relay.switch._ends.get(link, {})
    )
    assert in_flight <= circuitmod.CIRCUIT_WINDOW
    # Reading resumes the flow.
    got = 0
    with gevent.Timeout(20):
        while True:
            n = len(stalled.recv(1 << 20))
            if not n:
                break
            got += n
    assert got == total


def test_sender_ignoring_the_window_is_cut_off(net: Any) -> None:
    nodes = net(3, "memory")

    def greedy(stream: CircuitStream) -> None:
        stream._window = 10**6  # a misbehaving source pretends it has credit
        stream.sendall(bytes((circuitmod.CIRCUIT_WINDOW + 5) * e2e.MAX_RECORD_DATA))

    nodes[-1].serve = greedy
    stream = nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    wait_until(lambda: stream.closed)
    assert stream.closed_reason == "the other end ignored the flow-control window"
    assert stream.buffered() <= circuitmod.CIRCUIT_WINDOW * e2e.MAX_RECORD_DATA
    wait_until(lambda: nodes[-1].served and nodes[-1].served[0].closed)
    # Why travelled end to end, in an END record the relay could not read or change.
    assert nodes[-1].served[0].closed_reason == "the other end failed: protocol violation"


def test_receiver_grows_the_window_and_still_cuts_a_sender_beyond_it(net: Any) -> None:
    nodes = net(3, "memory")
    granted = 8 << 20  # twice the initial window
    sent = gevent.event.Event()

    def fill(stream: CircuitStream) -> None:
        stream.sendall(bytes(granted))  # blocks unless the receiver's grant arrived
        sent.set()
        stream._window = 10**6  # then pretends it has more credit than granted
        stream.sendall(bytes(circuitmod.MAX_CIRCUIT_WINDOW * e2e.MAX_RECORD_DATA))

    nodes[-1].serve = fill
    stream = nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    stream.expect_bytes(granted)
    assert stream.receive_window > circuitmod.CIRCUIT_WINDOW
    # Nobody reads: the sender still got all of the grant out, far past the initial window.
    assert sent.wait(20)
    wait_until(lambda: stream.buffered() >= granted or stream.closed)
    assert stream.buffered() > circuitmod.CIRCUIT_WINDOW * e2e.MAX_RECORD_DATA
    wait_until(lambda: stream.closed)
    assert stream.closed_reason == "the other end ignored the flow-control window"
    assert stream.buffered() <= stream.receive_window * e2e.MAX_RECORD_DATA


def test_relay_queue_overflow_breaks_the_circuit_not_the_link(net: Any) -> None:
    nodes = net(3, "memory")
    downloader, relay, source = nodes
    source.serve = exchange
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    towards_source = relay.links.get(2)
    assert towards_source is not None and towards_source._writer is not None
    towards_source.queue_limit = 8
    towards_source._writer.kill()  # the relay's next link stops draining
    with pytest.raises(CircuitClosed), gevent.Timeout(5):
        while True:
            stream.sendall(bytes(e2e.MAX_RECORD_DATA))
    assert stream.closed_reason == "broken by the circuit"
    assert relay.events.closed[0][1] == "queue overflow"
    towards_downloader = relay.links.get(1)
    assert towards_downloader is not None and not towards_downloader.closed
    assert not relay.switch.circuits()


def test_a_create_flood_is_rate_limited_per_neighbour(net: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(linkmod, "CREATE_BURST", 3)
    monkeypatch.setattr(linkmod, "CREATE_RATE", 0.01)
    nodes = net(3, "memory")
    nodes[-1].serve = exchange
    for _ in range(3):
        nodes[0].switch.open_circuit(plan_for(nodes), timeout=5).close()
    with pytest.raises(ProtocolError, match="rate limited"):
        nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    # Refused before any onion work: the relay's replay cache holds only the three.
    assert nodes[1].switch._reader.cached_tags() == 3


def test_our_circuit_waits_for_room_on_a_full_link_instead_of_breaking(net: Any) -> None:
    nodes = net(3, "memory")
    downloader, _, source = nodes
    received: list[int] = []

    def count(stream: CircuitStream) -> None:
        while data := stream.recv(1 << 20):
            received.append(len(data))

    source.serve = count
    stream = downloader.switch.open_circuit(plan_for(nodes), timeout=5)
    first_hop = downloader.links.get(1)
    assert first_hop is not None and first_hop._writer is not None
    first_hop.link_limit = 4
    first_hop._writer.kill()  # the link stops draining
    sender = gevent.spawn(stream.sendall, bytes(8 * e2e.MAX_RECORD_DATA))
    gevent.sleep(0.2)
    assert not sender.ready() and stream.closed_reason is None  # waiting, not broken
    assert first_hop.queued() == 4
    first_hop._writer = gevent.spawn(first_hop._write_loop)
    sender.get(timeout=5)
    wait_until(lambda: sum(received) == 8 * e2e.MAX_RECORD_DATA)
    stream.close()


def test_circuits_per_link_are_bounded(net: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(linkmod, "MAX_CIRCUITS_PER_LINK", 2)
    nodes = net(3, "memory")
    nodes[-1].serve = exchange
    streams = [nodes[0].switch.open_circuit(plan_for(nodes), timeout=5) for _ in range(2)]
    with pytest.raises(ProtocolError, match="too many circuits"):
        nodes[0].switch.open_circuit(plan_for(nodes), timeout=5)
    for s in streams:
        s.close()
    wait_until(lambda: not nodes[1].switch.circuits())
    nodes[0].switch.open_circuit(plan_for(nodes), timeout=5).close()


def test_many_circuits_share_the_links_evenly(net: Any) -> None:
    nodes = net(3)
    downloader, _, source = nodes
    size = 4 << 20
    count = 8

    def send(stream: CircuitStream) -> None:
        stream.sendall(os.urandom(16) + bytes(size - 16))
        stream.close()

    source.serve = send
    streams = [downloader.switch.open_circuit(plan_for(nodes), timeout=5) for _ in range(count)]
    progress = [0] * count
    first_done: list[list[int]] = []

    def read(i: int) -> None:
        while True:
            n = len(streams[i].recv(1 << 20))
            if not n:
                break
            progress[i] += n
        if not first_done:
            first_done.append(list(progress))

    with gevent.Timeout(30):
        gevent.joinall([gevent.spawn(read, i) for i in range(count)], raise_error=True)
    assert progress == [size] * count
    # When the first circuit finished, every other one was well under way (windows and
    # round-robin queues; tests/test_link.py checks the round-robin order itself).
    assert min(first_done[0]) >= size // 4
