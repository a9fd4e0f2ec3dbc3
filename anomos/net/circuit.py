"""Circuit switching over neighbour links: relays, endpoints, BREAK.

A CREATE carries a tracking code. Each hop peels it with its onion key
(:class:`~anomos.protocol.onion.OnionReader`, which also refuses replays):
a *relay* learns only the NID of the next hop and its own layer keys, picks a
fresh circuit id on that link, forwards the peeled code and from then on
switches DATA cells between the two ``(link, circuit id)`` ends, removing its
forward layer on the way out and adding its backward layer on the way back,
so no two links of a circuit carry the same bytes, and a cell changed on the
way arrives as noise (:mod:`anomos.protocol.layers`). The *terminal* (the source)
answers CREATED, opens the downloader's sealed request from the HELLO cell,
agrees end-to-end keys with the cipher suite and answers a REPLY; both ends
then exchange :mod:`anomos.protocol.e2e` records through a socket-like
:class:`CircuitStream`.

Relays never originate or read DATA. Flow control is end to end: a sender may
have at most its window of DATA records unacknowledged, :data:`CIRCUIT_WINDOW`
at first; the receiver returns a SENDME record for every :data:`SENDME_EVERY`
records its application consumed, and may grant more (extra SENDMEs, up to
:data:`MAX_CIRCUIT_WINDOW`) when its application expects more bytes in flight
(:meth:`CircuitStream.expect_bytes`: the downloader's request window, itself
sized by rate x RTT). Every queue on the way is bounded by that window, so a
relay whose per-circuit queue still overflows is facing a misbehaving end and
breaks that circuit, never the link. BREAK travels hop by hop and both ends
learn of it; losing a link breaks every circuit on it in both directions. Once
a hop has joined a circuit, every BREAK it sends carries the same fixed payload
(:data:`~anomos.net.frames.JOINED_BREAK`), whatever it received: a relay never
passes on a value another relay chose. Why a circuit ended travels end to end
instead, inside the layers and the AEAD (an END record's reason, the source's
refusal cell).
"""

from __future__ import annotations

import enum
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
import gevent
import gevent.event
import gevent.lock
import gevent.pool

from anomos.errors import AnomosError, CryptoError, ProtocolError
from anomos.net.frames import HEADER_SIZE, JOINED_BREAK, BreakReason, Cmd, describe_break
from anomos.protocol import e2e
from anomos.protocol.layers import HEAD as LAYER_SCRATCH
from anomos.protocol.layers import OnionLayer
from anomos.protocol.onion import OnionReader
from anomos.protocol.replay import peer_replay_files
from anomos.protocol.request import SeenRequests, SourceRequest, open_request

if TYPE_CHECKING:
    from anomos.identity import PeerIdentity
    from anomos.net.link import CellBuffers, CloseReason, Link, LinkManager
    from anomos.pluginmanager import Plugins

log = logging.getLogger(__name__)

_DATA = int(Cmd.DATA)
#: ``sendall`` flag: more data follows at once (Linux's value where the platform lacks it).
MSG_MORE = getattr(socket, "MSG_MORE", 0x8000)

#: DATA records a sender may have in flight per direction at first (each carries
#: up to ~32 KiB); the receiver grows it with :meth:`CircuitStream.expect_bytes`.
CIRCUIT_WINDOW = 128
#: The most a receiver grants (16 MiB): what a relay may have to queue per circuit.
MAX_CIRCUIT_WINDOW = 512
#: The receiver acknowledges consumed records in groups of this many.
SENDME_EVERY = 32
#: Seconds a terminal waits for the HELLO after answering CREATED.
HELLO_TIMEOUT = 30.0
#: Seconds one of our circuits waits for room on a link whose whole queue is full
#: (then it sends anyway and, if the link still refuses, the circuit breaks).
LINK_ROOM_TIMEOUT = 20.0

#: ``on_request(request)`` returns the function that will serve the stream, or None.
RequestHandler = Callable[[SourceRequest], "Callable[[CircuitStream], None] | None"]


class CircuitState(enum.Enum):
    """Where one of our circuit ends stands, in the order a circuit is built."""

    #: The downloader sent CREATE and waits for CREATED.
    CREATING = "creating"
    #: The downloader's circuit is built; it waits for the source's REPLY.
    AWAITING_REPLY = "awaiting reply"
    #: The source answered CREATED and waits for the downloader's HELLO.
    AWAITING_HELLO = "awaiting hello"
    #: End-to-end keys agreed: records flow.
    OPEN = "open"
    CLOSED = "closed"


#: How far along the downloader's set-up each state is (:meth:`CircuitStream.wait_for`).
_SETUP_ORDER = {CircuitState.CREATING: 0, CircuitState.AWAITING_REPLY: 1, CircuitState.OPEN: 2}


class CircuitEnd(Protocol):
    """What the switch keeps per ``(link, circuit id)``: a relay circuit or a stream."""

    @property
    def established(self) -> bool:
        """Whether DATA on it is the circuit's traffic (counted in the neighbour's receipts)."""
        ...

    def on_frame(self, link: Link, circ_id: int, cmd: int, payload: memoryview) -> None:
        """A frame for this circuit arrived on ``link``."""
        ...

    def on_link_lost(self, link: Link, reason: CloseReason) -> None:
        """``link``, which this circuit uses, is gone."""
        ...

    def close(self) -> None:
        """Tear the circuit down (the peer stops)."""
        ...


class CircuitClosed(ConnectionResetError):
    """The circuit under a :class:`CircuitStream` broke; an OSError like a reset socket."""


@attrs.define(eq=False)
class RelayCircuit:
    """A circuit passing through this peer: two ends and this hop's layers."""

    switch: CircuitSwitch = attrs.field(repr=False)
    prev_link: Link = attrs.field(repr=False)
    prev_id: int
    next_link: Link = attrs.field(repr=False)
    next_id: int
    forward: OnionLayer = attrs.field(repr=False)
    backward: OnionLayer = attrs.field(repr=False)
    opened: bool = False
    closed: bool = False
    #: Cell bytes this relay forwarded, both directions.
    relayed: int = 0
    #: Where each forwarded cell's layer is written (the peer's, given back once sent).
    cells: CellBuffers = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.cells = self.switch.links.cells

    @property
    def established(self) -> bool:
        return self.opened

    @property
    def prev_nid(self) -> int:
        return self.prev_link.nid

    @property
    def next_nid(self) -> int:
        return self.next_link.nid

    def on_frame(self, link: Link, circ_id: int, cmd: int, payload: memoryview) -> None:
        forward = link is self.prev_link and circ_id == self.prev_id
        if cmd == _DATA:
            # Into a new buffer of our own (the link sends it later); 16 bytes of scratch.
            size = len(payload)
            out = self.cells.take()
            if forward:
                self.forward.remove_into(payload, out)
                ok = self.next_link.send_cell(self.next_id, out, size)
            else:
                self.backward.add_into(payload, out)
                ok = self.prev_link.send_cell(self.prev_id, out, size)
            self.relayed += size  # (the switch adds it up when asked, and at the end)
            self.prev_link.relayed += size  # (per link: the daemon's neighbourhood view)
            self.next_link.relayed += size
            if not ok:
                self.end(BreakReason.OVERFLOW, discard=True)
        elif cmd == Cmd.BREAK:
            # Its reason is for our log only: what we send on is JOINED_BREAK.
            self.end(payload[0], (link, circ_id))
        elif cmd == Cmd.CREATED and not forward and not self.opened:
            self.opened = True
            self.prev_link.send(self.prev_id, Cmd.CREATED)
            self.switch.notify_opened(self)
        else:
            log.info("relay circuit from NID %d: unexpected %s", link.nid, Cmd(cmd).name)
            self.end(BreakReason.PROTOCOL)

    def on_link_lost(self, link: Link, reason: CloseReason) -> None:
        self.end(BreakReason.LINK_LOST)

    def close(self) -> None:
        self.end(BreakReason.CLOSED)

    def end(
        self, code: int, origin: tuple[Link, int] | None = None, *, discard: bool = False
    ) -> None:
        """Tear the circuit down, sending BREAK on every end but ``origin``.

        ``code`` is why, for our own hook and log; the BREAK carries
        :data:`JOINED_BREAK`, never ``code`` and never what ``origin`` sent.
        """
        if self.closed:
            return
        self.closed = True
        self.switch.count_relayed(self.relayed)
        for link, circ_id in ((self.prev_link, self.prev_id), (self.next_link, self.next_id)):
            self.switch.forget(link, circ_id)
            if origin != (link, circ_id) and not link.closed:
                if discard:
                    link.discard(circ_id)
                link.send(circ_id, Cmd.BREAK, JOINED_BREAK, force=True)
            link.release_circ_id(circ_id)
        if self.opened:
            self.switch.notify_closed(self, describe_break(code))


@attrs.define(eq=False)
class CircuitStream:
    """One end of a circuit, socket-like, so a BitTorrent session runs over it unchanged.

    ``recv`` returns ``b""`` once the other end closed cleanly (its END record
    arrived); after a BREAK or a lost link, ``recv`` (once buffered data is
    read) and ``sendall`` raise :class:`CircuitClosed`.
    """

    switch: CircuitSwitch = attrs.field(repr=False)
    link: Link = attrs.field(repr=False)
    circ_id: int
    #: True at the downloader, False at the source.
    initiator: bool
    #: Layers added to what we send (the far end's first) and removed from what we get.
    _send_layers: list[OnionLayer] = attrs.field(repr=False)
    _recv_layers: list[OnionLayer] = attrs.field(repr=False)
    #: At the source: the request the downloader sent.
    request: SourceRequest | None = attrs.field(default=None, repr=False)
    #: At the source: the early data its HELLO carried for the application (or b"").
    early: bytes = attrs.field(default=b"", repr=False)
    state: CircuitState = CircuitState.CREATING
    #: Why the circuit closed, once it has.
    closed_reason: str | None = None
    _channel: e2e.E2EChannel | None = attrs.field(default=None, repr=False)
    #: Set at each step of the set-up (and when the circuit ends).
    _progress: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    #: At the downloader: the cipher suite and its state until the REPLY.
    _suite: Any = attrs.field(default=None, repr=False, kw_only=True)
    _suite_state: Any = attrs.field(default=None, repr=False, kw_only=True)
    #: Received data, views of the decrypted records.
    _chunks: deque[memoryview] = attrs.field(factory=deque, repr=False)
    _offset: int = attrs.field(default=0, repr=False)
    _readable: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    _window: int = attrs.field(factory=lambda: CIRCUIT_WINDOW, repr=False)
    #: Records we allow the other end to have in flight to us (grown by expect_bytes).
    _recv_window: int = attrs.field(factory=lambda: CIRCUIT_WINDOW, repr=False)
    _window_open: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    _unacked: int = attrs.field(default=0, repr=False)
    _consumed: int = attrs.field(default=0, repr=False)
    _eof: bool = attrs.field(default=False, repr=False)
    _timeout: float | None = attrs.field(default=None, repr=False)
    _send_lock: gevent.lock.Semaphore = attrs.field(factory=gevent.lock.Semaphore, repr=False)
    #: The partial record a ``MSG_MORE`` send held back (see :meth:`sendall`).
    _held: bytes = attrs.field(default=b"", repr=False)
    _timer: Any = attrs.field(default=None, repr=False)
    _notified: bool = attrs.field(default=False, repr=False)
    bytes_sent: int = 0
    bytes_received: int = 0
    #: DATA cells this end sent (first cell and records, short and full) and their
    #: bytes on the links, frame headers included: what the circuit cost us.
    cells_sent: int = 0
    cell_bytes_sent: int = 0
    #: The ``sendall`` flag under which this stream holds a partial record back
    #: (a BitTorrent session corks circuits with it, never plain sockets).
    more_flag: ClassVar[int] = MSG_MORE

    def __attrs_post_init__(self) -> None:
        self._window_open.set()

    # ------------------------------------------------------------------ socket API
    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Send everything, waiting for the window; raise CircuitClosed if the circuit broke.

        With ``MSG_MORE`` in ``flags`` (as on a TCP socket: the caller sends again at
        once), a last partial record is held back and filled by the next call, so
        a stream of bursts travels in full cells; any call without it sends all.
        """
        view = memoryview(data).cast("B")
        step = e2e.MAX_RECORD_DATA
        with self._send_lock:
            held = self._held
            if held:
                take = step - len(held)
                if len(view) < take and flags & MSG_MORE:
                    self._held = held + view
                    return
                self._held = b""
                self._send_data(held + view[:take])
                view = view[take:]
            end = len(view)
            if flags & MSG_MORE:
                end -= end % step
                if end < len(view):
                    self._held = bytes(view[end:])
            for start in range(0, end, step):
                self._send_data(view[start : start + step])

    def _send_data(self, chunk: bytes | memoryview) -> None:
        """One DATA record, once the window allows (the send lock held)."""
        if self._window <= 0 or self.state is not CircuitState.OPEN:
            self._wait_window()
        self._window -= 1
        if self._window <= 0:
            self._window_open.clear()
        self._send_record(e2e.DATA, chunk)
        self.bytes_sent += len(chunk)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        self.sendall(data)
        return len(data)

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes; ``b""`` at a clean end of the stream."""
        if bufsize <= 0:
            return b""
        if not self._chunks:
            self._wait_readable()
            if not self._chunks:
                return b""
        chunks = self._chunks
        chunk = chunks[0]
        off = self._offset
        left = len(chunk) - off
        if bufsize < left:
            self._offset = off + bufsize
            return bytes(chunk[off : off + bufsize])
        if len(chunks) == 1 or left + len(chunks[1]) > bufsize:
            out = bytes(chunk[off:])
            self._consume_chunk()
            return out
        # Several whole records fit: one copy for all of them, and the reader
        # (a BitTorrent session) handles them in one go instead of one by one.
        parts = [chunk[off:]]
        size = left
        self._consume_chunk()
        while chunks and size + len(chunks[0]) <= bufsize:
            parts.append(chunks[0])
            size += len(chunks[0])
            self._consume_chunk()
        return b"".join(parts)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Fill ``buffer`` with what is buffered (at least one byte, or 0 at end of stream)."""
        target = memoryview(buffer).cast("B")
        want = nbytes or len(target)
        if want <= 0:
            return 0
        if not self._chunks:
            self._wait_readable()
        done = 0
        while done < want and self._chunks:
            chunk = self._chunks[0]
            off = self._offset
            n = min(want - done, len(chunk) - off)
            target[done : done + n] = memoryview(chunk)[off : off + n]
            done += n
            if off + n == len(chunk):
                self._consume_chunk()
            else:
                self._offset = off + n
        return done

    def close(self) -> None:
        """End the stream cleanly (END record) and tear the circuit down."""
        if self.state is CircuitState.CLOSED:
            return
        if self.state is CircuitState.OPEN and not self.link.closed:
            try:
                if self._held and not self._send_lock.locked():
                    self.sendall(b"")
                self._send_record(e2e.END, b"")
            except (OSError, AnomosError):
                pass
        self._end(BreakReason.CLOSED, "closed")

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self.state is CircuitState.CLOSED

    def buffered(self) -> int:
        """Bytes received and not yet read."""
        return sum(len(c) for c in self._chunks) - self._offset

    def expect_bytes(self, nbytes: int) -> None:
        """The application expects up to ``nbytes`` in flight to us: grant the sender a
        window that large (never shrinks; at most :data:`MAX_CIRCUIT_WINDOW` records)."""
        records = -(-nbytes // e2e.MAX_RECORD_DATA) + SENDME_EVERY
        records = min(MAX_CIRCUIT_WINDOW, -(-records // SENDME_EVERY) * SENDME_EVERY)
        if records <= self._recv_window or self.state is not CircuitState.OPEN:
            return
        for _ in range((records - self._recv_window) // SENDME_EVERY):
            self._send_record(e2e.SENDME, b"")
        self._recv_window = records

    @property
    def established(self) -> bool:
        return self.state is CircuitState.OPEN

    # ------------------------------------------------------------------ set-up
    def send_hello(self, hello: bytes) -> None:
        """At the downloader: the HELLO cell (sealed request and suite hello), sent
        right behind the CREATE."""
        self._send_body(hello)

    def wait_for(self, state: CircuitState) -> None:
        """At the downloader: block until the set-up reached ``state``; raise
        :class:`CircuitClosed` if the circuit ended first."""
        while True:
            if self.state is CircuitState.CLOSED:
                raise CircuitClosed(f"circuit closed: {self.closed_reason}")
            if _SETUP_ORDER.get(self.state, -1) >= _SETUP_ORDER[state]:
                return
            self._progress.clear()
            self._progress.wait()

    def abandon(self, reason: str) -> None:
        """Give up on a circuit whose set-up took too long (or was interrupted)."""
        self._end(BreakReason.TIMEOUT, reason)

    def expect_hello(self, timeout: float) -> gevent.Greenlet:
        """At the source: fail the circuit unless :meth:`accept` comes within ``timeout``."""
        self._timer = gevent.spawn_later(
            timeout, self._fail, BreakReason.TIMEOUT, "no HELLO in time"
        )
        return self._timer

    def accept(
        self, request: SourceRequest, channel: e2e.E2EChannel, reply: bytes, early: bytes = b""
    ) -> bool:
        """At the source: answer a good HELLO with the REPLY and open; False if the
        circuit broke meanwhile."""
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None
        self.request = request
        self.early = early
        try:
            self._send_body(e2e.encode_reply(reply))
        except CircuitClosed:
            return False
        self._channel = channel
        self._opened()
        return True

    def refuse(self, code: int, reason: str) -> None:
        """At the source, before keys exist: say why in a refusal cell, then break."""
        log.info("circuit %#x on NID %d: %s", self.circ_id, self.link.nid, reason)
        try:
            self._send_body(e2e.encode_refusal(code))
        except CircuitClosed:
            return
        self._end(code, reason)

    def on_link_lost(self, link: Link, reason: CloseReason) -> None:
        self._end(None, f"link to NID {link.nid} lost: {reason}")

    def _opened(self) -> None:
        self.state = CircuitState.OPEN
        self._window_open.set()
        self._progress.set()
        self._notified = True
        self.switch.notify_opened(self)

    @property
    def receive_window(self) -> int:
        """DATA records the other end may have in flight to us."""
        return self._recv_window

    @property
    def send_window(self) -> int:
        """DATA records this end may still send before it needs a SENDME."""
        return self._window

    # ------------------------------------------------------------------ internals
    def _wait_window(self) -> None:
        event = self._window_open
        while True:
            if self.state is CircuitState.CLOSED:
                raise CircuitClosed(f"circuit closed: {self.closed_reason}")
            if self._eof:
                raise BrokenPipeError("the other end closed the circuit")
            if self._window > 0 and self.state is CircuitState.OPEN:
                return
            event.clear()
            if not event.wait(self._timeout):
                raise TimeoutError("circuit send timed out")

    def _wait_readable(self) -> None:
        while not self._chunks:
            if self._eof:
                return
            if self.state is CircuitState.CLOSED:
                raise CircuitClosed(f"circuit closed: {self.closed_reason}")
            self._readable.clear()
            if not self._readable.wait(self._timeout):
                raise TimeoutError("circuit recv timed out")

    def _consume_chunk(self) -> None:
        self._chunks.popleft()
        self._offset = 0
        self._consumed += 1
        if self._consumed >= SENDME_EVERY and self.state is CircuitState.OPEN:
            self._consumed -= SENDME_EVERY
            self._unacked -= SENDME_EVERY
            self._send_record(e2e.SENDME, b"")

    def _send_record(self, kind: int, data: Any) -> None:
        """Seal one record (in a short cell when its data fits) and queue it."""
        assert self._channel is not None
        sealed = self.switch.cell_buffers()[0]
        size = self._channel.seal_into(kind, data, sealed)
        self._send_body(memoryview(sealed)[:size])

    def _send_body(self, record: bytes | bytearray | memoryview) -> None:
        """Add the layers and queue the cell."""
        if self.state is CircuitState.CLOSED:
            raise CircuitClosed(f"circuit closed: {self.closed_reason}")
        cell = self._wrap(record)
        link = self.link
        if link.over_limit():
            link.wait_for_room(LINK_ROOM_TIMEOUT)  # our own circuit waits; a relay's is refused
        if not link.send_cell(self.circ_id, cell, len(record)):
            reason = f"link to NID {self.link.nid} lost" if self.link.closed else "send queue full"
            self._end(BreakReason.OVERFLOW, reason)
            raise CircuitClosed(f"circuit closed: {reason}")
        self.cells_sent += 1
        self.cell_bytes_sent += HEADER_SIZE + len(record)

    def _wrap(self, record: bytes | bytearray | memoryview) -> bytearray:
        """A buffer of the peer's :class:`CellBuffers` holding the cell with our layers
        added (between layers it passes through the switch's cell buffers)."""
        view = memoryview(record).cast("B")
        size = len(view)
        out = self.switch.links.cells.take()
        layers = self._send_layers
        if not layers:
            out[:size] = view
            return out
        buffers = self.switch.cell_buffers()
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            target = out if i == last else buffers[(i + 1) & 1]
            layer.add_into(view, target)
            view = memoryview(target)[:size]
        return out

    def _peel(self, payload: memoryview) -> memoryview:
        """The cell with every layer removed (valid until the next frame, like ``payload``).

        Through the switch's two cell buffers in turn: whatever reads the cell
        copies what it keeps (the AEAD decrypts into a new buffer) before anything
        can yield, so no cell costs a fresh allocation per layer.
        """
        buffers = self.switch.cell_buffers()
        size = len(payload)
        view = payload
        for i, layer in enumerate(self._recv_layers):
            out = buffers[i & 1]
            layer.remove_into(view, out)
            view = memoryview(out)[:size]
        return view

    def on_frame(self, link: Link, circ_id: int, cmd: int, payload: memoryview) -> None:
        if cmd == Cmd.DATA:
            if self.state is CircuitState.OPEN:
                self._on_record(self._peel(payload))
            elif self.state is CircuitState.AWAITING_REPLY:
                self._on_reply(self._peel(payload))
            elif self.state is CircuitState.AWAITING_HELLO:
                self.switch.on_hello(self, self._peel(payload))
            else:
                self._fail(BreakReason.PROTOCOL, "DATA before CREATED")
        elif cmd == Cmd.CREATED and self.state is CircuitState.CREATING and self.initiator:
            self.state = CircuitState.AWAITING_REPLY
            self._progress.set()
        elif cmd == Cmd.BREAK:
            if bytes(payload) == JOINED_BREAK:
                self._end(None, "broken by the circuit")
            else:  # the first hop refusing our CREATE says why
                self._end(None, f"broken by the circuit: {describe_break(payload[0])}")
        else:
            self._fail(
                BreakReason.PROTOCOL, f"unexpected {Cmd(cmd).name} in state {self.state.value}"
            )

    def _on_reply(self, body: memoryview) -> None:
        try:
            reply = e2e.decode_reply(body)
        except e2e.SourceRefused as exc:
            self._end(BreakReason.CLOSED, f"refused by the source: {describe_break(exc.reason)}")
            return
        except AnomosError as exc:
            self._fail(BreakReason.PROTOCOL, f"bad REPLY: {exc}")
            return
        try:
            keys = self._suite.initiator_finish(self._suite_state, reply)
            self._channel = e2e.E2EChannel(keys)
        except AnomosError as exc:
            self._fail(BreakReason.PROTOCOL, f"bad REPLY: {exc}")
            return
        self._suite_state = None
        self._opened()

    def _on_record(self, body: memoryview) -> None:
        assert self._channel is not None
        try:
            kind, data = self._channel.open_view(body)
        except CryptoError as exc:
            self._fail(BreakReason.PROTOCOL, str(exc))
            return
        if kind == e2e.DATA:
            if self._eof:
                self._fail(BreakReason.PROTOCOL, "DATA after END")
                return
            self._unacked += 1
            if self._unacked > self._recv_window:
                self._fail(BreakReason.PROTOCOL, "the other end ignored the flow-control window")
                return
            self.bytes_received += len(data)
            if data:
                self._chunks.append(data)
                self._readable.set()
            else:
                self._consumed += 1
        elif kind == e2e.SENDME:
            self._window += SENDME_EVERY
            if self._window > MAX_CIRCUIT_WINDOW:
                self._fail(BreakReason.PROTOCOL, "SENDME beyond the window")
                return
            self._window_open.set()
        elif len(data) > 1:
            self._fail(BreakReason.PROTOCOL, f"END record with {len(data)} bytes of data")
        elif data:  # the other end gave up on the circuit, and says why
            why = describe_break(data[0])
            log.info(
                "circuit %#x on NID %d: the other end failed: %s", self.circ_id, self.link.nid, why
            )
            self._end(BreakReason.CLOSED, f"the other end failed: {why}")
        else:  # a clean END
            self._eof = True
            self._readable.set()
            self._window_open.set()

    def _fail(self, code: int, reason: str) -> None:
        """Give up on the circuit: tell the other end why (END record) if keys exist, break."""
        log.info("circuit %#x on NID %d: %s", self.circ_id, self.link.nid, reason)
        if self.state is CircuitState.OPEN and self._channel is not None and not self.link.closed:
            # Behind what is queued: dropping sealed records would make the END unreadable.
            try:
                self._send_record(e2e.END, bytes((code & 0xFF,)))
            except (OSError, AnomosError):
                pass
            self._end(code, reason)
        else:
            self._end(code, reason, discard=True)

    def _end(self, code: int | None, reason: str, *, discard: bool = False) -> None:
        """Close this end; send a BREAK (:data:`JOINED_BREAK`) unless ``code`` is None
        (the BREAK came from the link); ``code`` itself never goes on the wire."""
        if self.state is CircuitState.CLOSED:
            return
        self.state = CircuitState.CLOSED
        self.closed_reason = reason
        if self._timer is not None and self._timer is not gevent.getcurrent():
            self._timer.kill(block=False)
        self.switch.forget(self.link, self.circ_id)
        if code is not None and not self.link.closed:
            if discard:
                self.link.discard(self.circ_id)
            self.link.send(self.circ_id, Cmd.BREAK, JOINED_BREAK, force=True)
        self.link.release_circ_id(self.circ_id)
        self._readable.set()
        self._window_open.set()
        self._progress.set()
        if self._notified:
            self.switch.notify_closed(self, reason)


@attrs.define(eq=False)
class CircuitSwitch:
    """Every circuit through, from or to one peer, on top of its :class:`LinkManager`.

    Installs itself as the link manager's frame and link-loss handler.
    ``on_request(request)`` runs in a link's reader greenlet and must not
    block: it returns the function that serves the new stream (run in a
    greenlet of its own once the REPLY is on its way), or ``None`` to refuse.
    That function owns the stream: it may return at once after handing the
    stream on (e.g. to ``TorrentSession.add_connection``); it must close it.
    """

    links: LinkManager
    identity: PeerIdentity
    plugins: Plugins
    peer: Any = attrs.field(default=None, kw_only=True)
    on_request: RequestHandler | None = attrs.field(default=None, kw_only=True)
    #: Fingerprints of the trackers whose signed requests this peer serves as a source
    #: (the pins of its torrents); a request signed by any other key is refused.
    trackers: frozenset[str] = attrs.field(
        default=frozenset(), kw_only=True, converter=lambda fps: frozenset(f.lower() for f in fps)
    )
    #: Where the replay caches outlive a restart (the peer's state directory); None:
    #: in memory only.
    state_dir: Path | None = attrs.field(default=None, kw_only=True)
    _reader: OnionReader = attrs.field(init=False, repr=False)
    _seen: SeenRequests = attrs.field(init=False, repr=False)
    _ends: dict[Link, dict[int, CircuitEnd]] = attrs.field(factory=dict, init=False, repr=False)
    _group: gevent.pool.Group = attrs.field(factory=gevent.pool.Group, init=False, repr=False)
    _relayed: int = attrs.field(default=0, init=False)
    _cell_buffers: list[bytearray] = attrs.field(factory=list, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        codes, requests = peer_replay_files(self.state_dir)
        self._reader = OnionReader(self.identity.onion_private, replay_file=codes)
        self._seen = SeenRequests(replay_file=requests)
        self.links.on_frame = self.handle_frame
        self.links.on_link_down = self.handle_link_down

    def cell_buffers(self) -> list[bytearray]:
        """Two buffers of a cell and a layer's scratch, which our circuit ends pass cells
        through in turn between two yields: one pair per peer, not per circuit."""
        if not self._cell_buffers:
            self._cell_buffers = [bytearray(e2e.CELL_BODY + LAYER_SCRATCH) for _ in range(2)]
        return self._cell_buffers

    @property
    def relayed_bytes(self) -> int:
        """Cell bytes this peer forwarded as a relay (reported to the tracker): those of
        the relay circuits that ended, and the live ones' so far (each counts its own
        per cell; adding up here keeps the per-cell path to one increment)."""
        live = (end for end in self.circuits() if isinstance(end, RelayCircuit))
        return self._relayed + sum(end.relayed for end in live)

    def count_relayed(self, nbytes: int) -> None:
        """A relay circuit of ours ended, having forwarded ``nbytes`` of cells."""
        self._relayed += nbytes

    def circuits(self) -> list[CircuitEnd]:
        """Every live circuit end (each relay circuit once)."""
        seen: dict[int, CircuitEnd] = {}
        for ends in self._ends.values():
            for end in ends.values():
                seen[id(end)] = end
        return list(seen.values())

    # ------------------------------------------------------------------ downloader
    def open_circuit(self, plan: Any, timeout: float, *, early: bytes = b"") -> CircuitStream:
        """Build the circuit a tracker planned and agree end-to-end keys with its source.

        ``early``: data for the source's application in the HELLO (at most
        :data:`~anomos.protocol.e2e.MAX_EARLY_DATA` bytes; :attr:`CircuitStream.early`
        there), which it has one circuit round trip before any record.

        ``plan`` is a :class:`anomos.tracker.client.CircuitPlan`. Raises
        :class:`ProtocolError` if a hop refuses (the reason travels back in
        the BREAK), :class:`TransportError` without a link to the first hop.
        """
        deadline = time.monotonic() + timeout
        link = self.links.wait_for(plan.first_nid, timeout)
        suite = self.plugins.cipher_suite(plan.suite)
        state, hello = suite.initiator_hello(plan.material)
        circ_id = link.allocate_circ_id()
        stream = CircuitStream(
            self,
            link,
            circ_id,
            True,
            [OnionLayer.forward(k) for k in reversed(plan.layers)],
            [OnionLayer.backward(k) for k in plan.layers],
            suite=suite,
            suite_state=state,
        )
        self._register(link, circ_id, stream)
        link.send(circ_id, Cmd.CREATE, bytes(plan.tracking_code))
        try:
            left = max(deadline - time.monotonic(), 0.0)
            with gevent.Timeout(left, ProtocolError(f"circuit not created within {timeout:g} s")):
                # The HELLO right behind the CREATE, not after CREATED: each hop passes
                # it on once it has forwarded the CREATE (same queue, so never ahead of
                # it), and the source, which answered CREATED, is waiting for it. One
                # round trip of the whole circuit saved.
                stream.send_hello(e2e.encode_hello(plan.request_blob, hello, early))
                stream.wait_for(CircuitState.OPEN)
        except CircuitClosed:
            raise ProtocolError(f"circuit failed: {stream.closed_reason}") from None
        except BaseException as exc:
            stream.abandon(str(exc))
            raise
        return stream

    # ------------------------------------------------------------------ frames
    def handle_frame(self, link: Link, circ_id: int, cmd: int, payload: memoryview) -> None:
        """The link manager's ``on_frame``: switch one frame."""
        ends = self._ends.get(link)
        end = ends.get(circ_id) if ends else None
        if end is not None:
            if cmd == Cmd.DATA and end.established:
                link.credit(payload)
            end.on_frame(link, circ_id, cmd, payload)
        elif cmd == Cmd.CREATE:
            self._on_create(link, circ_id, payload)
        else:  # a late cell of a circuit already gone, or junk (a little is tolerated)
            link.stray_frame(circ_id)

    def handle_link_down(self, link: Link, reason: CloseReason) -> None:
        """The link manager's ``on_link_down``: break every circuit that used ``link``."""
        ends = self._ends.pop(link, {})
        for end in list(ends.values()):
            end.on_link_lost(link, reason)

    def close(self) -> None:
        """Break every circuit and stop timers."""
        for end in self.circuits():
            end.close()
        self._group.kill(block=False)
        for cache in (self._reader.replay_file, self._seen.replay_file):
            if cache is not None:
                cache.close()

    # ------------------------------------------------------------------ CREATE
    def _on_create(self, link: Link, circ_id: int, code: memoryview) -> None:
        # Refusals for the neighbour's own fault are strikes: a flood of them closes
        # the link (Link.refuse raises) and the peer reports the neighbour.
        if not link.allow_create():
            log.debug("CREATE from NID %d refused: over the CREATE rate limit", link.nid)
            link.refuse(circ_id, BreakReason.RATE_LIMITED, strike=True)
            return
        try:
            link.accept_circ_id(circ_id)
        except ProtocolError as exc:
            log.info("CREATE from NID %d refused: %s", link.nid, exc)
            code_ = BreakReason.TOO_MANY if "too many" in str(exc) else BreakReason.PROTOCOL
            link.refuse(circ_id, code_, strike=True)
            return
        try:
            peeled = self._reader.peel(bytes(code))
        except CryptoError as exc:
            log.info("CREATE from NID %d refused: %s", link.nid, exc)
            self._refuse(link, circ_id, BreakReason.CRYPTO)
            return
        if peeled.next_nid is None:
            stream = CircuitStream(
                self,
                link,
                circ_id,
                False,
                [OnionLayer.backward(peeled.layer)],
                [OnionLayer.forward(peeled.layer)],
                state=CircuitState.AWAITING_HELLO,
            )
            self._register(link, circ_id, stream)
            self._group.add(stream.expect_hello(HELLO_TIMEOUT))
            link.send(circ_id, Cmd.CREATED)
            return
        nxt = self.links.get(peeled.next_nid)
        if nxt is None or nxt.closed:
            log.info("CREATE from NID %d for NID %d: no such link", link.nid, peeled.next_nid)
            self._refuse(link, circ_id, BreakReason.UNKNOWN_NEIGHBOUR)
            return
        try:
            next_id = nxt.allocate_circ_id()
        except ProtocolError as exc:
            log.info("CREATE from NID %d refused: %s", link.nid, exc)
            self._refuse(link, circ_id, BreakReason.TOO_MANY)
            return
        relay = RelayCircuit(
            self,
            link,
            circ_id,
            nxt,
            next_id,
            OnionLayer.forward(peeled.layer),
            OnionLayer.backward(peeled.layer),
        )
        self._register(link, circ_id, relay)
        self._register(nxt, next_id, relay)
        assert peeled.forward_code is not None
        nxt.send(next_id, Cmd.CREATE, peeled.forward_code)

    def _refuse(self, link: Link, circ_id: int, code: int) -> None:
        link.refuse(circ_id, code, taken=True)

    # ------------------------------------------------------------------ terminal
    def on_hello(self, stream: CircuitStream, body: memoryview) -> None:
        """The source's half of the key agreement; runs in the link's reader greenlet."""
        try:
            blob, suite_hello, early = e2e.decode_hello(body)
            request = open_request(blob, self.identity.box, self.trackers)
            self._seen.check(blob, request)
        except AnomosError as exc:
            stream.refuse(BreakReason.PROTOCOL, f"bad HELLO: {exc}")
            return
        try:
            serve = self.on_request(request) if self.on_request is not None else None
        except Exception:
            log.exception("on_request failed")
            serve = None
        if serve is None:
            stream.refuse(BreakReason.REFUSED, "request refused")
            return
        try:
            suite = self.plugins.cipher_suite(request.suite)
            keys, reply = suite.responder_accept(request.material, suite_hello)
            channel = e2e.E2EChannel(keys)
        except AnomosError as exc:
            stream.refuse(BreakReason.REFUSED, f"cannot agree keys: {exc}")
            return
        if stream.accept(request, channel, reply, early):
            self._group.spawn(self._serve, serve, stream)

    @staticmethod
    def _serve(serve: Callable[[CircuitStream], None], stream: CircuitStream) -> None:
        """Run the peer's function, which owns the stream from now on."""
        try:
            serve(stream)
        except (OSError, AnomosError) as exc:
            log.info("circuit %#x on NID %d ended: %s", stream.circ_id, stream.link.nid, exc)
            stream.close()
        except Exception:
            log.exception("serving a circuit stream failed")
            stream.close()

    # ------------------------------------------------------------------ bookkeeping
    def _register(self, link: Link, circ_id: int, end: CircuitEnd) -> None:
        self._ends.setdefault(link, {})[circ_id] = end

    def forget(self, link: Link, circ_id: int) -> None:
        """A circuit end on ``(link, circ_id)`` closed: no more frames are switched to it."""
        ends = self._ends.get(link)
        if ends is not None:
            ends.pop(circ_id, None)
            if not ends:
                del self._ends[link]

    def notify_opened(self, circuit: CircuitEnd) -> None:
        """Tell the plugins a circuit through or from this peer is open."""
        self.plugins.notify("anomos_circuit_opened", peer=self.peer, circuit=circuit)

    def notify_closed(self, circuit: CircuitEnd, reason: str) -> None:
        """Tell the plugins an open circuit closed, and why."""
        self.plugins.notify("anomos_circuit_closed", peer=self.peer, circuit=circuit, reason=reason)
