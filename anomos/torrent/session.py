"""One torrent's swarm: the peer-wire protocol over any socket-like stream.

A :class:`TorrentSession` owns the torrent's :class:`~anomos.torrent.storage.Storage`,
:class:`~anomos.torrent.picker.PiecePicker` and :class:`~anomos.torrent.choker.Choker`.
Each stream given to :meth:`TorrentSession.add_connection` (a plain TCP socket
in tests, an anomos ``CircuitStream`` in the network) gets two greenlets: a
reader that parses and handles messages, and a writer that sends queued
control messages first, then the blocks the peer asked for, in big batches.

Every peer is hostile: a malformed message closes only its connection (one
logged line); a piece that fails its hash is thrown away, counted against the
connection that sent it, never asked of that connection again (every other
piece still is), reported to it (a :class:`~anomos.torrent.wire.BadPiece`) and
fetched again from another connection where there is one; a connection that
sent more bad pieces than good ones (at least :data:`MAX_STRIKES`) is closed.

A source told that a piece failed hashes its own copy again (at a bounded rate
per connection, only for pieces it sent there); a copy gone bad on disk is
withdrawn (a :class:`~anomos.torrent.wire.DontHave` to every connection, one
log line) and wanted again like any missing piece.

Files can be left out and given priorities (:meth:`TorrentSession.set_wanted`,
:meth:`TorrentSession.set_priority`), before or after start: a piece is fetched
when it touches a wanted file, at the highest priority of those files, and the
session is :attr:`~TorrentSession.complete` ("done", Transmission's
leftUntilDone = 0) once every such piece is verified. The choice is kept in
the resume data.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import gevent
import gevent.event
from gevent.greenlet import Greenlet
from gevent.pool import Group

from anomos.errors import AnomosError, ProtocolError, StorageError
from anomos.net.ratelimit import Throttle, TokenBucket
from anomos.progress import bar
from anomos.torrent import choker as choking
from anomos.torrent import flowtrace, resume
from anomos.torrent.choker import Choker, RateMeter
from anomos.torrent.flow import INITIAL_WINDOW, LATE_FACTOR, FlowControl, RttProbes
from anomos.torrent.picker import SKIP, Block, CopyGain, PiecePicker, Priority, band
from anomos.torrent.storage import Storage
from anomos.torrent.wire import (
    BLOCK_SIZE,
    MAX_FIRST_BLOCKS,
    MAX_FIRST_PIECES,
    METADATA_PIECE_SIZE,
    BadPiece,
    Bitfield,
    Cancel,
    Choke,
    DontHave,
    FirstAsk,
    Handshake,
    Have,
    Interested,
    KeepAlive,
    MessageReader,
    MetadataPiece,
    MetadataRequest,
    NotInterested,
    Piece,
    Request,
    Unchoke,
    encode_cancel,
    encode_have,
    encode_piece_header,
    encode_request,
    new_peer_id,
    pack_bitfield,
    unpack_bitfield,
)

if TYPE_CHECKING:
    from anomos.pluginmanager import Plugins
    from anomos.torrent.metainfo import Metainfo

log = logging.getLogger(__name__)

#: Bytes a piece message adds to its block (length, id, index, begin).
PIECE_OVERHEAD = 13
#: Requests a peer may have queued at us; more is a protocol error (libtorrent's
#: limit too; the ceiling of a connection's window, flow.MAX_WINDOW).
MAX_PEER_REQUESTS = 2000
#: Bytes asked of the stream per recv, and sent per sendall (at most, roughly).
RECV_SIZE = 256 * 1024
#: Under a download limit, a first ask is at most this many seconds of the limit,
FIRST_ASK_LIMIT_SECONDS = 1.0
#: and all connections together keep this many seconds of it in flight.
LIMIT_AHEAD_SECONDS = 4.0
#: A first ask is overdue (its pieces may be asked of other connections, which
#: wait for it till then) after FIRST_ASK_RTTS round trips of the slowest open
#: circuit (its own is unknown before it is built: building it and the answer take
#: ~1-2), and never before FIRST_ASK_PATIENCE seconds.
FIRST_ASK_RTTS = 4
FIRST_ASK_PATIENCE = 3.0
SEND_BATCH = 256 * 1024
#: Seconds a source holds the last partial cell of a burst while the peer's next
#: requests may fill it (a 16 KiB block and its header do not divide a cell: a burst
#: sent whole ends in a cell 1-50 % full, 2-11 % of a circuit's bytes). The peer
#: says when none are coming (a keep-alive); this bounds the wait if it does not.
HOLD_TAIL = 0.2
#: Seconds to wait for the peer's handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Send a keep-alive after this long without sending anything.
KEEPALIVE_INTERVAL = 60.0
#: Close a connection that sent nothing (or accepted nothing) for this long.
IDLE_TIMEOUT = 180.0
#: A peer that sends no requested block for this long is snubbed: its
#: requests go to others, and it is asked again after the same delay.
REQUEST_TIMEOUT = 60.0
#: How often keep-alives, idle and snub timers are checked.
MAINTENANCE_INTERVAL = 5.0
#: Endgame: a block outstanding at one connection is asked of another one too
#: only if that one would deliver it this many times sooner (or the holder is
#: late: flow.LATE_FACTOR). A copy nearly always arrives in full (the source sent
#: the first long before a cancel reaches it): each one is a wasted block.
COPY_MARGIN = 2.0
#: Endgame: a block its holder has no time for (no rate measured there yet, or a
#: first ask's block, sent unasked) is copied only once that holder delivered nothing
#: for this long (or LATE_FACTOR of the copier's RTT, if longer) since it was last
#: asked: until then it is not known to be late, and a copy most likely comes twice
#: (at the start of a small download, circuits opened together copied each other's
#: first blocks: 1.2-1.26x the selection in tests/test_select_e2e.py).
UNTIMED_GRACE = 0.5
#: Seconds of blocks before a connection's average delivered rate is trusted (the
#: endgame's estimate of how fast its queue drains).
AVERAGE_AFTER = 1.0
#: Seconds between endgame checks while no block arrives (a late or stalled
#: holder's blocks become worth copying with time, not with an event).
ENDGAME_CHECK = 0.25
#: How often resume data is saved while pieces keep arriving (a crash or a kill
#: costs at most the pieces of this many seconds).
RESUME_SAVE_INTERVAL = 5.0
#: Corrupt pieces a connection may send before it is closed, if it sent fewer
#: good ones than that (a source whose disk went bad in one place is kept).
MAX_STRIKES = 3
#: Pieces a downloader may make us re-hash at once (reporting them bad) over one
#: connection, and how many more per second after that: a hostile downloader
#: cannot make a source re-read its whole file.
RECHECK_BURST = 4
RECHECK_RATE = 0.1
#: Seconds between attempts to write again after a write failed (a full disk):
#: meanwhile no new blocks are requested.
WRITE_RETRY = 5.0
#: Times over one connection a downloader may ask for the whole metadata (a
#: magnet's ``info`` dict): more is a protocol error, so a hostile one cannot
#: make a source send it in a loop.
MAX_METADATA_SENDS = 2
#: Failed pieces whose block hashes are kept to find the culprit once the
#: piece verifies (several connections supplied blocks).
MAX_FAILED_STASH = 32
#: Buffers of finished pieces kept for the next ones (a new ``bytearray`` of a piece
#: is zeroed first: one byte of ``memset`` per byte received).
SPARE_PIECE_BUFFERS = 2


class Stream(Protocol):
    """What a session needs of a connection: a TCP socket or a CircuitStream."""

    def sendall(self, data: bytes, flags: int = 0, /) -> Any: ...

    def recv(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


@attrs.define(eq=False)
class PeerConnection:
    """One peer-wire connection of a session (live object, identity-hashed)."""

    session: TorrentSession = attrs.field(repr=False)
    stream: Stream = attrs.field(repr=False)
    label: str
    #: Our peer id on this connection: random, never reused.
    peer_id: bytes = attrs.field(factory=new_peer_id, repr=False)
    remote_peer_id: bytes | None = attrs.field(default=None, repr=False)
    handshaken: bool = False
    am_choking: bool = True
    am_interested: bool = False
    peer_choking: bool = True
    peer_interested: bool = False
    #: Corrupt pieces attributed to this connection, and good ones it alone supplied.
    strikes: int = 0
    good_pieces: int = 0
    #: Pieces we sent blocks of (created on the first one): only those may be reported bad.
    served: bytearray | None = attrs.field(default=None, repr=False)
    #: Re-hashes of our own pieces this connection may still make us do (BadPiece reports).
    rechecks: TokenBucket = attrs.field(
        factory=lambda: TokenBucket(RECHECK_RATE, RECHECK_BURST), repr=False
    )
    #: Since when ``am_interested`` has its present value (a source with nothing we
    #: want can be let go).
    interest_since: float = attrs.field(factory=time.monotonic, repr=False)
    #: Block payload bytes sent / received (received includes wasted ones).
    uploaded: int = 0
    downloaded: int = 0
    #: Payload received that we had not (or no longer) asked this peer for.
    wasted: int = 0
    #: When its first block arrived (monotonic): its average rate is counted from then.
    first_block_at: float | None = attrs.field(default=None, repr=False)
    closed: bool = False
    close_reason: str = ""
    greenlet: Greenlet | None = attrs.field(default=None, repr=False)
    writer: Greenlet | None = attrs.field(default=None, repr=False)
    seen_message: bool = attrs.field(default=False, repr=False)
    snubbed_until: float = attrs.field(default=0.0, repr=False)
    last_recv: float = attrs.field(factory=time.monotonic, repr=False)
    last_send: float = attrs.field(factory=time.monotonic, repr=False)
    last_block: float = attrs.field(factory=time.monotonic, repr=False)
    send_since: float | None = attrs.field(default=None, repr=False)
    control: list[bytes] = attrs.field(factory=list, repr=False)
    requests: deque[Block] = attrs.field(factory=deque, repr=False)
    wake: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    down_meter: RateMeter = attrs.field(factory=lambda: RateMeter(now=time.monotonic()), repr=False)
    up_meter: RateMeter = attrs.field(factory=lambda: RateMeter(now=time.monotonic()), repr=False)
    #: Metadata pieces sent over this connection (bounded: see MAX_METADATA_SENDS).
    metadata_sent: int = attrs.field(default=0, repr=False)
    #: Bytes of requests to keep in flight, from this connection's RTT and delivery rate.
    flow: FlowControl = attrs.field(factory=lambda: FlowControl(time.monotonic()), repr=False)
    #: At a source: the downloader's first ask (its circuit's HELLO), served at our
    #: first unchoke. At a downloader: the ask we sent, whose blocks count as requested
    #: at the source's first unchoke.
    ask_to_serve: FirstAsk | None = attrs.field(default=None, repr=False)
    ask_sent: FirstAsk | None = attrs.field(default=None, repr=False)
    #: At a source: the peer's last message was a request, so more are likely on their
    #: way (the writer holds a partial cell back for them; see HOLD_TAIL).
    more_requests_coming: bool = attrs.field(default=False, repr=False)
    #: At a downloader: requests went out since we last told the peer none are coming.
    asked_since_hint: bool = attrs.field(default=False, repr=False)

    @property
    def corrupt(self) -> bool:
        """It sent more corrupt pieces than good ones, at least :data:`MAX_STRIKES`:
        a source to drop (a liar, or a disk it does not check)."""
        return self.strikes >= MAX_STRIKES and self.strikes > self.good_pieces

    def send(self, data: bytes) -> None:
        """Queue an encoded message; the writer greenlet sends it before any block."""
        if not self.closed:
            self.control.append(data)
            self.wake.set()

    def download_rate(self, now: float) -> float:
        return self.down_meter.rate(now)

    def upload_rate(self, now: float) -> float:
        return self.up_meter.rate(now)


@attrs.define(eq=False)
class _PieceBuffer:
    data: bytearray
    #: The connection each block came from, by block number.
    suppliers: list[PeerConnection | None]


@attrs.frozen
class FileProgress:
    """One file of a session, as Transmission's fileStats tells it."""

    bytes_completed: int
    wanted: bool
    priority: Priority


def _copy_if_late(now: float) -> CopyGain:
    """The endgame under a download limit, where every copy takes bandwidth the limit
    rations: copy a block only from a holder that has measured its pace and is late by
    flow.LATE_FACTOR (stalled or slowed down)."""

    def gain(holder: Hashable, block: Block, ahead: int) -> float:
        assert isinstance(holder, PeerConnection)
        flow = holder.flow
        measured = flow.rate and math.isfinite(flow.min_rtt)
        return math.inf if measured and flow.time_left(block, now) == math.inf else -math.inf

    return gain


def _average_rate(conn: PeerConnection, now: float) -> float | None:
    """Useful bytes/s ``conn`` delivered since its first block (None: too soon to say)."""
    since = conn.first_block_at
    if since is None or now - since < AVERAGE_AFTER or conn.closed:
        return None
    return (conn.downloaded - conn.wasted) / (now - since)


class TorrentSession:
    """Download and/or seed one torrent over any number of connections.

    ``on_progress(session)`` is called after every verified piece.
    """

    def __init__(
        self,
        metainfo: Metainfo,
        data_root: str | os.PathLike[str],
        *,
        plugins: Plugins | None,
        resume_dir: str | os.PathLike[str] | None = None,
        label: str = "",
        on_progress: Callable[[TorrentSession], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.metainfo = metainfo
        self.data_root = Path(data_root)
        self.plugins = plugins
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None
        self.label = label or metainfo.name
        self.on_progress = on_progress
        self._rng = rng or random.Random()
        self._group = Group()
        self._conns: list[PeerConnection] = []
        self._buffers: dict[int, _PieceBuffer] = {}
        self._spare_pieces: list[bytearray] = []
        self._stash: OrderedDict[int, list[list[tuple[PeerConnection, int, bytes]]]] = OrderedDict()
        self._complete = gevent.event.Event()
        self._closed_event = gevent.event.Event()
        self._choker = Choker(rng=self._rng)
        self._storage: Storage | None = None
        self._picker: PiecePicker | None = None
        self._have = bytearray(len(metainfo.pieces))
        self._left = metainfo.total_length
        self._left_until_done = metainfo.total_length
        nfiles = len(metainfo.files)
        self._file_wanted = [True] * nfiles
        self._file_priority = [Priority.NORMAL] * nfiles
        #: The caller chose files before start: the saved choice is not loaded.
        self._selection_given = False
        self._size_when_done: int | None = None  # cached: progress is read per piece
        self._resume_dirty = False
        self._started = False
        self._ready = gevent.event.Event()
        self._start_error: Exception | None = None
        self._closed = False
        self.uploaded = 0
        self.downloaded = 0
        self.wasted = 0
        #: Shared by the connections' flow controllers: they probe their RTT together.
        self._rtt_probes = RttProbes()
        #: Pieces that failed their hash check (each failure counted).
        self.hash_failures = 0
        #: Pieces that failed their hash check and are not verified yet.
        self.failed_pieces: set[int] = set()
        #: Our own pieces found bad on disk after a downloader reported them.
        self.lost_pieces: set[int] = set()
        #: Why the last piece could not be written (a full disk), until one is.
        self.write_error: str | None = None
        self._write_retry_at = 0.0
        #: Pieces hashed at start (resume tests compare it with the pieces of changed files).
        self.rechecked = 0
        #: When (time.monotonic()) the first block arrived, for time-to-first-byte.
        self.first_block_at: float | None = None
        #: When the first piece was verified (monotonic): the start of a download, measured.
        self.first_piece_at: float | None = None
        #: Pieces named by first asks whose sources have not answered yet (the next
        #: circuit's ask names others, and the picker holds them back: reserve).
        self._named_first: set[int] = set()
        #: Endgame: copy a block only where it saves time (COPY_MARGIN), to one more
        #: connection at most; else every outstanding block is asked of every connection
        #: (the classic endgame: 1-24 % of the file thrown away over circuits, whose
        #: cancels come too late). On since the windows fit the end of a download
        #: (docs/performance.md, *Full cells, fewer copies*).
        self.limit_endgame_copies = True
        #: The pending endgame check (see ENDGAME_CHECK), if any.
        self._endgame_timer: Greenlet | None = None
        #: The pending look at the pieces of a first ask becoming overdue, if any.
        self._overdue_timer: Greenlet | None = None
        #: Speed limits the daemon sets (this torrent's, the session's): bytes read from
        #: every connection, and block bytes sent, wait for tokens of each.
        self.download_throttles: tuple[Throttle, ...] = ()
        self.upload_throttles: tuple[Throttle, ...] = ()

    # ------------------------------------------------------------------ properties
    @property
    def complete(self) -> bool:
        """Every piece of the wanted files is verified (all pieces, by default)."""
        return self._complete.is_set()

    @property
    def have(self) -> bytes:
        """The BEP 3 bitfield of verified pieces."""
        return pack_bitfield(self._have)

    def has_piece(self, index: int) -> bool:
        return bool(self._have[index])

    @property
    def left(self) -> int:
        """Bytes of the torrent not verified here, wanted or not (BEP 3's ``left``, as
        announced: the tracker takes ``left`` < size for "has data")."""
        return self._left

    @property
    def left_until_done(self) -> int:
        """Bytes of wanted pieces still to download (Transmission's leftUntilDone)."""
        return self._left_until_done

    @property
    def size_when_done(self) -> int:
        """Bytes of the pieces of the wanted files (Transmission's sizeWhenDone)."""
        if self._size_when_done is None:
            m = self.metainfo
            bands = self._piece_bands()
            self._size_when_done = sum(m.piece_size(i) for i, b in enumerate(bands) if b < SKIP)
        return self._size_when_done

    @property
    def progress(self) -> float:
        size = self.size_when_done
        return 1.0 - self._left_until_done / size if size else 1.0

    # ------------------------------------------------------------------ file selection
    def set_wanted(self, file_indices: Iterable[int], wanted: bool) -> None:
        """Fetch (or leave out) these files; a piece shared with a wanted file is fetched.

        Before :meth:`start` this replaces the choice saved in the resume data.
        """
        indices = self._file_indices(file_indices)
        changed = any(self._file_wanted[fi] != wanted for fi in indices)
        for fi in indices:
            self._file_wanted[fi] = wanted
        self._selection_changed(changed)

    def set_priority(self, file_indices: Iterable[int], priority: Priority) -> None:
        """Pieces of higher-priority files are requested first (rarest first within)."""
        priority = Priority(priority)
        indices = self._file_indices(file_indices)
        changed = any(self._file_priority[fi] != priority for fi in indices)
        for fi in indices:
            self._file_priority[fi] = priority
        self._selection_changed(changed)

    def file_progress(self) -> tuple[FileProgress, ...]:
        """Per file: verified bytes, wanted, priority (Transmission's fileStats)."""
        m = self.metainfo
        pl = m.piece_length
        out = []
        for fi, f in enumerate(m.files):
            done = 0
            for i in resume.pieces_of_file(m, fi):
                if self._have[i]:
                    start = max(i * pl, f.offset)
                    end = min(i * pl + m.piece_size(i), f.offset + f.length)
                    done += end - start
            out.append(FileProgress(done, self._file_wanted[fi], self._file_priority[fi]))
        return tuple(out)

    def _file_indices(self, file_indices: Iterable[int]) -> list[int]:
        indices = list(file_indices)
        nfiles = len(self.metainfo.files)
        bad = [i for i in indices if not 0 <= i < nfiles]
        if bad:
            raise ValueError(f"no file {bad[0]} in {self.label} (it has {nfiles} files)")
        return indices

    def _piece_bands(self) -> bytearray:
        """Per piece, the highest priority band of the wanted files it touches (or SKIP)."""
        m = self.metainfo
        bands = bytearray([SKIP]) * len(m.pieces)
        for fi, f in enumerate(m.files):
            if f.pad or not self._file_wanted[fi]:
                continue
            b = band(self._file_priority[fi])
            for i in resume.pieces_of_file(m, fi):
                if b < bands[i]:
                    bands[i] = b
        return bands

    def _unwanted_files(self) -> set[int]:
        return {fi for fi, w in enumerate(self._file_wanted) if not w}

    def _selection_changed(self, changed: bool) -> None:
        """Apply a new choice of files to the picker, interests, done-ness and resume data."""
        if self._closed:
            raise RuntimeError("session is closed")
        self._size_when_done = None
        picker = self._picker
        if picker is None:
            self._selection_given = True  # even the default, chosen before start, is a choice
        if picker is None or not changed:
            return
        m = self.metainfo
        for index, new in enumerate(self._piece_bands()):
            was_wanted = picker.wanted(index)
            interesting, bored = picker.set_band(index, new)
            if not self._have[index] and was_wanted != picker.wanted(index):
                size = m.piece_size(index)
                self._left_until_done += size if new < SKIP else -size
                if new == SKIP:
                    self._buffers.pop(index, None)
            for conn in interesting:
                assert isinstance(conn, PeerConnection)
                self._set_interested(conn, True)
            for conn in bored:
                assert isinstance(conn, PeerConnection)
                self._set_interested(conn, False)
        if picker.complete:
            self._done()
        else:
            self._complete.clear()
        self._save_resume()
        for conn in list(self._conns):
            self._fill(conn)

    @property
    def connections(self) -> tuple[PeerConnection, ...]:
        return tuple(self._conns)

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            raise RuntimeError("session not started")
        return self._storage

    @property
    def picker(self) -> PiecePicker:
        if self._picker is None:
            raise RuntimeError("session not started")
        return self._picker

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open storage, check what is on disk (resume data first) and start timers.

        Called again (or by :meth:`add_connection`) while a first call is still
        hashing, it waits for that one to finish; a failed start raises again.
        """
        if self._started:
            self._ready.wait()
            if self._start_error is not None:
                raise self._start_error
            return
        if self._closed:
            raise RuntimeError("session is closed")
        self._started = True
        try:
            self._start()
        except Exception as exc:
            self._start_error = exc
            raise
        finally:
            self._ready.set()

    def _start(self) -> None:
        m = self.metainfo
        storage = Storage(m, self.data_root)
        self._storage = storage
        saved = resume.load(self.resume_dir, m) if self.resume_dir is not None else None
        if saved is not None and saved.wanted is not None and not self._selection_given:
            self._file_wanted = list(saved.wanted)
            self._file_priority = [Priority(p) for p in saved.priorities or self._file_priority]
            self._size_when_done = None
        have, recheck = resume.plan(m, saved, storage.file_stats())
        size = sum(m.piece_size(i) for i in recheck)
        with bar(size, f"check {m.name}", enabled=None if size else False) as checking:
            for index in recheck:
                have[index] = 1 if storage.check_piece(index) else 0
                checking.update(m.piece_size(index))
                gevent.sleep(0)
        self.rechecked = len(recheck)
        self._have = have
        bands = self._piece_bands()
        self._left = sum(m.piece_size(i) for i in range(len(have)) if not have[i])
        self._left_until_done = sum(
            m.piece_size(i) for i in range(len(have)) if not have[i] and bands[i] < SKIP
        )
        self._picker = PiecePicker(
            len(m.pieces), m.piece_size, have=have, bands=bands, rng=self._rng
        )
        log.info(
            "%s: %d of %d pieces on disk (%d re-hashed)",
            self.label,
            sum(have),
            len(have),
            len(recheck),
        )
        if self._picker.complete:
            storage.finish(skip=self._unwanted_files())
            self._complete.set()
        if self.resume_dir is not None and (recheck or saved is None):
            self._save_resume()
        self._spawn(self._choke_loop)
        self._spawn(self._maintenance_loop)
        trace = flowtrace.trace_dir()
        if trace is not None:
            self._spawn(flowtrace.run, self, trace)
        if self.resume_dir is not None:
            self._spawn(self._resume_loop)

    def add_connection(
        self, stream: Stream, label: str, *, asked: bool = False, first_ask: bytes = b""
    ) -> Greenlet:
        """Run the peer-wire protocol over ``stream``; the greenlet ends when it closes."""
        greenlet = self.connect(stream, label, asked=asked, first_ask=first_ask).greenlet
        assert greenlet is not None
        return greenlet

    def first_ask(self, blocks: int = INITIAL_WINDOW // BLOCK_SIZE) -> FirstAsk | None:
        """What a new circuit's HELLO asks its source to send unasked, at once: ``blocks``
        blocks of wanted pieces not started (nor named by another circuit's ask still
        unanswered), more pieces than needed in case the source lacks some. None
        when there is nothing to ask for. Under a download limit, at most
        :data:`FIRST_ASK_LIMIT_SECONDS` of it: the rest would wait unread in the
        circuit, ahead of every later request."""
        self.start()
        if self.complete:
            return None
        limit = self.download_limit
        if limit is not None:
            blocks = min(blocks, max(1, int(limit * FIRST_ASK_LIMIT_SECONDS) // BLOCK_SIZE))
        picker = self.picker
        size = self.metainfo.piece_size(0)
        per_piece = max(1, -(-size // BLOCK_SIZE))
        count = min(MAX_FIRST_PIECES, 2 * -(-blocks // per_piece))
        pieces = picker.unstarted(count, exclude=self._named_first)
        if not pieces:
            return None
        self._named_first.update(pieces)
        rtts = [c.flow.min_rtt for c in self._conns if math.isfinite(c.flow.min_rtt)]
        picker.reserve(pieces, max(FIRST_ASK_PATIENCE, FIRST_ASK_RTTS * max(rtts, default=0)))
        return FirstAsk(min(blocks, MAX_FIRST_BLOCKS), tuple(pieces))

    def first_ask_answered(self, ask: FirstAsk) -> None:
        """``ask``'s source answered (or its circuit failed): later asks and requests may
        name its pieces, and connections that found only those asked for nothing."""
        self._named_first.difference_update(ask.pieces)
        if self._picker is None:
            return
        self._picker.unreserve(ask.pieces)
        self._fill_all()

    def _fill_all(self) -> None:
        """Top up every connection (pieces held back for a first ask are free now)."""
        if not self._closed and not self.complete:
            for conn in list(self._conns):
                self._fill(conn)

    def _look_again_when_overdue(self) -> None:
        """A connection got fewer blocks than it had room for: if a first ask in flight
        holds pieces back, fill every connection again once it is overdue."""
        due = self.picker.reserved_due()
        timer = self._overdue_timer
        if due is None or self._closed or (timer is not None and not timer.dead):
            return  # (a pending look schedules the next one if still needed)

        def look() -> None:
            self._overdue_timer = None
            self._fill_all()

        self._overdue_timer = gevent.spawn_later(max(0.0, due - time.monotonic()), look)
        self._group.add(self._overdue_timer)

    def connect(
        self,
        stream: Stream,
        label: str,
        *,
        asked: bool = False,
        first_ask: bytes = b"",
        ask_sent: FirstAsk | None = None,
    ) -> PeerConnection:
        """:meth:`add_connection`, returning the connection (its figures stay readable).

        ``asked``: the peer opened this connection to fetch this torrent from us (a
        circuit with us as its source), so it is interested before it says so: a
        free upload slot unchokes it in our first answer, one round trip sooner.
        ``first_ask``: with ``asked``, the encoded :class:`FirstAsk` its HELLO
        carried (checked here: a bad one is a ``ProtocolError``), whose blocks go
        out with our first unchoke. ``ask_sent``: the one we sent this source.
        """
        if self._closed:
            stream.close()
            raise RuntimeError("session is closed")
        try:
            self.start()
        except BaseException:
            stream.close()
            raise
        conn = PeerConnection(session=self, stream=stream, label=label)
        conn.flow = FlowControl(time.monotonic(), self._rtt_probes)
        if first_ask and asked:
            conn.ask_to_serve = FirstAsk.decode(first_ask, len(self.metainfo.pieces))
        conn.ask_sent = ask_sent
        # Queued before the connection is visible to the others: any have (or
        # don't-have) sent to it meanwhile goes out after the handshake.
        conn.send(Handshake(self.metainfo.infohash, conn.peer_id).encode())
        if any(self._have):
            conn.send(Bitfield(pack_bitfield(self._have)).encode())
        if not self.complete:
            # Interested at once, not after the peer's bitfield: a source can
            # unchoke in its first answer, one round trip sooner (over a circuit
            # of several relays, a good part of a second). Withdrawn if the
            # bitfield shows nothing we want.
            conn.am_interested = True
            conn.send(Interested().encode())
        self._conns.append(conn)
        if asked and any(self._have):
            conn.peer_interested = True
            self._maybe_unchoke(conn)
        conn.writer = self._spawn(self._write_loop, conn)
        conn.greenlet = self._spawn(self._read_loop, conn)
        return conn

    def close_connection(self, conn: PeerConnection, reason: str) -> None:
        """Close one connection (its greenlet from :meth:`add_connection` ends)."""
        self._close_conn(conn, reason)

    def wait_complete(self, timeout: float | None = None) -> bool:
        """Block until every piece is verified on disk; False on timeout or close."""
        gevent.wait([self._complete, self._closed_event], timeout=timeout, count=1)
        return self._complete.is_set()

    def close(self) -> None:
        """Close every connection, stop the timers, save resume data, close files."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        for conn in list(self._conns):
            self._close_conn(conn, "session closed")
        current = gevent.getcurrent()
        others = [g for g in list(self._group) if g is not current]
        for g in others:
            g.kill(block=False)
        gevent.joinall(others, timeout=5)
        if self._storage is not None:
            try:
                if self.resume_dir is not None and self._picker is not None:
                    # (only once the check at start finished: a half-checked have-field
                    # saved with the files' stats would hide the pieces not yet checked)
                    self._save_resume()
            finally:
                self._storage.close()

    def _spawn(self, func: Callable[..., Any], *args: Any) -> Greenlet:
        g: Greenlet = self._group.spawn(func, *args)
        g.link_exception(self._crashed)
        return g

    def _crashed(self, g: Greenlet) -> None:
        log.error("%s: greenlet %s crashed: %r", self.label, g, g.exception, exc_info=g.exc_info)

    def _notify(self, hook: str, **kwargs: Any) -> None:
        if self.plugins is not None:
            self.plugins.notify(hook, torrent=self, **kwargs)

    # ------------------------------------------------------------------ connections
    def _read_loop(self, conn: PeerConnection) -> None:
        m = self.metainfo
        reader = MessageReader(len(m.pieces), m.piece_size)
        stream = conn.stream
        try:
            messages: list[Any] = []
            with gevent.Timeout(
                HANDSHAKE_TIMEOUT, ProtocolError(f"no handshake within {HANDSHAKE_TIMEOUT:g} s")
            ):
                while not messages:
                    data = stream.recv(self._recv_size())
                    if not data:
                        raise ProtocolError("closed during the handshake")
                    messages = reader.feed(data)
            conn.last_recv = time.monotonic()
            self._on_handshake(conn, messages[0])
            self._throttle_download(len(data))
            self._handle_all(conn, messages[1:])
            while not conn.closed:
                # Let other connections run even when this stream always has data.
                gevent.sleep(0)
                data = stream.recv(self._recv_size())
                if not data:
                    self._close_conn(conn, "closed by peer")
                    return
                self._throttle_download(len(data))
                conn.last_recv = time.monotonic()
                self._handle_all(conn, reader.feed(data))
        except AnomosError as exc:
            self._close_conn(conn, str(exc))
        except OSError as exc:
            self._close_conn(conn, f"connection lost: {exc.strerror or exc}")
        finally:
            self._close_conn(conn, "closed")

    @property
    def download_limit(self) -> float | None:
        """Bytes per second the tightest download throttle allows (None: no limit)."""
        rates = [t.rate for t in self.download_throttles if t.rate]
        return min(rates) if rates else None

    def _recv_size(self) -> int:
        size = RECV_SIZE
        for throttle in self.download_throttles:
            size = throttle.step(size)
        return size

    def _throttle_download(self, size: int) -> None:
        """Wait for the download limits before handling ``size`` bytes read (reading
        late closes the circuit's window, so the source slows down)."""
        for throttle in self.download_throttles:
            throttle.take(size)

    def _write_loop(self, conn: PeerConnection) -> None:
        stream = conn.stream
        storage = self.storage
        # Circuits hold a partial cell back under this flag; sockets have none here.
        more_flag = getattr(stream, "more_flag", 0)
        corked = False
        try:
            while not conn.closed:
                if not conn.wake.wait(HOLD_TAIL if corked else None):
                    stream.sendall(b"")  # no request came to fill the held cell
                    corked = False
                    continue
                conn.wake.clear()
                while not conn.closed:
                    parts = conn.control
                    conn.control = []
                    size = sum(len(p) for p in parts)
                    served = 0
                    requests = conn.requests
                    while requests and size < SEND_BATCH and not conn.am_choking:
                        index, begin, length = requests.popleft()
                        if conn.served is None:
                            conn.served = bytearray(len(self._have))
                        conn.served[index] = 1
                        parts.append(encode_piece_header(index, begin, length))
                        parts.append(storage.read_block(index, begin, length))
                        size += 13 + length
                        served += length
                    if not parts:
                        if corked and not conn.more_requests_coming:
                            stream.sendall(b"")  # what the last burst held back goes now
                            corked = False
                        break
                    for throttle in self.upload_throttles if served else ():
                        throttle.take(served)
                    now = time.monotonic()
                    if served:
                        conn.uploaded += served
                        self.uploaded += served
                        conn.up_meter.add(served, now)
                    conn.send_since = now
                    # More blocks to come (queued, or the peer's next requests): let
                    # the stream fill its last cell with them rather than send a nearly
                    # empty one (MSG_MORE).
                    corked = (
                        more_flag != 0
                        and not conn.am_choking
                        and (bool(requests) or (served > 0 and conn.more_requests_coming))
                    )
                    stream.sendall(b"".join(parts), more_flag if corked else 0)
                    conn.send_since = None
                    conn.last_send = time.monotonic()
                    gevent.sleep(0)
        except AnomosError as exc:
            self._close_conn(conn, str(exc))
        except OSError as exc:
            self._close_conn(conn, f"connection lost: {exc.strerror or exc}")

    def _close_conn(self, conn: PeerConnection, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.close_reason = reason
        quiet = ("session closed", "closed by peer", "both sides complete")
        level = logging.DEBUG if reason in quiet else logging.INFO
        log.log(level, "%s: connection %s closed: %s", self.label, conn.label, reason)
        if conn.downloaded:
            log.info("%s: connection %s: %s", self.label, conn.label, conn.flow.describe())
        if conn in self._conns:
            self._conns.remove(conn)
        conn.requests.clear()
        conn.control.clear()
        if conn.ask_sent is not None:
            self.first_ask_answered(conn.ask_sent)
        picker = self._picker
        was_unchoked = not conn.am_choking
        if picker is not None and conn.handshaken:
            picker.remove_peer(conn)
        current = gevent.getcurrent()
        for g in (conn.writer, conn.greenlet):
            if g is not None and g is not current:
                g.kill(block=False)
        try:
            conn.stream.close()
        except OSError:
            pass
        if self._closed:
            return
        # Its blocks are free again, and maybe an upload slot too.
        for other in list(self._conns):
            self._fill(other)
        if was_unchoked:
            for other in list(self._conns):
                self._maybe_unchoke(other)

    def _on_handshake(self, conn: PeerConnection, msg: Any) -> None:
        if not isinstance(msg, Handshake):  # pragma: no cover - the reader guarantees it
            raise ProtocolError("expected a handshake")
        if msg.infohash != self.metainfo.infohash:
            raise ProtocolError(f"handshake for another torrent ({msg.infohash.hex()[:16]}...)")
        if msg.peer_id == conn.peer_id:
            raise ProtocolError("connected to itself")
        conn.remote_peer_id = msg.peer_id
        conn.handshaken = True
        self.picker.add_peer(conn)
        log.debug("%s: connection %s handshaken", self.label, conn.label)

    # ------------------------------------------------------------------ messages
    def _handle_all(self, conn: PeerConnection, messages: Iterable[Any]) -> None:
        for msg in messages:
            if conn.closed:
                return
            kind = type(msg)
            if kind is not Request and conn.more_requests_coming:
                conn.more_requests_coming = False  # the writer sends what it held back
                conn.wake.set()
            if kind is Piece:
                self._on_piece(conn, msg)
            elif kind is Request:
                self._on_request(conn, msg)
            elif kind is Have:
                if self.picker.peer_have(conn, msg.index):
                    self._set_interested(conn, True)
                self._close_if_both_seeds(conn)
            elif kind is Bitfield:
                if conn.seen_message:
                    raise ProtocolError("bitfield after other messages")
                flags = unpack_bitfield(msg.bits, len(self.metainfo.pieces))
                if self.picker.peer_bitfield(conn, flags):
                    self._set_interested(conn, True)
                elif conn.am_interested and not self.picker.interesting(conn):
                    self._set_interested(conn, False)
                self._close_if_both_seeds(conn)
            elif kind is Unchoke:
                if conn.peer_choking:
                    conn.peer_choking = False
                    self.picker.peer_unchoked(conn)
                    if conn.ask_sent is not None:
                        self._adopt_first(conn)
                    self._fill(conn)
            elif kind is Choke:
                if not conn.peer_choking:
                    conn.peer_choking = True
                    self.picker.peer_choked(conn)
                    for other in list(self._conns):
                        self._fill(other)
            elif kind is Interested:
                conn.peer_interested = True
                self._maybe_unchoke(conn)
            elif kind is NotInterested:
                conn.peer_interested = False
                if not conn.am_choking:
                    self._set_choking(conn, True)
                    for other in list(self._conns):
                        self._maybe_unchoke(other)
            elif kind is Cancel:
                try:
                    conn.requests.remove((msg.index, msg.begin, msg.length))
                except ValueError:
                    pass
            elif kind is DontHave:
                self._on_dont_have(conn, msg.index)
            elif kind is BadPiece:
                self._on_bad_piece(conn, msg.index)
            elif kind is MetadataRequest:
                self._on_metadata_request(conn, msg.piece)
            elif kind is MetadataPiece:
                raise ProtocolError("sent metadata nobody asked for")
            elif kind is KeepAlive:
                continue
            conn.seen_message = True

    def _on_metadata_request(self, conn: PeerConnection, piece: int) -> None:
        """A magnet's downloader asks for piece ``piece`` of our ``info`` dict (BEP 9 style)."""
        info = self.metainfo.info_bytes
        count = -(-len(info) // METADATA_PIECE_SIZE)
        if piece >= count:
            raise ProtocolError(f"metadata request for piece {piece} of {count}")
        if conn.metadata_sent >= MAX_METADATA_SENDS * count:
            raise ProtocolError(f"asked for the metadata more than {MAX_METADATA_SENDS} times")
        conn.metadata_sent += 1
        start = piece * METADATA_PIECE_SIZE
        data = info[start : start + METADATA_PIECE_SIZE]
        conn.send(MetadataPiece(piece, len(info), data).encode())

    def _on_request(self, conn: PeerConnection, msg: Request) -> None:
        if conn.am_choking:
            return  # BEP 3: requests from a choked peer are dropped
        if msg.index in self.lost_pieces and not self._have[msg.index]:
            return  # sent before our don't-have arrived
        if not self._have[msg.index]:
            raise ProtocolError(f"request for piece {msg.index}, which we do not have")
        if len(conn.requests) >= MAX_PEER_REQUESTS:
            raise ProtocolError(f"more than {MAX_PEER_REQUESTS} requests queued")
        conn.requests.append((msg.index, msg.begin, msg.length))
        conn.more_requests_coming = True
        conn.wake.set()

    def _on_dont_have(self, conn: PeerConnection, index: int) -> None:
        """The peer withdrew a piece (its copy went bad): ask others for it."""
        if self.picker.peer_lost(conn, index):
            self._set_interested(conn, False)
        for other in list(self._conns):
            self._fill(other)

    def _on_bad_piece(self, conn: PeerConnection, index: int) -> None:
        """The peer says the piece we sent failed its hash: check our copy again.

        Only for a piece we sent over this connection and still offer, and at most
        :data:`RECHECK_BURST` at once then :data:`RECHECK_RATE` per second per
        connection: the re-hashing a peer can cause is bounded by what it downloaded.
        """
        served = conn.served
        if served is None or not served[index] or not self._have[index]:
            return
        if not conn.rechecks.try_take():
            log.debug(
                "%s: %s reported piece %d bad too often; ignored", self.label, conn.label, index
            )
            return
        if self.storage.check_piece(index):
            log.info(
                "%s: %s reported piece %d bad, but it is intact here", self.label, conn.label, index
            )
            return
        self._lose_piece(index)

    def _lose_piece(self, index: int) -> None:
        """Our copy of piece ``index`` is bad on disk: stop offering it, want it again."""
        self._have[index] = 0
        self._left += self.metainfo.piece_size(index)
        if self.picker.wanted(index):
            self._left_until_done += self.metainfo.piece_size(index)
            self._complete.clear()
        self.lost_pieces.add(index)
        self.storage.mark_missing(index)
        log.warning(
            "%s: piece %d is corrupt on disk (a downloader's hash check failed): no longer offered",
            self.label,
            index,
        )
        self._save_resume()
        withdrawn = DontHave(index).encode()
        for conn in list(self._conns):
            if conn.requests:
                kept = [r for r in conn.requests if r[0] != index]
                conn.requests.clear()
                conn.requests.extend(kept)
            conn.send(withdrawn)
        for other in self.picker.piece_lost(index):
            assert isinstance(other, PeerConnection)
            self._set_interested(other, True)

    def _on_piece(self, conn: PeerConnection, msg: Piece) -> None:
        n = len(msg.block)
        now = time.monotonic()
        conn.downloaded += n
        self.downloaded += n
        conn.down_meter.add(n, now)
        picker = self.picker
        index, begin = msg.index, msg.begin
        block = (index, begin, n)
        conn.flow.on_block(block, n, now)
        if conn.first_block_at is None:
            conn.first_block_at = now
        if self.first_block_at is None:
            self.first_block_at = now
        result = picker.block_received(conn, block)
        if not result.accepted:
            conn.wasted += n
            self.wasted += n
            return
        conn.last_block = now
        buf = self._buffers.get(index)
        if buf is None:
            buf = self._buffers[index] = self._piece_buffer(index)
        buf.data[begin : begin + n] = msg.block
        buf.suppliers[begin // BLOCK_SIZE] = conn
        for other, copy in result.cancels:
            assert isinstance(other, PeerConnection)
            other.send(encode_cancel(*copy))
        if result.piece_complete:
            self._piece_complete(index)
        if conn.closed:
            return
        self._fill(conn)
        if result.cancels or (len(self._conns) > 1 and picker.in_endgame):
            for other in list(self._conns):
                if other is not conn:
                    self._fill(other)

    # ------------------------------------------------------------------ pieces
    def _piece_complete(self, index: int) -> None:
        buf = self._buffers.pop(index)
        picker = self.picker
        try:
            ok = self.storage.write_piece(index, buf.data)
        except StorageError as exc:
            # Most likely a full disk: keep the connections, pause requests, retry.
            picker.piece_failed(index, ())
            if self.write_error is None:
                log.info("%s: %s", self.label, exc)
            self.write_error = str(exc)
            self._write_retry_at = time.monotonic() + WRITE_RETRY
            return
        if self.write_error is not None:
            log.info("%s: pieces are written again", self.label)
            self.write_error = None
        if ok:
            self._piece_verified(index, buf)
        else:
            self._piece_failed(index, buf)
        # On disk, or hashed for blame: nothing reads these bytes any more.
        spare = self._spare_pieces
        if len(buf.data) == self.metainfo.piece_length and len(spare) < SPARE_PIECE_BUFFERS:
            spare.append(buf.data)

    def _piece_buffer(self, index: int) -> _PieceBuffer:
        """Where the blocks of piece ``index`` gather: a finished piece's buffer if one
        is spare (the piece is hashed only once every block of it was written over it)."""
        size = self.metainfo.piece_size(index)
        spare = self._spare_pieces
        data = spare.pop() if spare and size == self.metainfo.piece_length else bytearray(size)
        return _PieceBuffer(data, [None] * (-(-size // BLOCK_SIZE)))

    def _piece_verified(self, index: int, buf: _PieceBuffer) -> None:
        if self.first_piece_at is None:
            self.first_piece_at = time.monotonic()
        picker = self.picker
        picker.piece_verified(index)
        self._have[index] = 1
        self._left -= len(buf.data)
        if picker.wanted(index):
            self._left_until_done -= len(buf.data)
        self._resume_dirty = True
        self.failed_pieces.discard(index)
        suppliers = {c for c in buf.suppliers if c is not None}
        if len(suppliers) == 1:
            next(iter(suppliers)).good_pieces += 1
        self._blame_stashed(index, buf.data)
        have_msg = encode_have(index)
        for conn in list(self._conns):
            if not conn.handshaken:
                conn.send(have_msg)
                continue
            if not picker.peer_has(conn, index):
                conn.send(have_msg)
            if conn.am_interested and not picker.interesting(conn):
                self._set_interested(conn, False)
        self._notify("anomos_piece_verified", index=index)
        if self.on_progress is not None:
            try:
                self.on_progress(self)
            except Exception:
                log.exception("%s: on_progress callback failed", self.label)
        if picker.complete:
            self._done()

    def _done(self) -> None:
        """Every wanted piece is verified: create the empty files, save, tell everyone."""
        if self._complete.is_set():
            return
        self.storage.finish(skip=self._unwanted_files())
        if self.resume_dir is not None:
            self._save_resume()
        self._complete.set()
        log.info("%s: download complete", self.label)
        self._notify("anomos_download_complete")
        for conn in list(self._conns):
            self._close_if_both_seeds(conn)

    def _piece_failed(self, index: int, buf: _PieceBuffer) -> None:
        suppliers = {c for c in buf.suppliers if c is not None}
        self.hash_failures += 1
        self.failed_pieces.add(index)
        self.picker.piece_failed(index, suppliers)
        source = ", ".join(sorted({c.label for c in suppliers}))
        log.warning("%s: piece %d failed its hash check (from %s)", self.label, index, source)
        self._notify("anomos_piece_failed", index=index, source=source)
        if len(suppliers) == 1:
            self._strike(next(iter(suppliers)), index)
        elif suppliers:
            # Several sources: remember each block's hash and blame whoever
            # sent a block that differs once the piece verifies.
            data = memoryview(buf.data)
            record = []
            for bno, c in enumerate(buf.suppliers):
                if c is not None:
                    chunk = data[bno * BLOCK_SIZE : (bno + 1) * BLOCK_SIZE]
                    record.append((c, bno, hashlib.sha1(chunk).digest()))
            self._stash.setdefault(index, []).append(record)
            self._stash.move_to_end(index)
            while len(self._stash) > MAX_FAILED_STASH:
                self._stash.popitem(last=False)
        for conn in list(self._conns):
            self._fill(conn)

    def _blame_stashed(self, index: int, good: bytearray) -> None:
        records = self._stash.pop(index, None)
        if not records:
            return
        data = memoryview(good)
        digests: dict[int, bytes] = {}
        for record in records:
            bad: set[PeerConnection] = set()
            for conn, bno, digest in record:
                if bno not in digests:
                    chunk = data[bno * BLOCK_SIZE : (bno + 1) * BLOCK_SIZE]
                    digests[bno] = hashlib.sha1(chunk).digest()
                if digests[bno] != digest:
                    bad.add(conn)
            for conn in bad:
                self._strike(conn, index)

    def _close_if_both_seeds(self, conn: PeerConnection) -> None:
        """Two complete peers have nothing to trade: free the stream (a circuit)."""
        if self.complete and conn.handshaken and self.picker.is_seed(conn):
            self._close_conn(conn, "both sides complete")

    def _strike(self, conn: PeerConnection, index: int) -> None:
        """``conn`` sent a bad copy of piece ``index``: never ask it for that piece again,
        tell it, and drop it once it sent more bad pieces than good ones."""
        conn.strikes += 1
        log.info(
            "%s: connection %s sent corrupt data for piece %d (%d bad, %d good pieces)",
            self.label,
            conn.label,
            index,
            conn.strikes,
            conn.good_pieces,
        )
        if conn.closed:
            return
        if self.picker.peer_lost(conn, index, refuse=True):
            self._set_interested(conn, False)
        conn.send(BadPiece(index).encode())
        if conn.corrupt:
            self._close_conn(
                conn, f"sent corrupt data for {conn.strikes} pieces ({conn.good_pieces} good)"
            )

    # ------------------------------------------------------------------ requests and choking
    def _adopt_first(self, conn: PeerConnection) -> None:
        """The source's first unchoke: the blocks of our first ask that it has are on
        their way unasked; count them as requested from it (not in the flow
        controller: sent with the HELLO, they say nothing of this circuit's RTT)."""
        ask, conn.ask_sent = conn.ask_sent, None
        assert ask is not None
        picker = self.picker
        blocks = ask.blocks_from(lambda i: picker.peer_has(conn, i), self.metainfo.piece_size)
        if picker.adopt(conn, blocks):
            conn.last_block = time.monotonic()
        self.first_ask_answered(ask)  # (after the adoption: others may take the rest)

    def _fill(self, conn: PeerConnection, *, endgame_check: bool = False) -> None:
        """Top up the requests in flight to ``conn``. Copies worth asking in a limited
        endgame are looked for only by the endgame check (``endgame_check``), every
        ENDGAME_CHECK s: each look weighs every outstanding block."""
        if conn.closed or conn.peer_choking or not conn.am_interested:
            return
        now = time.monotonic()
        if conn.snubbed_until > now or (self.write_error and now < self._write_retry_at):
            return
        picker = self.picker
        outstanding = picker.outstanding(conn)
        wanted = conn.flow.wanted(outstanding * BLOCK_SIZE) // BLOCK_SIZE
        if wanted <= 0:  # most blocks received end here: nothing else to look up
            return
        limit = self.download_limit
        if limit is not None:
            wanted = min(wanted, self._limited_room(limit))
            if wanted <= 0:
                return
        if limit is not None:
            gain: CopyGain | None = _copy_if_late(now)
        elif self.limit_endgame_copies:
            gain = self._copy_gain(conn, outstanding, now)
        else:
            gain = None
        if gain is not None and not endgame_check and picker.in_endgame:
            # Weighing every outstanding block on every arrival at every connection
            # stalled the downloader for 0.5-1 s at the end of a download.
            self._check_endgame_later()
            blocks: list[Block] = []
        else:
            blocks = picker.next_requests(conn, wanted, gain)
        more = gain is not None and len(blocks) < wanted and len(self._conns) > 1
        if more and picker.in_endgame:
            self._check_endgame_later()
        if blocks:
            if outstanding == 0:
                conn.last_block = now
            flow = conn.flow
            for i, b in enumerate(blocks):
                flow.on_request(b, now, (outstanding + i) * BLOCK_SIZE)
            in_flight = (outstanding + len(blocks)) * BLOCK_SIZE
            flow.on_requested(in_flight)
            expect = getattr(conn.stream, "expect_bytes", None)
            if expect is not None:  # a circuit: let its window carry what we asked for
                expect(in_flight + (outstanding + len(blocks)) * PIECE_OVERHEAD)
            conn.control.extend([encode_request(*b) for b in blocks])
            conn.asked_since_hint = True
            conn.wake.set()
        if len(blocks) < wanted:
            self._look_again_when_overdue()
        if len(blocks) < wanted and conn.asked_since_hint:
            # Nothing more to ask of it for now: the source holds the last partial
            # cell of its burst for our next requests until told none are coming.
            conn.asked_since_hint = False
            conn.send(KeepAlive().encode())

    def _limited_room(self, limit: float) -> int:
        """Blocks that may still be asked for under a download limit of ``limit`` bytes
        per second: all connections together keep :data:`LIMIT_AHEAD_SECONDS` of it in
        flight (more would only wait unread, and make every block late)."""
        picker = self.picker
        outstanding = sum(picker.outstanding(c) for c in self._conns)
        return max(1, int(limit * LIMIT_AHEAD_SECONDS) // BLOCK_SIZE) - outstanding

    def _copy_gain(self, conn: PeerConnection, outstanding: int, now: float) -> CopyGain:
        """For the endgame: seconds a copy asked of ``conn`` would arrive before its
        holder's block, less a margin (COPY_MARGIN times ``conn``'s own delivery time)."""
        flow = conn.flow
        rate = _average_rate(conn, now) or flow.rate
        own_rtt = flow.min_rtt if math.isfinite(flow.min_rtt) else 0.0
        grace = max(UNTIMED_GRACE, LATE_FACTOR * own_rtt)

        def gain(holder: Hashable, block: Block, ahead: int) -> float:
            assert isinstance(holder, PeerConnection)
            left = holder.flow.time_left(block, now)
            queued = holder.flow.bytes_ahead(block)
            if left == math.inf:
                untimed = queued is None or not math.isfinite(holder.flow.delivery_time(0))
                if untimed and now - holder.last_block < grace:
                    return -math.inf  # not known to be late
                return math.inf
            # The holder's queue drains at the rate it delivers, not the best it did.
            holder_rate = _average_rate(holder, now)
            if queued is not None and holder_rate:
                left = max(left, queued / holder_rate)
            if not rate or not math.isfinite(flow.min_rtt):
                return -math.inf
            own = flow.min_rtt + (outstanding + ahead + 1) * BLOCK_SIZE / rate
            return left - COPY_MARGIN * own

        return gain

    def _check_endgame_later(self) -> None:
        """Fill every connection again in ENDGAME_CHECK s: blocks not worth copying now
        may be then (their holder is late), even if no block arrives meanwhile."""
        timer = self._endgame_timer
        if self._closed or (timer is not None and not timer.dead):
            return

        def check() -> None:
            self._endgame_timer = None
            if not self._closed and not self.complete:
                for conn in list(self._conns):
                    self._fill(conn, endgame_check=True)

        self._endgame_timer = gevent.spawn_later(ENDGAME_CHECK, check)
        self._group.add(self._endgame_timer)

    def _set_interested(self, conn: PeerConnection, interested: bool) -> None:
        if conn.am_interested == interested:
            return
        conn.am_interested = interested
        conn.interest_since = time.monotonic()
        conn.send(Interested().encode() if interested else NotInterested().encode())
        if interested:
            self._fill(conn)

    def _set_choking(self, conn: PeerConnection, choking: bool) -> None:
        if conn.am_choking == choking:
            return
        conn.am_choking = choking
        if choking:
            conn.requests.clear()  # BEP 3: a choke discards the peer's pending requests
        conn.send(Choke().encode() if choking else Unchoke().encode())
        if not choking and conn.ask_to_serve is not None:
            # Our first unchoke: the first ask's blocks, as if requested (the
            # downloader counts the same blocks as asked of us when it gets this unchoke).
            ask, conn.ask_to_serve = conn.ask_to_serve, None
            have = self._have
            conn.requests.extend(ask.blocks_from(lambda i: bool(have[i]), self.metainfo.piece_size))
            conn.more_requests_coming = True
            conn.wake.set()

    def _maybe_unchoke(self, conn: PeerConnection) -> None:
        """Unchoke an interested peer at once if a slot is free (no wait for the timer)."""
        if conn.closed or not conn.am_choking or not conn.peer_interested:
            return
        unchoked = sum(1 for c in self._conns if not c.am_choking)
        if unchoked < choking.UNCHOKE_SLOTS + 1:
            self._set_choking(conn, False)

    def _rechoke(self) -> None:
        now = time.monotonic()
        conns = [c for c in self._conns if c.handshaken and not c.closed]
        unchoke = self._choker.rechoke(conns, seeding=self.complete, now=now)
        for conn in conns:
            self._set_choking(conn, conn not in unchoke)

    # ------------------------------------------------------------------ timers
    def _choke_loop(self) -> None:
        while True:
            gevent.sleep(choking.UNCHOKE_INTERVAL)
            self._rechoke()

    def _maintenance_loop(self) -> None:
        while True:
            gevent.sleep(MAINTENANCE_INTERVAL)
            now = time.monotonic()
            for conn in list(self._conns):
                if now - conn.last_recv > IDLE_TIMEOUT:
                    self._close_conn(conn, f"nothing received for {IDLE_TIMEOUT:g} s")
                elif conn.send_since is not None and now - conn.send_since > IDLE_TIMEOUT:
                    self._close_conn(conn, f"peer accepted nothing for {IDLE_TIMEOUT:g} s")
                elif now - conn.last_send > KEEPALIVE_INTERVAL and not conn.control:
                    conn.send(KeepAlive().encode())
                if conn.closed or not conn.handshaken:
                    continue
                picker = self.picker
                if picker.outstanding(conn) and now - conn.last_block > REQUEST_TIMEOUT:
                    log.info(
                        "%s: connection %s sent no block for %g s; asking others",
                        self.label,
                        conn.label,
                        REQUEST_TIMEOUT,
                    )
                    picker.release(conn)
                    conn.snubbed_until = now + REQUEST_TIMEOUT
                    for other in list(self._conns):
                        self._fill(other)
                elif conn.snubbed_until and conn.snubbed_until <= now:
                    conn.snubbed_until = 0.0
                    self._fill(conn)
                elif self.write_error and now >= self._write_retry_at:
                    self._fill(conn)

    def _resume_loop(self) -> None:
        while True:
            gevent.sleep(RESUME_SAVE_INTERVAL)
            if self._resume_dirty:
                self._save_resume()

    def _save_resume(self) -> None:
        if self.resume_dir is None or self._storage is None:
            return
        try:
            # The sync yields (it runs in a thread): what changes meanwhile is
            # saved next time, and only pieces kept all along count as had.
            have = bytearray(self._have)
            self._resume_dirty = False
            self._storage.sync()
            have = bytearray(a & b for a, b in zip(have, self._have, strict=True))
            resume.save(
                self.resume_dir,
                self.metainfo,
                have,
                self._storage.file_stats(),
                wanted=self._file_wanted,
                priorities=self._file_priority,
            )
        except AnomosError as exc:
            self._resume_dirty = True
            log.warning("%s: cannot save resume data: %s", self.label, exc)
