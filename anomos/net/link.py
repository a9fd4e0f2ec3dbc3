"""Authenticated TLS links to the neighbours the tracker assigned, multiplexed.

A link is TLS 1.3 over any transport. The listener's certificate is
self-signed with its Ed25519 identity key, and the dialler compares that key
with the identity the tracker announced for the neighbour, so nobody can sit
between two neighbours. The dialler then proves *its* identity: the listener
sends a random challenge and the dialler signs ``AUTH_CONTEXT || challenge ||
listener identity || claimed NID``. The listener accepts only an NID it was
assigned with exactly that identity; the original Anomos believed any NID a
caller claimed. A caller on an NID the listener was not told of yet carries
the tracker's edge ticket for it (anomos.protocol.ticket), so the listener
need not ask the tracker before it answers.

Once up, one reader greenlet dispatches frames to ``on_frame`` and one writer
greenlet serves bounded per-circuit queues round-robin, several frames per
``sendall``: one busy circuit cannot starve the others, and a circuit that
overflows its queue is broken by its owner, never the link. What a neighbour
may make us do over time (CREATEs, refusals, junk frames, reconnects) is its
:class:`NeighbourBudget`, which outlives its links; spending it is a protocol
violation that closes the link.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import secrets
import socket
import ssl
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import attrs
import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.socket
import nacl.exceptions
import nacl.signing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from anomos.backoff import Backoff
from anomos.errors import AnomosError, CryptoError, ProtocolError, TransportError
from anomos.net.frames import (
    HEADER,
    HEADER_SIZE,
    LINK_CIRC_ID,
    MAX_PADDING,
    Cmd,
    FrameReader,
    auth_message,
    cmd_name,
    decode_auth,
    encode_auth,
    encode_frame,
)
from anomos.net.ratelimit import TokenBucket
from anomos.protocol.e2e import CELL_BODY
from anomos.protocol.layers import HEAD as LAYER_SCRATCH
from anomos.protocol.ticket import offerable, open_ticket

if TYPE_CHECKING:
    from anomos.config import Settings
    from anomos.identity import PeerIdentity
    from anomos.interfaces import Listener, Transport
    from anomos.pluginmanager import Plugins

log = logging.getLogger(__name__)

#: Seconds without sending anything after which a PADDING frame goes out.
KEEPALIVE_INTERVAL = 5.0
#: Seconds without receiving anything (or a send stuck that long) that end a link.
#: Both ends send PADDING when idle, so a live link is never silent this long: a
#: cut cable or a frozen neighbour is noticed within this time.
IDLE_TIMEOUT = 20.0
#: Dial retry backoff bounds, seconds (doubles after each failure, with jitter).
DIAL_BACKOFF_MIN = 0.5
DIAL_BACKOFF_MAX = 30.0
#: A link that stayed up this long resets the backoff.
STABLE_LINK = 10.0
#: Minimum seconds between two ``on_unknown_nid`` refreshes.
UNKNOWN_NID_INTERVAL = 2.0
#: Handshakes in progress at once. When all are taken, a new caller evicts the
#: oldest caller from an address no assigned neighbour has (a stranger); with none
#: to evict it is dropped.
MAX_PENDING_HANDSHAKES = 64
#: Handshakes in progress from one address (unless the transport's callers all
#: share one, as Tor's do); more callers from there are dropped.
MAX_HANDSHAKES_PER_ADDRESS = 8
#: Seconds a caller has to send its first TLS bytes (the ClientHello).
FIRST_BYTES_TIMEOUT = 3.0
#: Neighbours accepted in one assignment.
MAX_NEIGHBOURS = 256
#: Circuits one link carries at once (both directions together).
MAX_CIRCUITS_PER_LINK = 1024
#: Frames one circuit may have waiting in a link's send queue. Must exceed the
#: largest end-to-end window (anomos.net.circuit.MAX_CIRCUIT_WINDOW) plus its
#: SENDMEs, so only a misbehaving circuit can overflow it.
CIRCUIT_QUEUE_FRAMES = 576
#: Frames all circuits together may have waiting in one link's send queue (64 MiB
#: of cells). Above it, circuits holding at least an equal share of the queue are
#: refused more (a relay breaks them with "queue overflow", our own circuits wait),
#: and above twice it everything is refused: many circuits towards one slow
#: neighbour cannot pile up ``MAX_CIRCUITS_PER_LINK x CIRCUIT_QUEUE_FRAMES`` cells.
LINK_QUEUE_FRAMES = 2048
#: CREATEs a neighbour may send: a token bucket refilled at this rate (per second)
#: up to the burst. Each CREATE costs X25519 work and a replay-cache entry; the
#: excess is answered with BREAK "rate limited". The bucket belongs to the
#: neighbour (:class:`NeighbourBudget`), so reconnecting does not refill it.
CREATE_RATE = 200.0
CREATE_BURST = 1000
#: CREATEs of one neighbour we may refuse for its own fault (over its rate, over the
#: circuit cap, a reused id): a bucket refilled at this rate up to the burst. A
#: neighbour that empties it is flooding us: its link closes and it is reported.
STRIKE_RATE = 10.0
STRIKE_BURST = 200
#: Refusals (BREAKs answering CREATEs we did not take) and link frames one link may
#: have waiting. They hold no per-circuit state; a neighbour that lets more pile up
#: does not read our answers while it keeps asking: the link closes.
CONTROL_QUEUE_FRAMES = 256
#: Frames one neighbour may send for circuit ids that are not open (beyond the late
#: cells of circuits closed meanwhile): a bucket refilled per second up to the burst.
#: Past it the neighbour is sending junk: the link closes and it is reported.
JUNK_RATE = 1.0
JUNK_BURST = 16
#: Late frames accepted for a circuit id after the circuit closed: whatever the
#: neighbour still had queued for it (its queue bound; the end-to-end window and its
#: SENDMEs fit in it). Remembered for the last MAX_CIRCUITS_PER_LINK ids closed.
LATE_FRAMES = CIRCUIT_QUEUE_FRAMES
#: Links one neighbour may open to us: a bucket refilled at this rate (per second)
#: up to the burst; a reconnect beyond it is refused after authentication.
RELINK_RATE = 0.2
RELINK_BURST = 5
#: Neighbours whose budgets are remembered (the assigned ones and, beyond them, the
#: most recently seen), so an assignment that comes and goes refills nothing.
MAX_BUDGETS = 2 * MAX_NEIGHBOURS
#: The writer sends up to this many bytes per ``sendall``.
BATCH_BYTES = 256 * 1024
#: Bytes read from the transport at once, before TLS decryption.
TLS_RECV_CHUNK = 256 * 1024
#: Frames a link's reader handles before it lets other greenlets run.
READER_TURN_FRAMES = 8

#: Cell buffers a peer keeps for reuse once their frames are sent (about a MiB).
SPARE_CELLS = 32

#: Circuit ids allocated by the dialler of a link have this bit set.
DIALLER_BIT = 0x80000000
_PADDING_FRAME = encode_frame(LINK_CIRC_ID, Cmd.PADDING)
#: Bytes of PADDING a new link sends first, to open TCP's congestion window before a
#: circuit needs it: a cold connection sends 10 segments (14.5 KB) per round trip,
#: and a circuit's first cells (the HELLO, the REPLY and the first record, 32 KiB
#: each) would take two or three round trips of every cold hop. Under BBR it also
#: sets the pacing rate of the link until bulk data crosses it (BBR keeps its
#: bandwidth estimate through idle spells): after 64 KiB, ~1 MB/s at 100 ms RTT,
#: 30 ms per 32 KiB cell and hop; after 256 KiB, ~3 MB/s (docs/performance.md).
WARM_UP_BYTES = 256 * 1024
#: The warm-up goes out in chunks of this many bytes, each only when nothing else
#: waits to be sent and the kernel holds less than this unsent
#: (TCP_NOTSENT_LOWAT while it lasts): a circuit's cell never queues behind more.
WARM_UP_CHUNK = 32 * 1024
_WARM_UP_CHUNK = b"".join(
    [encode_frame(LINK_CIRC_ID, Cmd.PADDING, bytes(MAX_PADDING))] * (WARM_UP_CHUNK // MAX_PADDING)
)
_DATA = int(Cmd.DATA)

#: ``on_frame(link, circ_id, cmd, payload)``; ``payload`` is only valid during the call.
FrameHandler = Callable[["Link", int, int, memoryview], None]


# ----------------------------------------------------------------------------- TLS


def make_certificate(identity: PeerIdentity) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM), self-signed with the Ed25519 identity key."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(identity.signing))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anomos peer")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_identity(der: bytes | None) -> bytes | None:
    """The raw Ed25519 public key of a DER certificate, or None if it has none."""
    if not der:
        return None
    try:
        public = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return None
    if not isinstance(public, Ed25519PublicKey):
        return None
    return public.public_bytes_raw()


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` wants a path; give it one that never reaches a disk if we can."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("anomos-link-cert")
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "link.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)


def server_context(identity: PeerIdentity) -> ssl.SSLContext:
    """TLS 1.3 listener context presenting the identity certificate."""
    cert_pem, key_pem = make_certificate(identity)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0  # no resumption: every link authenticates afresh
    _load_chain(ctx, key_pem + cert_pem)
    return ctx


def client_context() -> ssl.SSLContext:
    """TLS 1.3 dialler context; the certificate is pinned by hand, not by a CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TLSStream:
    """TLS over a plain socket through memory BIOs, for few, large system calls.

    ``ssl.SSLSocket`` reads each TLS record with two ``read`` calls (header,
    then body) and writes each record with one ``write``: about six system
    calls per 32 KiB frame. Here the socket is read in chunks of up to
    :data:`TLS_RECV_CHUNK` and each batch of frames is written at once.
    Whoever drains the outgoing BIO holds the write lock while sending, so
    TLS records reach the wire in the order they were made even when the
    reader (post-handshake messages) and the writer both produce some.
    """

    def __init__(self, sock: Any, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._buf = bytearray(TLS_RECV_CHUNK)
        self._view = memoryview(self._buf)
        self._lock = gevent.lock.Semaphore()
        self._send = getattr(sock, "send", None) or _send_whole(sock)

    def do_handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()

    def getpeercert(self, binary_form: bool = True) -> Any:
        return self._obj.getpeercert(binary_form)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Decrypted bytes into ``buffer``; 0 at the end of the stream.

        Returns every record already received that fits (one TLS record is at
        most 16 KiB, a DATA frame 32 KiB), and reads the socket only when none is.
        """
        view = memoryview(buffer).cast("B")
        nbytes = nbytes or len(view)
        got = 0
        obj, inbound = self._obj, self._in
        read = obj.read
        while got < nbytes:
            # With nothing received left to decrypt, a read could only raise
            # SSLWantReadError: skip that exception (twice per wake-up otherwise).
            if not inbound.pending:
                if got:
                    break
                if not obj.pending():
                    if self._out.pending:
                        self._flush()
                    if not self._feed():
                        return 0
                    continue
            try:
                got += int(read(nbytes - got, view[got:]))
            except ssl.SSLWantReadError:
                if got:
                    break
                if self._out.pending:
                    self._flush()
                if not self._feed():
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
        return got

    def sendall(self, data: Any) -> None:
        view = memoryview(data)
        while view:
            n = self._obj.write(view)
            view = view[n:]
        self._flush()

    def _feed(self) -> bool:
        n = self.sock.recv_into(self._buf)
        if not n:
            self._in.write_eof()
            return False
        self._in.write(self._view[:n])
        return True

    def _flush(self) -> None:
        with self._lock:
            data = self._out.read()
            if data:
                # ``send`` in a loop, not ``sendall``: gevent's sendall asks the kernel
                # for SO_SNDBUF (a system call) and slices in Python on every call.
                view = memoryview(data)
                send = self._send
                while view:
                    view = view[send(view) :]

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def close(self) -> None:
        self.sock.close()


def _send_whole(sock: Any) -> Callable[[memoryview], int]:
    """``send`` for a transport stream that has only ``sendall``."""

    def send(view: memoryview) -> int:
        sock.sendall(view)
        return len(view)

    return send


def _host(address: str) -> str:
    """The host part of ``host:port`` (the whole string if it has no port)."""
    host, sep, port = address.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else address


def _set_notsent_lowat(sock: Any, limit: int | None) -> None:
    """Let the kernel hold at most ``limit`` unsent bytes of ``sock`` (a TLSStream or a
    raw socket; None: the system's default, 0), where the transport is a TCP socket."""
    raw = getattr(sock, "sock", sock)
    if not hasattr(raw, "setsockopt") or not hasattr(socket, "TCP_NOTSENT_LOWAT"):
        return
    with contextlib.suppress(OSError):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, limit or 0)


def _next_frame(reader: FrameReader, expected: Cmd) -> memoryview:
    try:
        circ_id, cmd, payload = next(reader)
    except StopIteration:
        raise ProtocolError(f"connection closed while waiting for {expected.name}") from None
    if circ_id != LINK_CIRC_ID or cmd != expected:
        raise ProtocolError(f"expected {expected.name}, got {cmd_name(cmd)}")
    return payload


# ----------------------------------------------------------------------------- links


def _same_neighbour(current: Any, dialled: Any) -> bool:
    """Whether the tracker still assigns the neighbour we dialled (same key and address).

    Every announce makes new assignment objects: a link that took a few round
    trips to set up must survive an announce that changed nothing about it.
    """
    return (
        current is not None
        and bool(current.dial)
        and bytes(current.identity) == bytes(dialled.identity)
        and current.address == dialled.address
    )


@attrs.frozen
class TicketedNeighbour:
    """A caller admitted on the tracker's edge ticket (it dials us): our neighbour
    until an assignment asked for after its admission leaves it out."""

    nid: int
    address: str
    identity: bytes = attrs.field(repr=lambda b: b.hex()[:16])
    dial: bool = False


@attrs.define(eq=False)
class NeighbourBudget:
    """What one neighbour (NID and identity) may still make us do.

    It outlives the neighbour's links: reconnecting refills nothing, and a
    neighbour cut for flooding comes back with the budget it left with.
    """

    #: CREATEs (see CREATE_RATE).
    creates: TokenBucket = attrs.field(factory=lambda: TokenBucket(CREATE_RATE, CREATE_BURST))
    #: CREATEs refused for the neighbour's own fault (see STRIKE_RATE).
    strikes: TokenBucket = attrs.field(factory=lambda: TokenBucket(STRIKE_RATE, STRIKE_BURST))
    #: Frames for circuit ids that are not open (see JUNK_RATE).
    junk: TokenBucket = attrs.field(factory=lambda: TokenBucket(JUNK_RATE, JUNK_BURST))
    #: Links it opens to us (see RELINK_RATE).
    relinks: TokenBucket = attrs.field(factory=lambda: TokenBucket(RELINK_RATE, RELINK_BURST))


class NoTransportError(TransportError):
    """No configured transport can dial the address: retrying will not help."""


class CloseCause(enum.Enum):
    """Why a neighbour link closed, as the peer acts on it (the value is the log text)."""

    # Our own doing: nothing to report to the tracker.
    UNASSIGNED = "neighbour no longer assigned"
    SHUTDOWN = "shutting down"
    REPLACED = "replaced by a new connection"
    STOPPED = "stopped"
    INTERNAL_ERROR = "internal error"
    # A link we dialled that ended before the neighbour's AUTH_OK: a failed dial, as
    # when the handshake itself fails (retried with backoff, never reported).
    NOT_ACCEPTED = "not accepted"
    # The neighbour, or the path to it, went away.
    CLOSED_BY_NEIGHBOUR = "closed by neighbour"
    CONNECTION_LOST = "connection lost"
    IDLE = "idle"
    SEND_STUCK = "send stuck"
    SEND_FAILED = "send failed"
    # The neighbour broke the protocol: we cut the link and report it.
    VIOLATION = "protocol violation"

    @property
    def local(self) -> bool:
        return self in _LOCAL_CAUSES

    @property
    def lost(self) -> bool:
        return self in _LOST_CAUSES


_LOCAL_CAUSES = frozenset(
    {
        CloseCause.UNASSIGNED,
        CloseCause.SHUTDOWN,
        CloseCause.REPLACED,
        CloseCause.STOPPED,
        CloseCause.INTERNAL_ERROR,
        CloseCause.NOT_ACCEPTED,
    }
)
_LOST_CAUSES = frozenset(
    {
        CloseCause.CLOSED_BY_NEIGHBOUR,
        CloseCause.CONNECTION_LOST,
        CloseCause.IDLE,
        CloseCause.SEND_STUCK,
        CloseCause.SEND_FAILED,
    }
)


@attrs.frozen
class CloseReason:
    """A link's close reason: the typed ``cause`` callers act on, and the human
    ``text`` logs and hooks show (by default the cause's own words)."""

    cause: CloseCause
    text: str = attrs.field()

    @text.default
    def _text(self) -> str:
        return self.cause.value

    @classmethod
    def of(cls, cause: CloseCause, detail: object) -> CloseReason:
        """``cause`` with a detail, as "connection lost: Connection reset by peer"."""
        return cls(cause, f"{cause.value}: {detail}")

    @classmethod
    def violation(cls, what: object) -> CloseReason:
        """The neighbour broke the protocol; ``what`` says how."""
        return cls(CloseCause.VIOLATION, str(what))

    def __str__(self) -> str:
        return self.text


@attrs.define(eq=False)
class CellBuffers:
    """Buffers for the cells a peer sends (a full cell body and a layer's 16 bytes of
    scratch; a short cell uses the start of one), given back by the link's writer
    once their frame is on its way.

    A relay writes each cell's layer into a new buffer that the link sends
    later; a fresh ``bytearray`` per cell is zeroed, then freed after the send.
    """

    size: int = CELL_BODY + LAYER_SCRATCH
    spare: int = SPARE_CELLS
    _free: list[bytearray] = attrs.field(factory=list, repr=False)

    def take(self) -> bytearray:
        """A buffer of :attr:`size` bytes; its contents are whatever was there."""
        free = self._free
        return free.pop() if free else bytearray(self.size)

    def give_back(self, buffer: bytearray) -> None:
        """``buffer`` (from :meth:`take`) is no longer used by anyone."""
        if len(self._free) < self.spare:
            self._free.append(buffer)


@attrs.define(eq=False)
class Link:
    """One authenticated neighbour link: bounded per-circuit queues, a reader and a writer."""

    nid: int
    #: The neighbour's contact address, as the tracker announced it.
    address: str
    identity: bytes = attrs.field(repr=False)
    #: True when this side dialled (and so allocates circuit ids with the high bit).
    dialler: bool
    sock: Any = attrs.field(repr=False)
    reader: FrameReader = attrs.field(repr=False)
    manager: LinkManager = attrs.field(repr=False)
    bytes_out: int = 0
    #: Cell bytes of circuits relayed through this peer that crossed this link, both ways.
    relayed: int = 0
    #: Why the link closed; ``None`` while it is up.
    closed_reason: CloseReason | None = None
    #: Per circuit: (header, payload, the payload's CellBuffers buffer or None).
    _queues: dict[int, deque[tuple[bytes, Any, bytearray | None]]] = attrs.field(
        factory=dict, repr=False
    )
    _active: deque[int] = attrs.field(factory=deque, repr=False)
    _control: deque[bytes] = attrs.field(factory=deque, repr=False)
    _circ_ids: set[int] = attrs.field(factory=set, repr=False)
    _wake: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    _done: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    _writer: gevent.Greenlet | None = attrs.field(default=None, repr=False)
    _watchdog: gevent.Greenlet | None = attrs.field(default=None, repr=False)
    #: When the writer's send in progress started (0: none is).
    _send_started: float = attrs.field(default=0.0, repr=False)
    _reader_greenlet: Any = attrs.field(default=None, repr=False)
    #: When the link was up: authenticated both ways (at a dialler: when AUTH_OK came).
    opened_at: float = attrs.field(factory=time.monotonic, repr=False)
    #: False at a dialler until the neighbour's AUTH_OK arrives. Frames queued before
    #: then go out right behind our AUTH: the neighbour (whose identity TLS proved)
    #: reads them only once it has accepted us, and drops them with the connection if
    #: it does not; so a circuit's CREATE need not wait a round trip for AUTH_OK.
    accepted: bool = attrs.field(default=True, repr=False)
    #: Frames one circuit may have queued on this link (see CIRCUIT_QUEUE_FRAMES).
    queue_limit: int = attrs.field(factory=lambda: CIRCUIT_QUEUE_FRAMES, repr=False)
    #: Frames all circuits may have queued on this link (see LINK_QUEUE_FRAMES).
    link_limit: int = attrs.field(factory=lambda: LINK_QUEUE_FRAMES, repr=False)
    #: Chunks of the warm-up (WARM_UP_CHUNK) still to send.
    _warm_up_left: int = attrs.field(default=0, repr=False)
    #: Frames queued now, all circuits together.
    _queued: int = attrs.field(default=0, repr=False)
    _room: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    #: The neighbour's budget, shared by all its links (see :class:`NeighbourBudget`).
    budget: NeighbourBudget = attrs.field(factory=NeighbourBudget, repr=False)
    #: Bytes of the DATA cells the neighbour sent on circuits established through
    #: us: what our receipts confirm (keepalives, junk and refused CREATEs are not).
    cell_bytes_in: int = 0
    #: Released circuit ids whose frames are still queued: they count against the
    #: circuit cap until sent, so closing circuits cannot pile up queues.
    _draining: set[int] = attrs.field(factory=set, repr=False)
    #: Recently closed circuit ids -> late frames still accepted for each (LATE_FRAMES).
    _late: dict[int, int] = attrs.field(factory=dict, repr=False)

    @property
    def bytes_in(self) -> int:
        return self.reader.bytes_in

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    # ------------------------------------------------------------------ circuit ids
    @property
    def circuit_count(self) -> int:
        """Open circuit ids, and closed ones whose last frames are still queued."""
        return len(self._circ_ids) + len(self._draining)

    def is_local_id(self, circ_id: int) -> bool:
        """Whether ``circ_id`` lies in the half of the id space this side allocates."""
        return bool(circ_id & DIALLER_BIT) == self.dialler

    def allocate_circ_id(self) -> int:
        """A fresh, random circuit id from this side's half of the id space."""
        self._check_room()
        high = DIALLER_BIT if self.dialler else 0
        while True:
            circ_id = secrets.randbits(31) | high
            if circ_id and circ_id not in self._circ_ids and circ_id not in self._queues:
                self._circ_ids.add(circ_id)
                return circ_id

    def accept_circ_id(self, circ_id: int) -> None:
        """Take a circuit id the neighbour allocated (on its CREATE)."""
        if self.is_local_id(circ_id):
            raise ProtocolError(f"NID {self.nid} used circuit id {circ_id:#x} from our half")
        if circ_id in self._circ_ids or circ_id in self._queues:
            raise ProtocolError(f"NID {self.nid} reused the open circuit id {circ_id:#x}")
        self._check_room()
        self._circ_ids.add(circ_id)
        self._late.pop(circ_id, None)

    def release_circ_id(self, circ_id: int) -> None:
        """Forget a circuit id; frames already queued for it are still sent, and the
        neighbour's frames still in flight for it are accepted (LATE_FRAMES)."""
        if circ_id not in self._circ_ids:
            return
        self._circ_ids.discard(circ_id)
        q = self._queues.get(circ_id)
        if q:
            self._draining.add(circ_id)
        elif q is not None:
            del self._queues[circ_id]
        self._late[circ_id] = LATE_FRAMES
        if len(self._late) > MAX_CIRCUITS_PER_LINK:
            del self._late[next(iter(self._late))]  # the oldest

    def _check_room(self) -> None:
        if self.closed_reason is not None:
            raise ProtocolError(f"link to NID {self.nid} is closed ({self.closed_reason})")
        if self.circuit_count >= MAX_CIRCUITS_PER_LINK:
            raise ProtocolError(f"too many circuits on the link to NID {self.nid}")

    # ------------------------------------------------------------------ sending
    def send_cell(self, circ_id: int, buffer: bytearray, size: int) -> bool:
        """Queue a DATA frame of ``buffer[:size]``, a buffer of ``manager.cells``, which
        the writer gives back once the frame is sent; False as :meth:`send`."""
        return self.send(circ_id, _DATA, memoryview(buffer)[:size], buffer=buffer)

    def send(
        self,
        circ_id: int,
        cmd: int,
        payload: Any = b"",
        *,
        force: bool = False,
        buffer: bytearray | None = None,
    ) -> bool:
        """Queue a frame; False if the link is closed or the circuit's queue is full.

        ``payload`` must be bytes the caller will not change (it is sent later).
        ``force`` ignores the queue bound, for the one BREAK that ends a circuit.
        ``buffer``: see :meth:`send_cell`.
        """
        if self.closed_reason is not None:
            return False
        q = self._queues.get(circ_id)
        if q is None:
            q = self._queues[circ_id] = deque()
        if not force and (
            len(q) >= self.queue_limit
            or (
                self._queued >= self.link_limit
                and (
                    len(q) * len(self._queues) >= self.link_limit
                    or self._queued >= 2 * self.link_limit
                )
            )
        ):
            if not q:
                del self._queues[circ_id]
            return False
        q.append((HEADER.pack(circ_id, cmd, 0, len(payload)), payload, buffer))
        self._queued += 1
        if len(q) == 1:
            self._active.append(circ_id)
            self._wake.set()
        return True

    def queued(self, circ_id: int | None = None) -> int:
        """Frames of ``circ_id`` (or of every circuit) waiting to be sent."""
        if circ_id is None:
            return self._queued
        q = self._queues.get(circ_id)
        return len(q) if q else 0

    def over_limit(self) -> bool:
        """Whether the link's whole queue is at :data:`LINK_QUEUE_FRAMES` or more."""
        return self._queued >= self.link_limit

    def wait_for_room(self, timeout: float) -> bool:
        """Wait until the link's queue is below its limit (or the link closed).

        For senders that can wait (our own circuits' streams); a relay, which runs
        in another link's reader, must not block and is refused instead. This
        link's own reader never waits (it would stop the link): it returns at once.
        """
        if gevent.getcurrent() is self._reader_greenlet:
            return not self.over_limit()
        deadline = time.monotonic() + timeout
        while self._queued >= self.link_limit and self.closed_reason is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._room.clear()
            self._room.wait(left)
        return True

    def allow_create(self) -> bool:
        """Take a token from the neighbour's CREATE bucket; False when it is empty."""
        return self.budget.creates.try_take()

    def refuse(self, circ_id: int, code: int, *, taken: bool = False, strike: bool = False) -> None:
        """Answer a CREATE with BREAK ``code``, queued in the small control queue: a
        refused CREATE leaves no per-circuit state.

        ``taken``: we had accepted the id and the CREATE failed later: the id is
        forgotten (a circuit that never opened has no late frames). ``strike``: the
        CREATE broke the neighbour's own limits, which spends its strike budget.
        Raises ProtocolError (the reader closes the link, the peer reports the
        neighbour) when that budget or the control queue is spent: a flood.
        """
        if taken:
            self._circ_ids.discard(circ_id)
            self._late[circ_id] = 1  # the HELLO a downloader sends right behind its CREATE
            if len(self._late) > MAX_CIRCUITS_PER_LINK:
                del self._late[next(iter(self._late))]  # the oldest
        if strike and not self.budget.strikes.try_take():
            raise ProtocolError(f"NID {self.nid} floods us with CREATEs over its limits")
        if len(self._control) >= CONTROL_QUEUE_FRAMES:
            raise ProtocolError(f"NID {self.nid} floods us with CREATEs and reads no answer")
        self._control.append(encode_frame(circ_id, Cmd.BREAK, bytes((code,))))
        self._wake.set()

    def stray_frame(self, circ_id: int) -> None:
        """A frame for a circuit id that is not open: a late frame of a circuit closed
        meanwhile (up to LATE_FRAMES each), else junk, a little of which is tolerated.
        Raises ProtocolError once the neighbour's junk budget is spent."""
        left = self._late.get(circ_id)
        if left:
            self._late[circ_id] = left - 1
        elif not self.budget.junk.try_take():
            raise ProtocolError(f"NID {self.nid} sent frames on circuits that do not exist")

    def credit(self, payload: memoryview) -> None:
        """Count a DATA cell the neighbour sent on an established circuit (receipts)."""
        self.cell_bytes_in += HEADER_SIZE + len(payload)

    def discard(self, circ_id: int) -> None:
        """Drop what is queued for ``circ_id`` (a circuit broken by overflow)."""
        q = self._queues.get(circ_id)
        if q:
            self._queued -= len(q)
            q.clear()
            with contextlib.suppress(ValueError):
                self._active.remove(circ_id)
        if q is not None and circ_id not in self._circ_ids:
            del self._queues[circ_id]
            self._draining.discard(circ_id)

    # ------------------------------------------------------------------ lifecycle
    def close(self, reason: CloseReason) -> None:
        """Close once; the manager and the circuit switch learn why."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._queues.clear()
        self._active.clear()
        self._control.clear()
        self._draining.clear()
        self._queued = 0
        self._room.set()
        current = gevent.getcurrent()
        for greenlet in (self._writer, self._watchdog):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=False)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._done.set()
        self.manager._link_down(self, reason)

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def run(self) -> None:
        """Serve the link in the calling greenlet until it closes."""
        self._reader_greenlet = gevent.getcurrent()
        # No timeout on each socket wait (a Timeout object and a timer started and
        # stopped per wake-up): one watchdog per link keeps time instead.
        self.sock.settimeout(None)
        if self.manager.warms(self):
            self._warm_up_left = WARM_UP_BYTES // WARM_UP_CHUNK
            _set_notsent_lowat(self.sock, WARM_UP_CHUNK)
        self._writer = gevent.spawn(self._write_loop)
        self._watchdog = gevent.spawn(self._watch, KEEPALIVE_INTERVAL, IDLE_TIMEOUT)
        reason = CloseReason(CloseCause.CLOSED_BY_NEIGHBOUR)
        turn = 0
        try:
            if not self.accepted:
                try:
                    self._await_accept()
                except (ProtocolError, OSError) as exc:
                    reason = CloseReason.of(CloseCause.NOT_ACCEPTED, exc)
                    return
            for circ_id, cmd, payload in self.reader:
                if self.closed_reason is not None:
                    return
                if circ_id == LINK_CIRC_ID:
                    if cmd != Cmd.PADDING:
                        raise ProtocolError(f"{cmd_name(cmd)} after the link handshake")
                    continue
                handler = self.manager.on_frame
                if handler is None:
                    raise ProtocolError(f"{cmd_name(cmd)} on a link that carries no circuits")
                if cmd == Cmd.BREAK:
                    self.discard(circ_id)  # the neighbour ended it: nothing more to send
                handler(self, circ_id, cmd, payload)
                turn += 1
                if turn >= READER_TURN_FRAMES:
                    # A busy link never blocks on its socket: let the writers (which
                    # pass these frames on) and the streams' readers (which return
                    # SENDMEs) run, or everything moves in bursts of megabytes.
                    turn = 0
                    gevent.sleep(0)
        except ProtocolError as exc:
            reason = CloseReason.violation(exc)
        except OSError as exc:
            reason = CloseReason.of(CloseCause.CONNECTION_LOST, exc.strerror or exc)
        except gevent.GreenletExit:
            reason = CloseReason(CloseCause.STOPPED)
            raise
        except Exception as exc:  # a bug in a frame handler must not kill silently
            log.exception("link to NID %d: frame handler failed", self.nid)
            reason = CloseReason.of(CloseCause.INTERNAL_ERROR, exc)
        finally:
            self.close(reason)

    def _await_accept(self) -> None:
        """The dialler's end of the handshake: the neighbour's AUTH_OK, in time."""
        limit = self.manager.settings.handshake_timeout
        timeout = ProtocolError(f"no AUTH_OK from NID {self.nid} within {limit:g} s")
        with gevent.Timeout(limit, timeout):
            _next_frame(self.reader, Cmd.AUTH_OK)
        self.accepted = True
        self.opened_at = time.monotonic()
        self.manager.link_accepted(self)

    def _write_loop(self) -> None:
        sock = self.sock
        queues = self._queues
        active = self._active
        control = self._control
        wake = self._wake
        limiter = self.manager.send_limiter
        cells = self.manager.cells
        spent: list[bytearray] = []
        try:
            while self.closed_reason is None:
                if not active and not control and not self._warm_up_left:
                    wake.clear()
                    wake.wait()  # (PADDING when idle: the watchdog queues it)
                    continue
                batch: list[Any] = []
                size = 0
                warming = False  # (the batch is a chunk of the warm-up alone)
                if self._warm_up_left and (active or not control):
                    size = self._warm_up_step(batch, busy=bool(active))
                    warming = size > 0
                while control:
                    frame = control.popleft()
                    batch.append(frame)
                    size += len(frame)
                while active and size < BATCH_BYTES:
                    circ_id = active.popleft()
                    q = queues.get(circ_id)
                    if not q:
                        continue
                    header, payload, buffer = q.popleft()
                    self._queued -= 1
                    batch.append(header)
                    batch.append(payload)
                    if buffer is not None:
                        spent.append(buffer)
                    size += HEADER_SIZE + len(payload)
                    if q:
                        active.append(circ_id)
                    else:
                        del queues[circ_id]  # an idle circuit keeps no queue (~600 bytes)
                        self._draining.discard(circ_id)
                if limiter is not None:
                    limiter.take(size)
                data = b"".join(batch)
                batch.clear()  # the payloads' views, before their buffers go back
                for buffer in spent:
                    cells.give_back(buffer)
                spent.clear()
                self._send_started = time.monotonic()
                sock.sendall(data)
                self._send_started = 0.0
                self.bytes_out += size
                if self._queued < self.link_limit:
                    self._room.set()
                if warming:
                    gevent.sleep(0)  # a circuit's frame queued meanwhile goes next
        except OSError as exc:
            self.close(CloseReason.of(CloseCause.SEND_FAILED, exc.strerror or exc))

    def _warm_up_step(self, batch: list[Any], *, busy: bool) -> int:
        """The next chunk of the warm-up into ``batch``, its size returned; none, and no
        more, once circuits use the link (their cells warm it, and must not wait
        behind padding)."""
        added = 0
        if busy:
            self._warm_up_left = 0
        else:
            batch.append(_WARM_UP_CHUNK)
            added = WARM_UP_CHUNK
            self._warm_up_left -= 1
        if not self._warm_up_left:
            _set_notsent_lowat(self.sock, None)
        return added

    def _watch(self, keepalive: float, idle: float) -> None:
        """The link's one timer: PADDING once nothing was sent for ``keepalive``
        seconds; the end of the link once nothing was received, or a send did not
        finish, for ``idle`` seconds (each checked every half ``keepalive``)."""
        heard = sent = time.monotonic()
        bytes_in, bytes_out = self.reader.bytes_in, self.bytes_out
        while self.closed_reason is None:
            gevent.sleep(keepalive / 2)
            now = time.monotonic()
            if self.reader.bytes_in != bytes_in:
                bytes_in, heard = self.reader.bytes_in, now
            elif now - heard >= idle:
                self.close(CloseReason(CloseCause.IDLE, f"idle for {idle:g} s"))
                return
            started = self._send_started
            if started and now - started >= idle:
                self.close(CloseReason(CloseCause.SEND_STUCK, f"send stuck for {idle:g} s"))
                return
            if self.bytes_out != bytes_out:
                bytes_out, sent = self.bytes_out, now
            elif now - sent >= keepalive:
                self._control.append(_PADDING_FRAME)
                self._wake.set()
                sent = now


# ----------------------------------------------------------------------------- manager


@attrs.define(eq=False)
class LinkManager:
    """All links of one peer: listens, dials assigned neighbours, authenticates, tracks.

    ``on_frame`` and ``on_link_down`` are plain attributes, so a
    :class:`anomos.net.circuit.CircuitSwitch` can install itself after both exist.
    """

    identity: PeerIdentity
    plugins: Plugins
    settings: Settings
    on_frame: FrameHandler | None = attrs.field(kw_only=True)
    on_unknown_nid: Callable[[int], None] | None = attrs.field(default=None, kw_only=True)
    #: Fingerprints of the trackers whose edge tickets admit a caller on an NID we
    #: have not been told of (none: such a caller waits for ``on_unknown_nid``).
    trackers: frozenset[str] = attrs.field(default=frozenset(), kw_only=True)
    #: Called with the NID of a caller admitted on its ticket (the tracker should
    #: hear from us soon: the edge counts for others' circuits once both ends know it).
    on_admitted: Callable[[int], None] | None = attrs.field(default=None, kw_only=True)
    #: Called as ``on_link_down(link, reason)`` after a link closed.
    on_link_down: Callable[[Link, CloseReason], None] | None = attrs.field(
        default=None, kw_only=True
    )
    #: Passed along to the neighbour hooks.
    peer: Any = attrs.field(default=None, kw_only=True)
    #: The address neighbours dial, once :meth:`start` returned.
    address: str | None = attrs.field(default=None, init=False)
    links: dict[int, Link] = attrs.field(factory=dict, init=False)
    _assigned: dict[int, Any] = attrs.field(factory=dict, init=False, repr=False)
    #: NID -> when (monotonic) its caller was admitted on a ticket, while it is not
    #: in an assignment yet.
    _ticketed: dict[int, float] = attrs.field(factory=dict, init=False, repr=False)
    _dialling: dict[int, gevent.Greenlet] = attrs.field(factory=dict, init=False, repr=False)
    _group: gevent.pool.Group = attrs.field(factory=gevent.pool.Group, init=False, repr=False)
    _listener: Listener | None = attrs.field(default=None, init=False, repr=False)
    _transports: dict[str, Transport] = attrs.field(factory=dict, init=False, repr=False)
    _server_ctx: ssl.SSLContext | None = attrs.field(default=None, init=False, repr=False)
    _client_ctx: ssl.SSLContext = attrs.field(factory=client_context, init=False, repr=False)
    #: Handshakes in progress: their greenlet -> the caller's host, oldest first.
    _handshakes: dict[gevent.Greenlet, str] = attrs.field(factory=dict, init=False, repr=False)
    #: Hosts of the assigned neighbours' contact addresses: callers from them are
    #: never evicted for another caller.
    _neighbour_hosts: frozenset[str] = attrs.field(default=frozenset(), init=False, repr=False)
    #: (NID, identity) -> that neighbour's budget, least recently used first.
    _budgets: dict[tuple[int, bytes], NeighbourBudget] = attrs.field(
        factory=dict, init=False, repr=False
    )
    _changed: gevent.event.Event = attrs.field(factory=gevent.event.Event, init=False, repr=False)
    #: Neighbours whose link something of ours waits for (:meth:`wait_for`).
    _awaited: dict[int, int] = attrs.field(factory=dict, init=False, repr=False)
    _last_refresh: float = attrs.field(default=-1e9, init=False, repr=False)
    #: One event per announce on its way (:meth:`asking_tracker`), set when its reply
    #: was adopted or the announce failed.
    _replies_due: set[gevent.event.Event] = attrs.field(factory=set, init=False, repr=False)
    _closed: bool = attrs.field(default=False, init=False)
    #: NID -> cell bytes received over the closed links of the neighbour now assigned
    #: that NID (dropped when the assignment changes): the past part of :meth:`receipts`.
    _received: dict[int, int] = attrs.field(factory=dict, init=False, repr=False)
    #: Paces the writers of all links together (``Settings.max_send_rate``), or None.
    send_limiter: TokenBucket | None = attrs.field(default=None, init=False, repr=False)
    #: Buffers the cells this peer sends are written into (see :meth:`Link.send_cell`).
    cells: CellBuffers = attrs.field(factory=CellBuffers, init=False, repr=False)

    # ------------------------------------------------------------------ public
    def start(self) -> str:
        """Listen on ``settings.listen`` with ``settings.transport``; the contact address."""
        if self.settings.max_send_rate:
            self.send_limiter = TokenBucket(self.settings.max_send_rate)
        self._server_ctx = server_context(self.identity)
        transport = self._transport(self.settings.transport)
        self._listener = transport.listen(self.settings.listen, self._accept)
        self.address = self._listener.address
        return self.address

    def set_neighbours(self, neighbours: Iterable[Any], *, asked_at: float | None = None) -> None:
        """Adopt the tracker's assignment: dial new ``dial=True`` ones, drop the unassigned.

        ``asked_at`` (monotonic): when the assignment was asked for. A caller admitted
        on its ticket since then stays (the tracker may have answered before it
        issued the ticket); one admitted before is dropped unless assigned.
        """
        assigned: dict[int, Any] = {}
        for nb in neighbours:
            if len(assigned) >= MAX_NEIGHBOURS:
                log.warning(
                    "tracker assigned more than %d neighbours; ignoring the rest", MAX_NEIGHBOURS
                )
                break
            assigned[int(nb.nid)] = nb
        for nid, admitted in list(self._ticketed.items()):
            kept = self._assigned.get(nid)
            if nid in assigned or kept is None or asked_at is None or admitted < asked_at:
                del self._ticketed[nid]
            elif len(assigned) < MAX_NEIGHBOURS:
                assigned[nid] = kept
        for nid in list(self._received):
            old, new = self._assigned[nid], assigned.get(nid)
            if new is None or bytes(new.identity) != bytes(old.identity):
                del self._received[nid]  # another edge now: its count starts again
        self._assigned = assigned
        self._neighbour_hosts = frozenset(_host(nb.address) for nb in assigned.values())
        for nid, link in list(self.links.items()):
            nb = assigned.get(nid)
            if nb is None or bytes(nb.identity) != link.identity:
                link.close(CloseReason(CloseCause.UNASSIGNED))
        if self._closed:
            return
        for nid, nb in assigned.items():
            if nb.dial and nid not in self._dialling:
                self._dialling[nid] = self._group.spawn(self._dial_loop, nid)

    @contextlib.contextmanager
    def asking_tracker(self) -> Iterator[None]:
        """Around an announce whose reply goes to :meth:`set_neighbours`.

        The tracker may tell a new neighbour to dial us before our own reply naming
        it is adopted (it answered us first; the reply is still on its way, or our
        process has not run yet): such a caller waits for that reply rather than
        being refused, or asking the tracker again too soon.
        """
        due = gevent.event.Event()
        self._replies_due.add(due)
        try:
            yield
        finally:
            self._replies_due.discard(due)
            due.set()

    def neighbours(self) -> dict[int, Any]:
        """The current assignment, NID -> Neighbour."""
        return dict(self._assigned)

    def receipts(self) -> dict[int, int]:
        """NID -> bytes of the DATA cells that assigned neighbour sent on circuits
        established through us since it was assigned, across reconnections: what the
        tracker credits the neighbour's relaying with (never keepalives or junk)."""
        out = {}
        for nid, nb in self._assigned.items():
            past = self._received.get(nid)
            link = self.links.get(nid)
            if link is not None and link.identity == bytes(nb.identity):
                out[nid] = (past or 0) + link.cell_bytes_in
            elif past is not None:
                out[nid] = past
            # else never linked: nothing to confirm
        return out

    def get(self, nid: int) -> Link | None:
        """The live link to ``nid``, if any."""
        return self.links.get(nid)

    def wait_for(self, nid: int, timeout: float) -> Link:
        """The link to ``nid``, waiting up to ``timeout`` s for it to come up (one we
        dialled may still wait for AUTH_OK: what is sent on it follows our AUTH)."""
        deadline = time.monotonic() + timeout
        self._awaited[nid] = self._awaited.get(nid, 0) + 1
        try:
            while True:
                link = self.links.get(nid)
                if link is not None and not link.closed:
                    return link
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TransportError(f"no link to neighbour NID {nid}")
                self._changed.wait(left)
        finally:
            self._awaited[nid] -= 1
            if not self._awaited[nid]:
                del self._awaited[nid]

    def awaited(self, nid: int) -> bool:
        """Whether something of ours (a circuit to build) waits for the link to ``nid``."""
        return nid in self._awaited

    def warms(self, link: Link) -> bool:
        """Whether ``link`` starts with :data:`WARM_UP_BYTES` of padding: not when our own
        circuit waits to go out on it (it would queue behind), nor under an upload
        limit (the padding would take what circuits need, and the limit paces sends
        more than TCP's window does)."""
        return not (link.dialler and self.awaited(link.nid)) and self.send_limiter is None

    def dial(self, address: str, *, timeout: float) -> socket.socket:
        """A raw stream to ``address`` through the configured transports (e.g. to the tracker)."""
        return self._dial_transport(address).dial(address, timeout=timeout)

    def close(self) -> None:
        """Stop listening and dialling; close every link."""
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        self._group.kill(block=False)
        for link in list(self.links.values()):
            link.close(CloseReason(CloseCause.SHUTDOWN))

    # ------------------------------------------------------------------ transports
    def _transport(self, name: str) -> Transport:
        transport = self._transports.get(name)
        if transport is None:
            transport = self._transports[name] = self.plugins.transport(name, self.settings)
        return transport

    def _dial_transport(self, address: str) -> Transport:
        for name in (self.settings.transport, *self.settings.dial_transports):
            transport = self._transport(name)
            if transport.can_dial(address):
                return transport
        raise NoTransportError(f"no configured transport can reach {address}")

    # ------------------------------------------------------------------ dialling
    def _dial_loop(self, nid: int) -> None:
        backoff = Backoff(DIAL_BACKOFF_MIN, DIAL_BACKOFF_MAX)
        try:
            while not self._closed:
                nb = self._assigned.get(nid)
                if nb is None or not nb.dial:
                    return
                existing = self.links.get(nid)
                if existing is not None:
                    existing.wait_closed()
                    continue
                try:
                    link = self._dial_once(nb)
                except (AnomosError, OSError) as exc:
                    log.info("cannot link to NID %d at %s: %s", nid, nb.address, exc)
                    gevent.sleep(backoff.next())
                    continue
                if self._closed or not _same_neighbour(self._assigned.get(nid), nb):
                    with contextlib.suppress(OSError):
                        link.sock.close()
                    continue
                self._link_up(link)
                link.run()
                if not link.accepted:  # it closed before the neighbour's AUTH_OK
                    why = link.closed_reason
                    if why is not None and why.cause is CloseCause.NOT_ACCEPTED:
                        log.info("cannot link to NID %d at %s: %s", nid, nb.address, why)
                    gevent.sleep(backoff.next())
                    continue
                if time.monotonic() - link.opened_at >= STABLE_LINK:
                    backoff.reset()
                gevent.sleep(backoff.next())
        finally:
            if self._dialling.get(nid) is gevent.getcurrent():
                del self._dialling[nid]

    def _dial_once(self, nb: Any) -> Link:
        nid = int(nb.nid)
        expected = bytes(nb.identity)
        raw = self._dial_transport(nb.address).dial(
            nb.address, timeout=self.settings.connect_timeout
        )
        sock: Any = raw
        try:
            timeout = ProtocolError(f"link handshake with NID {nid} timed out")
            with gevent.Timeout(self.settings.handshake_timeout, timeout):
                sock = TLSStream(raw, self._client_ctx, server_side=False)
                sock.do_handshake()
                if certificate_identity(sock.getpeercert(binary_form=True)) != expected:
                    raise CryptoError(f"neighbour NID {nid} presented the wrong identity")
                reader = FrameReader(sock)
                challenge = bytes(_next_frame(reader, Cmd.AUTH_CHALLENGE))
                message = auth_message(challenge, expected, nid)
                signature = self.identity.signing.sign(message).signature
                ticket = bytes(getattr(nb, "ticket", b""))
                auth = encode_auth(
                    nid,
                    self.identity.identity_public,
                    signature,
                    ticket if offerable(ticket) else b"",
                )
                sock.sendall(encode_frame(LINK_CIRC_ID, Cmd.AUTH, auth))
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        # Up for our frames now; AUTH_OK is awaited by Link.run (see Link.accepted).
        budget = self._budget(nid, expected)
        return Link(
            nid, nb.address, expected, True, sock, reader, self, budget=budget, accepted=False
        )

    # ------------------------------------------------------------------ accepting
    def _accept(self, raw: socket.socket, remote: str) -> None:
        """Transport handler: authenticate, then serve the link in this greenlet."""
        if self._closed or self._server_ctx is None or not self._take_slot(remote):
            raw.close()
            return
        sock: Any = raw
        try:
            timeout = ProtocolError("link handshake timed out")
            with gevent.Timeout(self.settings.handshake_timeout, timeout):
                first = min(FIRST_BYTES_TIMEOUT, self.settings.handshake_timeout)
                silent = ProtocolError(f"no TLS handshake within {first:g} s")
                gevent.socket.wait_read(raw.fileno(), timeout=first, timeout_exc=silent)
                sock = TLSStream(raw, self._server_ctx, server_side=True)
                sock.do_handshake()
                reader = FrameReader(sock)
                challenge = secrets.token_bytes(32)
                sock.sendall(encode_frame(LINK_CIRC_ID, Cmd.AUTH_CHALLENGE, challenge))
                nid, identity, signature, ticket = decode_auth(_next_frame(reader, Cmd.AUTH))
                try:
                    nacl.signing.VerifyKey(identity).verify(
                        auth_message(challenge, self.identity.identity_public, nid), signature
                    )
                except (nacl.exceptions.BadSignatureError, ValueError):
                    raise CryptoError(
                        f"bad link signature from a caller claiming NID {nid}"
                    ) from None
                if ticket and nid not in self._assigned:
                    nb = self._admit(nid, identity, ticket)
                else:
                    nb = self._assignment_for(nid)
                if gevent.getcurrent() not in self._handshakes:  # evicted meanwhile
                    raise ProtocolError("handshake slot taken by a newer caller")
                if nb is None:
                    raise CryptoError(f"caller claimed NID {nid}, which is not our neighbour")
                if bytes(nb.identity) != identity:
                    raise CryptoError(f"caller claimed NID {nid} with the wrong identity key")
                budget = self._budget(nid, identity)
                if not budget.relinks.try_take():
                    raise ProtocolError(f"NID {nid} reconnects too often")
                sock.sendall(encode_frame(LINK_CIRC_ID, Cmd.AUTH_OK))
        except (AnomosError, OSError) as exc:
            log.info("refused link from %s: %s", remote, exc)
            with contextlib.suppress(OSError):
                sock.close()
            return
        finally:
            self._handshakes.pop(gevent.getcurrent(), None)
        if self._closed:
            sock.close()
            return
        link = Link(nid, nb.address, identity, False, sock, reader, self, budget=budget)
        self._link_up(link)
        link.run()

    def _take_slot(self, remote: str) -> bool:
        """A handshake slot for a caller from ``remote``, evicting the oldest stranger
        when all are taken; False (drop the caller) when there is none to give."""
        host = _host(remote)
        pending = self._handshakes
        transport = self._transport(self.settings.transport)
        shared = getattr(transport, "callers_share_an_address", False)  # e.g. all via tor
        if not shared and sum(h == host for h in pending.values()) >= MAX_HANDSHAKES_PER_ADDRESS:
            log.info("dropped a caller from %s: too many handshakes from there", host)
            return False
        if len(pending) >= MAX_PENDING_HANDSHAKES:
            oldest = next((g for g, h in pending.items() if h not in self._neighbour_hosts), None)
            if oldest is None:
                log.info("dropped a caller from %s: every handshake slot is taken", host)
                return False
            del pending[oldest]
            oldest.kill(ProtocolError("handshake slot taken by a newer caller"), block=False)
        pending[gevent.getcurrent()] = host
        return True

    def _admit(self, nid: int, identity: bytes, ticket: bytes) -> TicketedNeighbour:
        """Our neighbour ``nid`` on the strength of its edge ticket (it proved
        ``identity`` already); ``CryptoError`` if the ticket is not good for exactly
        this edge, now, from a tracker we pin."""
        good = open_ticket(
            ticket,
            self.trackers,
            dialer=identity,
            listener=self.identity.identity_public,
            nid=nid,
        )
        if len(self._assigned) >= MAX_NEIGHBOURS:
            raise ProtocolError(f"NID {nid}: already {MAX_NEIGHBOURS} neighbours")
        nb = TicketedNeighbour(nid, good.address, identity)
        self._assigned[nid] = nb
        self._ticketed[nid] = time.monotonic()
        self._neighbour_hosts |= {_host(nb.address)}
        log.info("NID %d admitted on its edge ticket", nid)
        if self.on_admitted is not None:
            self.on_admitted(nid)
        return nb

    def _assignment_for(self, nid: int) -> Any:
        """The assigned neighbour ``nid``: after the replies on their way (one may
        name it), refreshing from the tracker once if still unknown."""
        nb = self._assigned.get(nid)
        if nb is None and self._replies_due:
            gevent.wait(list(self._replies_due))
            nb = self._assigned.get(nid)
        if nb is not None or self.on_unknown_nid is None:
            return nb
        if time.monotonic() - self._last_refresh >= UNKNOWN_NID_INTERVAL:
            self._last_refresh = time.monotonic()
            try:
                with self.asking_tracker():  # (other callers wait for it, as above)
                    self.on_unknown_nid(nid)
            except Exception as exc:
                log.info("refreshing neighbours for unknown NID %d failed: %s", nid, exc)
        return self._assigned.get(nid)

    # ------------------------------------------------------------------ bookkeeping
    def _budget(self, nid: int, identity: bytes) -> NeighbourBudget:
        """The budget of neighbour ``nid`` with ``identity``, kept across its links."""
        key = (nid, identity)
        budget = self._budgets.pop(key, None) or NeighbourBudget()
        self._budgets[key] = budget  # the most recently used last
        while len(self._budgets) > MAX_BUDGETS:
            del self._budgets[next(iter(self._budgets))]
        return budget

    def _link_up(self, link: Link) -> None:
        """Make ``link`` the one to its neighbour (a dialler's before AUTH_OK came)."""
        old = self.links.get(link.nid)
        self.links[link.nid] = link
        if old is not None:
            old.close(CloseReason(CloseCause.REPLACED))
        self._changed.set()
        self._changed = gevent.event.Event()
        if link.accepted:
            self.link_accepted(link)

    def link_accepted(self, link: Link) -> None:
        """``link`` is authenticated both ways: now it is up for the peer and plugins."""
        log.info("link to NID %d (%s) is up", link.nid, link.address)
        self.plugins.notify(
            "anomos_neighbour_up", peer=self.peer, nid=link.nid, address=link.address
        )

    def _link_down(self, link: Link, reason: CloseReason) -> None:
        if self.links.get(link.nid) is link:
            del self.links[link.nid]
        nb = self._assigned.get(link.nid)
        if nb is not None and bytes(nb.identity) == link.identity:
            self._received[link.nid] = self._received.get(link.nid, 0) + link.cell_bytes_in
        if link.accepted:  # (else never up: the dial loop logs the failed dial)
            log.info("link to NID %d closed: %s", link.nid, reason)
        if self.on_link_down is not None:  # circuits queued on it break either way
            try:
                self.on_link_down(link, reason)
            except Exception:
                log.exception("link-down handler failed for NID %d", link.nid)
        if link.accepted:
            self.plugins.notify(
                "anomos_neighbour_down", peer=self.peer, nid=link.nid, reason=reason.text
            )
