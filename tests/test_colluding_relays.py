"""Two colluding relays around an honest one try to link a circuit (issue 11, items 2 and 3).

A 3-relay circuit over real TLS links on loopback: downloader, relay 1, relay 2
(honest), relay 3, source. Relays 1 and 3 are hostile: relay 1 plants a signal,
relay 3 looks for it. With a signal that crosses relay 2, the two know they
carry the same circuit, which is most of the way to knowing who talks to whom.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import pytest
from test_circuit import Node, net, plan_for, wait_until  # noqa: F401  (net: fixture)

from anomos.net.circuit import CircuitClosed, CircuitStream
from anomos.net.frames import BreakReason, Cmd
from anomos.net.link import Link
from anomos.protocol import e2e

MARK = 0x5A


def test_a_break_reason_planted_by_relay_1_never_reaches_relay_3(net: Any) -> None:  # noqa: F811
    nodes: list[Node] = net(5)
    downloader, r1, _r2, r3, source = nodes
    source.serve = lambda stream: stream.recv(1)  # hold the circuit until it breaks
    r3.instrument()
    assert r3.seen is not None
    from_r2 = 3  # NID of the link relay 2 -> relay 3 in the chain
    received: dict[int, bytes] = {}
    for planted in (0x00, 0x01, 0x5A, 0xA5, 0xFF):
        stream = downloader.switch.open_circuit(plan_for(nodes), timeout=10)
        (relay,) = r1.relays()
        before = len(r3.seen)
        # Relay 1 sends a BREAK of its own towards relay 2, with the bits it chose,
        # and tears its end down (the downloader gets a BREAK of its own).
        relay.next_link.send(relay.next_id, Cmd.BREAK, bytes([planted]), force=True)
        relay.end(BreakReason.CLOSED, (relay.next_link, relay.next_id))

        def breaks(before: int = before) -> list[bytes]:
            assert r3.seen is not None
            return [p for nid, _, cmd, p in r3.seen[before:] if cmd == Cmd.BREAK and nid == from_r2]

        wait_until(breaks, timeout=10)
        received[planted] = breaks()[0]
        wait_until(lambda: not any(n.switch.circuits() for n in nodes), timeout=10)
        assert stream.closed
    # What relay 3 reads is the same whatever relay 1 planted: no bits cross relay 2.
    assert len(set(received.values())) == 1, f"relay 3 read what relay 1 planted: {received}"
    assert stream.closed_reason == "broken by the circuit"


@attrs.define
class Marker:
    """A hostile relay: XORs MARK into byte ``pos`` of DATA cell ``index`` it sends on ``link``."""

    link: Link
    circ_id: int
    index: int
    pos: int
    sent: int = 1  # the HELLO already went through

    def apply(self, payload: Any) -> Any:
        if self.sent == self.index:
            payload = bytearray(payload)
            payload[self.pos] ^= MARK
        self.sent += 1
        return payload


@attrs.define
class Watched:
    """A 3-relay circuit whose source collects what arrives, and relays 1 and 3 on it."""

    stream: CircuitStream
    got: bytearray
    ended: list[CircuitStream]
    at_r1: Any
    at_r3: Any


def open_watched(nodes: list[Node]) -> Watched:
    """Open a circuit downloader -> relays 1, 2, 3 -> source (``nodes`` in that order)."""
    got = bytearray()
    ended: list[CircuitStream] = []

    def collect(stream: CircuitStream) -> None:
        ended.append(stream)
        try:
            while data := stream.recv(1 << 20):
                got.extend(data)
        except CircuitClosed:
            pass

    nodes[-1].serve = collect
    stream = nodes[0].switch.open_circuit(plan_for(nodes), timeout=10)
    (at_r1,) = nodes[1].relays()
    (at_r3,) = nodes[3].relays()
    return Watched(stream, got, ended, at_r1, at_r3)


def turn_hostile(monkeypatch: Any, relays: list[Any]) -> None:
    """Each DATA cell a hostile relay (``link``, ``circ_id``, ``apply``) sends on its
    circuit goes through its ``apply`` first."""
    send = Link.send

    def hostile_send(self: Link, circ_id: int, cmd: int, payload: Any = b"", **kw: Any) -> bool:
        for r in relays:
            if self is r.link and circ_id == r.circ_id and cmd == Cmd.DATA:
                payload = r.apply(payload)
        return send(self, circ_id, cmd, payload, **kw)

    monkeypatch.setattr(Link, "send", hostile_send)


def test_a_mark_xored_in_by_relay_1_and_out_by_relay_3_kills_the_circuit(
    net: Any,  # noqa: F811
    monkeypatch: Any,
) -> None:
    nodes: list[Node] = net(5)
    c = open_watched(nodes)
    stream, got, ended = c.stream, c.got, c.ended
    tagged = 3  # the HELLO was cell 0: cells 1 and 2 are the first two records
    markers = [
        # Relay 1 marks the cell after removing its layer, relay 3 XORs the same mark
        # out after removing its own: with XOR-malleable layers the two cancel.
        Marker(c.at_r1.next_link, c.at_r1.next_id, tagged, 1000),
        Marker(c.at_r3.next_link, c.at_r3.next_id, tagged, 1000),
    ]
    turn_hostile(monkeypatch, markers)
    message = os.urandom(8 * e2e.MAX_RECORD_DATA)
    stream.sendall(message)
    wait_until(lambda: len(got) == len(message) or (ended and ended[0].closed), timeout=15)
    assert all(m.sent > tagged for m in markers), "the marked cell went through both"
    assert len(got) != len(message), (
        "the marked cell crossed relay 2 and arrived intact: relays 1 and 3 linked the circuit"
    )
    wait_until(lambda: ended[0].closed and stream.closed, timeout=15)
    # Nothing from the marked cell on was delivered: only the two records before it.
    delivered = (tagged - 1) * e2e.MAX_RECORD_DATA
    assert bytes(got) == message[:delivered]
    assert "failed authentication" in (ended[0].closed_reason or "")
    # The source said why, end to end through the relays (an END record, not the BREAK).
    assert stream.closed_reason == "the other end failed: protocol violation"
    wait_until(lambda: not any(n.switch.circuits() for n in nodes), timeout=10)


@attrs.define
class Resizer:
    """A hostile relay changing the size of DATA cell ``index`` it sends on ``link``: a
    short cell padded to a full one, a full one cut to a short one (``cut`` keeps what
    was cut, for the colluder, which puts the size back: ``restore``)."""

    link: Link
    circ_id: int
    index: int
    restore: bool
    cut: dict[str, bytes]
    sent: int = 1  # the HELLO already went through
    sizes: list[int] = attrs.field(factory=list)

    def apply(self, payload: Any) -> Any:
        if self.sent == self.index:
            body = bytearray(payload)
            if self.restore:  # relay 3: back to the size the cell had at relay 1
                if len(body) == e2e.CELL_BODY:
                    del body[e2e.SHORT_BODY :]
                else:
                    body += self.cut["tail"]
            elif len(body) == e2e.SHORT_BODY:  # relay 1: pad a short cell to full
                body += os.urandom(e2e.CELL_BODY - e2e.SHORT_BODY)
            else:  # relay 1: cut a full cell short
                self.cut["tail"] = bytes(body[e2e.SHORT_BODY :])
                del body[e2e.SHORT_BODY :]
            payload = bytes(body)
        self.sizes.append(len(payload))
        self.sent += 1
        return payload


@pytest.mark.parametrize("cells", ["short", "full"])
def test_a_cell_resized_by_relay_1_and_restored_by_relay_3_kills_the_circuit(
    net: Any,  # noqa: F811
    monkeypatch: Any,
    cells: str,
) -> None:
    """The size class as a tag over real TLS links and relays: relay 1 pads one of the
    downloader's short cells to a full one (or cuts a full one short), relay 3, past
    the honest relay 2, sees the other size and puts the cell back as it was (with
    the very bytes relay 1 cut). The circuit must die, not carry the mark."""
    nodes: list[Node] = net(5)
    c = open_watched(nodes)
    stream, got, ended = c.stream, c.got, c.ended
    tagged = 3  # the HELLO was cell 0: cells 1 and 2 are the first two records
    cut: dict[str, bytes] = {}
    resizers = [
        Resizer(c.at_r1.next_link, c.at_r1.next_id, tagged, False, cut),
        Resizer(c.at_r3.next_link, c.at_r3.next_id, tagged, True, cut),
    ]
    turn_hostile(monkeypatch, resizers)
    size = 100 if cells == "short" else e2e.MAX_RECORD_DATA
    message = os.urandom(8 * size)
    for i in range(8):  # one record each
        stream.sendall(message[i * size : (i + 1) * size])
    wait_until(lambda: len(got) == len(message) or (ended and ended[0].closed), timeout=15)
    body = e2e.SHORT_BODY if cells == "short" else e2e.CELL_BODY
    other = e2e.CELL_BODY + e2e.SHORT_BODY - body
    r1_sent, r3_sent = resizers[0].sizes, resizers[1].sizes
    assert r1_sent[tagged - 1] == other, "relay 1 changed the cell's size"
    assert r3_sent[: tagged - 1] == [body] * (tagged - 1)
    assert r3_sent[tagged - 1] == body, "relay 3 put the size back"
    wait_until(lambda: ended[0].closed and stream.closed, timeout=15)
    # Nothing from the resized cell on was delivered: only the two records before it.
    assert bytes(got) == message[: (tagged - 1) * size]
    assert "failed authentication" in (ended[0].closed_reason or "")
    assert stream.closed_reason == "the other end failed: protocol violation"
    wait_until(lambda: not any(n.switch.circuits() for n in nodes), timeout=10)
