"""One torrent's download over circuits: the loop `anomos get` runs, one object per torrent.

A :class:`TorrentDownload` keeps ``sources`` circuits open to sources of its
torrent, asks the tracker for fresh ones when one ends, and never asks faster
than the tracker allows (its Retry-After, a growing pause while it is down or
plans nothing, a pause after circuits that fail or bring nothing). What it
waits for (the tracker, disk space) is logged once when the wait starts and
once when it ends. It gives up, with one line naming why, when no piece has
arrived for ``stall_limit`` seconds.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

import attrs
import gevent
import gevent.event

from anomos.backoff import Backoff, Waiting
from anomos.errors import AnomosError, ProtocolError, TrackerError, TransportError
from anomos.peer.launch import DEFAULT_STALL_LIMIT
from anomos.torrent.magnet import Magnet, SourceClosed, fetch_metadata
from anomos.torrent.session import PeerConnection, TorrentSession
from anomos.tracker.client import (
    MAX_AVOIDED,
    CircuitPlan,
    NotAnnounced,
    TrackerBusy,
    TrackerRefused,
)

if TYPE_CHECKING:
    from anomos.net.circuit import CircuitStream
    from anomos.peer.node import Peer
    from anomos.torrent.metainfo import Metainfo
    from anomos.torrent.wire import FirstAsk

log = logging.getLogger(__name__)

#: Seconds allowed for a circuit to be built and its end-to-end keys agreed.
CIRCUIT_TIMEOUT = 30.0
#: Sources (circuits) a download keeps open at once.
DEFAULT_SOURCES = 4
#: Seconds between progress checks of the download loop.
DOWNLOAD_TICK = 0.5
#: Seconds a circuit waits for the link to its first hop when that neighbour is
#: assigned but not linked (yet): a plan over a link that will not come is dropped fast.
FIRST_HOP_WAIT = 5.0
#: Seconds before asking for circuits again after one failed to build (or ended
#: without bringing a piece), growing up to FAIL_BACKOFF_MAX: a plan made before
#: the tracker heard of a dead relay fails fast, and a source with nothing we
#: need would be planned again at once.
FAIL_BACKOFF_MIN = 0.25
FAIL_BACKOFF_MAX = 5.0
#: Seconds before asking again when the tracker planned no circuit (a new peer's
#: edges take a moment to settle): starts small so a download starts quickly.
NO_PLAN_BACKOFF_MIN = 0.25
NO_PLAN_BACKOFF_MAX = 10.0
#: Seconds before asking a tracker that cannot be reached again, growing.
TRACKER_RETRY_MIN = 1.0
TRACKER_RETRY_MAX = 30.0
#: Seconds a connection may have nothing we want (and want nothing of ours)
#: before its circuit is closed, so that another source can take its place.
USELESS_AFTER = 5.0
#: Circuits asked for at once when fetching a magnet's metadata (tried one by one).
METADATA_SOURCES = 2


def _disk_full(session: TorrentSession) -> bool:
    """Whether the download's file system lacks room for one more piece."""
    try:
        free = shutil.disk_usage(session.data_root).free
    except OSError:
        return False
    return free < session.metainfo.piece_length


class DownloadStalled(AnomosError):
    """No piece arrived for the stall limit; the message says what it waited for."""


@attrs.frozen
class CircuitRecord:
    """What the downloader may know about one circuit it used: never addresses."""

    relays: int
    received: int
    seconds: float
    #: Why the circuit ended before the download was complete ("" if it did not).
    broken: str = ""
    #: The most bytes of requests outstanding at once (the flow-control window at work).
    peak_in_flight: int = 0
    #: Seconds from asking to build it until its end-to-end keys were agreed.
    setup_seconds: float = 0.0
    #: Cells we sent on it (HELLO, requests, SENDMEs, hints) and their bytes as frames.
    cells_sent: int = 0
    cell_bytes_sent: int = 0


@attrs.frozen
class DownloadReport:
    infohash: str
    size: int
    seconds: float
    circuits: tuple[CircuitRecord, ...]
    #: Circuits that could not be built (a relay gone, a stale neighbour, ...).
    failed: int = 0
    #: Bytes that were missing when the download started (the rest was on disk).
    left_at_start: int = 0
    #: Piece bytes received (over ``left_at_start`` only when blocks were refetched).
    downloaded: int = 0
    #: Per circuit that broke mid-download, seconds until fresh circuits arrived.
    replan_seconds: tuple[float, ...] = ()
    #: Seconds from launch (see :attr:`TorrentDownload.launched`) to the first block.
    first_byte_seconds: float | None = None
    #: Seconds from launch to each step of the start: the peer's own (``peer``,
    #: ``listening``, ``announced``: see :attr:`Peer.startup`), ``download`` (this loop
    #: began), ``first_link`` (a neighbour link up),
    #: ``circuits_requested``, ``circuits_planned``, ``first_circuit`` (keys agreed),
    #: ``first_block``, ``first_piece`` (verified).
    startup: dict[str, float] = attrs.field(factory=dict)

    @property
    def throughput(self) -> float:
        """Bytes per second over the whole download."""
        return self.size / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "infohash": self.infohash,
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "throughput": round(self.throughput),
            "circuits": [attrs.asdict(c) for c in self.circuits],
            "failed_circuits": self.failed,
            "broken_circuits": sum(1 for c in self.circuits if c.broken),
            "replan_seconds": [round(x, 3) for x in self.replan_seconds],
            "first_byte_seconds": (
                None if self.first_byte_seconds is None else round(self.first_byte_seconds, 3)
            ),
            "startup": {k: round(v, 3) for k, v in self.startup.items()},
            "left_at_start": self.left_at_start,
            "downloaded": self.downloaded,
        }


def open_circuit(peer: Peer, plan: CircuitPlan, ask: FirstAsk | None = None) -> CircuitStream:
    """Build the circuit ``plan`` describes, ``ask`` in its HELLO; :class:`AnomosError`
    if it cannot be."""
    if plan.first_nid not in peer.links.neighbours():
        raise TransportError(f"first hop NID {plan.first_nid} is not a neighbour")
    peer.links.wait_for(plan.first_nid, FIRST_HOP_WAIT)
    early = ask.encode() if ask is not None else b""
    stream: CircuitStream = peer.switch.open_circuit(plan, timeout=CIRCUIT_TIMEOUT, early=early)
    return stream


@attrs.define(eq=False)
class CircuitAsker:
    """Asks the tracker for circuits to one torrent's sources, never faster than it
    allows: its Retry-After, a growing pause while it is down or plans nothing, and
    after circuits that fail or bring nothing (:meth:`pause`)."""

    peer: Peer
    #: The tracker's last reason for planning nothing.
    refused: str | None = None
    #: No circuit may be asked of the tracker before this (monotonic) time.
    _next_at: float = 0.0
    _no_plan: Backoff = attrs.field(
        factory=lambda: Backoff(NO_PLAN_BACKOFF_MIN, NO_PLAN_BACKOFF_MAX, factor=1.5)
    )
    _no_piece: Backoff = attrs.field(factory=lambda: Backoff(FAIL_BACKOFF_MIN, FAIL_BACKOFF_MAX))
    _tracker_down: Backoff = attrs.field(
        factory=lambda: Backoff(TRACKER_RETRY_MIN, TRACKER_RETRY_MAX)
    )
    #: The tags of the sources dropped, the latest MAX_AVOIDED (the tracker takes no more).
    _avoided: collections.deque[bytes] = attrs.field(
        factory=lambda: collections.deque(maxlen=MAX_AVOIDED)
    )

    def due(self, now: float) -> bool:
        return now >= self._next_at

    def ask(self, infohash: bytes, count: int) -> list[CircuitPlan]:
        """The circuits the tracker plans now (none: it notes when to ask again), none to
        the sources :meth:`avoid` named."""
        now = time.monotonic()
        try:
            plans = self.peer.tracker.request_circuits(infohash, count, tuple(self._avoided))
        except TrackerBusy as exc:
            self._next_at = now + self._no_plan.next(at_least=exc.retry_after)
            log.info("tracker busy: asking again in %.1f s", self._next_at - now)
            return []
        except NotAnnounced as exc:
            log.info("tracker lost track of us: %s", exc)
            self.peer.announce_soon(urgent=True)
            self._next_at = now + self._no_plan.next()
            return []
        except TrackerRefused as exc:
            self.peer.tracker_wait.leave()
            self.refused = str(exc)
            self._next_at = now + self._no_plan.next()
            log.info("no circuits: %s (asking again in %.1f s)", exc, self._next_at - now)
            return []
        except TrackerError as exc:
            self.peer.tracker_wait.enter(str(exc))
            self._next_at = now + self._tracker_down.next()
            return []
        self.peer.tracker_wait.leave()
        self._tracker_down.reset()
        if not plans:
            self._next_at = now + self._no_plan.next()
            log.info("no circuits planned; asking again in %.1f s", self._next_at - now)
            return []
        self.refused = None
        self._no_plan.reset()
        return plans

    def pause(self) -> None:
        """A circuit failed or brought nothing: wait a growing while before asking again."""
        self._next_at = max(self._next_at, time.monotonic() + self._no_piece.next())

    def avoid(self, plan: CircuitPlan) -> None:
        """Its source lied or stayed silent: the tracker is not to plan it again (a
        source whose circuit broke is not named: a relay's fault looks the same)."""
        if plan.source_tag:
            self._avoided.append(plan.source_tag)

    def useful(self) -> None:
        """A circuit brought something: the pause after a useless one starts small again."""
        self._no_piece.reset()


@attrs.define(eq=False)
class TorrentDownload:
    """Fetch one session's torrent over circuits to several sources at once."""

    peer: Peer
    session: TorrentSession
    sources: int = DEFAULT_SOURCES
    #: Seconds the whole download may take (None: no limit).
    timeout: float | None = None
    #: Seconds without a new piece before giving up (None: never).
    stall_limit: float | None = DEFAULT_STALL_LIMIT
    #: The monotonic time the start is counted from (`anomos get`: the process's
    #: launch); None: when :meth:`run` begins.
    launched: float | None = None
    records: list[CircuitRecord] = attrs.field(factory=list, init=False)
    failures: int = attrs.field(default=0, init=False)
    _active: set[gevent.Greenlet] = attrs.field(factory=set, init=False)
    _changed: gevent.event.Event = attrs.field(factory=gevent.event.Event, init=False)
    _broken_at: list[float] = attrs.field(factory=list, init=False)
    _replans: list[float] = attrs.field(factory=list, init=False)
    _asking: CircuitAsker = attrs.field(
        default=attrs.Factory(lambda self: CircuitAsker(self.peer), takes_self=True), init=False
    )
    _disk_wait: Waiting = attrs.field(factory=lambda: Waiting("cannot write", log), init=False)
    _progress_at: float = attrs.field(factory=time.monotonic, init=False)
    _left: int = attrs.field(default=0, init=False)
    #: Monotonic times of the steps of the start (see DownloadReport.startup).
    _marks: dict[str, float] = attrs.field(factory=dict, init=False)

    def run(self) -> DownloadReport:
        """Download until complete; :class:`DownloadStalled` or :class:`AnomosError` if not."""
        session = self.session
        started = self._progress_at = time.monotonic()
        launched = started if self.launched is None else self.launched
        self._mark("download", started)
        left_at_start = self._left = session.left
        downloaded_at_start = session.downloaded
        try:
            while not session.complete:
                now = time.monotonic()
                self._check_limits(started, now)
                self._watch_disk()
                self._let_go_of_useless(now)
                missing = self.sources - len(self._active)
                if missing > 0 and self._asking.due(now) and not self._disk_wait.active:
                    self._request(missing)
                self._changed.wait(DOWNLOAD_TICK)
                self._changed.clear()
        finally:
            gevent.killall(list(self._active), timeout=5)
        self._disk_wait.leave()
        return DownloadReport(
            infohash=session.metainfo.infohash.hex(),
            size=session.metainfo.total_length,
            seconds=time.monotonic() - started,
            circuits=tuple(self.records),
            failed=self.failures,
            left_at_start=left_at_start,
            downloaded=session.downloaded - downloaded_at_start,
            replan_seconds=tuple(self._replans),
            first_byte_seconds=(
                None if session.first_block_at is None else session.first_block_at - launched
            ),
            startup=self._startup(launched),
        )

    def _mark(self, step: str, at: float | None = None) -> None:
        self._marks.setdefault(step, time.monotonic() if at is None else at)

    def _startup(self, launched: float) -> dict[str, float]:
        marks = {**self.peer.startup, **self._marks}
        opened = [link.opened_at for link in self.peer.links.links.values() if link.accepted]
        if opened:
            marks["first_link"] = min(opened)
        for step, at in (
            ("first_block", self.session.first_block_at),
            ("first_piece", self.session.first_piece_at),
        ):
            if at is not None:
                marks[step] = at
        # A long-running peer (the daemon's) started before this download was asked for.
        steps = sorted((m for m in marks.items() if m[1] >= launched), key=lambda m: m[1])
        return {step: at - launched for step, at in steps}

    # ------------------------------------------------------------------ limits and states
    def _check_limits(self, started: float, now: float) -> None:
        if self.session.left < self._left:
            self._left, self._progress_at = self.session.left, now
        if self.timeout is not None and now - started > self.timeout:
            refused = self._asking.refused
            why = f" (tracker: {refused})" if refused else ""
            raise AnomosError(f"download not complete after {self.timeout:.0f} s{why}")
        if self.stall_limit is not None and now - self._progress_at > self.stall_limit:
            raise DownloadStalled(f"no piece for {self.stall_limit:.0f} s: {self.stalled_on()}")

    def disk_problem(self) -> str:
        """ "cannot write since 10:22:01 (...)" while piece writes fail, else ""."""
        return self._disk_wait.describe() if self._disk_wait.active else ""

    def stalled_on(self) -> str:
        """What the download is waiting for, in a few words."""
        session = self.session
        bad = sorted(i for i in session.failed_pieces if not session.has_piece(i))
        if self._disk_wait.active:
            return self._disk_wait.describe()
        if self.peer.tracker_wait.active:
            return self.peer.tracker_wait.describe()
        if bad:
            shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
            return (
                f"{len(bad)} piece(s) failed their hash check and no source offers a good "
                f"copy: {shown}"
            )
        if self._asking.refused:
            return f"the tracker plans no circuit ({self._asking.refused})"
        return "no source offers the missing pieces"

    def _watch_disk(self) -> None:
        error = self.session.write_error
        if error is None:
            self._disk_wait.leave()
            return
        if not self._disk_wait.active:
            self._disk_wait.what = "disk full" if _disk_full(self.session) else "cannot write"
        self._disk_wait.enter(error)

    def _let_go_of_useless(self, now: float) -> None:
        """Close circuits whose source has nothing we want (and wants nothing of ours)."""
        for conn in self.session.connections:
            if (
                conn.handshaken
                and not conn.am_interested
                and not conn.peer_interested
                and now - conn.interest_since > USELESS_AFTER
            ):
                self.session.close_connection(conn, "the source has nothing we need")

    # ------------------------------------------------------------------ the tracker
    def _request(self, count: int) -> None:
        """Ask the tracker for ``count`` circuits and run each one it plans."""
        self._mark("circuits_requested")
        plans = self._asking.ask(self.session.metainfo.infohash, count)
        if not plans:
            return
        now = time.monotonic()
        self._mark("circuits_planned", now)
        self._replans.extend(now - t for t in self._broken_at)
        self._broken_at.clear()
        for plan in plans:
            g = self.peer.spawn(self._run_circuit, plan)
            self._active.add(g)
            g.link(self._finished)
        if len(plans) < count:
            # The tracker plans one circuit per source and request: with fewer sources
            # than circuits wanted, ask again now, not a tick later per circuit.
            self._changed.set()

    def _finished(self, g: gevent.Greenlet) -> None:
        self._active.discard(g)
        self._changed.set()

    # ------------------------------------------------------------------ one circuit
    def _run_circuit(self, plan: CircuitPlan) -> None:
        session = self.session
        relays = len(plan.layers) - 1
        t0 = time.monotonic()
        ask = session.first_ask()
        try:
            stream = open_circuit(self.peer, plan, ask)
            self._mark("first_circuit")
            setup = time.monotonic() - t0
        except AnomosError as exc:
            if ask is not None:
                session.first_ask_answered(ask)
            self.failures += 1
            log.info("circuit with %d relays failed: %s", relays, exc)
            self._asking.pause()
            return
        conn: PeerConnection | None = None
        try:
            conn = session.connect(stream, f"circuit/{relays} relays", ask_sent=ask)
            assert conn.greenlet is not None
            conn.greenlet.join()
        finally:
            stream.close()
            broken = ""
            if not session.complete:
                broken = stream.closed_reason or (conn.close_reason if conn else "") or "closed"
                self._broken_at.append(time.monotonic())
                log.info("circuit with %d relays ended early: %s", relays, broken)
                if conn is not None and conn.corrupt:
                    self._asking.avoid(plan)
                    log.info("its source sent corrupt data: not to be planned again")
                if conn is None or conn.good_pieces == 0:
                    self._asking.pause()  # it brought nothing: do not rush back
                else:
                    self._asking.useful()
            self.records.append(
                CircuitRecord(
                    relays=relays,
                    received=stream.bytes_received,
                    seconds=round(time.monotonic() - t0, 3),
                    broken=broken,
                    peak_in_flight=conn.flow.peak_in_flight if conn is not None else 0,
                    setup_seconds=round(setup, 3),
                    cells_sent=stream.cells_sent,
                    cell_bytes_sent=stream.cell_bytes_sent,
                )
            )


@attrs.define(eq=False)
class MetadataFetch:
    """A magnet's metadata (its ``info`` dict) over circuits, one source at a time.

    The tracker plans circuits by infohash alone, so nothing here needs the
    metainfo. A source that sends bad metadata (a wrong hash, an oversized or
    inconsistent size, pieces not asked for) or none is dropped with one log
    line, and the next one is tried; :meth:`run` returns the checked metainfo.
    A source that lied or stayed silent is not planned again (the tracker is
    handed its plan's tag in ``avoid``): each try of it could cost a minute. One
    whose circuit broke or ended may be (a relay's fault looks the same).
    """

    peer: Peer
    magnet: Magnet
    #: Seconds to keep trying (None: until stopped).
    timeout: float | None = None
    #: Sources dropped (bad metadata, silence, a circuit that could not be built).
    dropped: int = attrs.field(default=0, init=False)
    #: Share of the metadata received from the source being asked now (0..1).
    fraction: float = attrs.field(default=0.0, init=False)
    _asking: CircuitAsker = attrs.field(
        default=attrs.Factory(lambda self: CircuitAsker(self.peer), takes_self=True), init=False
    )

    def run(self) -> Metainfo:
        started = time.monotonic()
        while True:
            now = time.monotonic()
            if self.timeout is not None and now - started > self.timeout:
                raise DownloadStalled(
                    f"no metadata for {self.magnet.name or self.magnet.infohash_hex} after "
                    f"{self.timeout:.0f} s: {self._waiting_for()}"
                )
            if self._asking.due(now):
                for plan in self._asking.ask(self.magnet.infohash, METADATA_SOURCES):
                    metainfo = self._from_source(plan)
                    if metainfo is not None:
                        self.fraction = 1.0
                        return metainfo
            gevent.sleep(DOWNLOAD_TICK)

    def _waiting_for(self) -> str:
        if self.peer.tracker_wait.active:
            return self.peer.tracker_wait.describe()
        if self._asking.refused:
            return f"the tracker plans no circuit ({self._asking.refused})"
        return f"{self.dropped} source(s) tried, none sent good metadata"

    def _from_source(self, plan: CircuitPlan) -> Metainfo | None:
        relays = len(plan.layers) - 1
        try:
            stream = open_circuit(self.peer, plan)
        except AnomosError as exc:
            self.dropped += 1
            log.info("circuit with %d relays failed: %s", relays, exc)
            self._asking.pause()
            return None
        try:
            info = fetch_metadata(stream, self.magnet.infohash, progress=self._progress)
            return self.magnet.metainfo(info)
        except (AnomosError, OSError) as exc:
            self.dropped += 1
            self.fraction = 0.0
            lied = isinstance(exc, ProtocolError) and not isinstance(exc, SourceClosed)
            if lied:
                self._asking.avoid(plan)
            log.warning("metadata source over %d relays dropped: %s", relays, exc)
            self._asking.pause()
            return None
        finally:
            stream.close()

    def _progress(self, fraction: float) -> None:
        self.fraction = fraction
