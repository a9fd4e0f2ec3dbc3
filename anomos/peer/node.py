"""A peer: identity, neighbour links, circuit switch and torrent sessions.

Every peer relays for others while it runs; a seeder additionally answers
circuits that ask for its torrents, and a downloader opens circuits to several
sources at once and runs the BitTorrent protocol over each.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import gevent
import gevent.event
import gevent.pool

from anomos.backoff import Backoff, Waiting
from anomos.config import Settings
from anomos.errors import AnomosError, ConfigError, TrackerError, TransportError
from anomos.fsutil import atomic_write, private_dir
from anomos.identity import PeerIdentity
from anomos.net.circuit import CircuitSwitch
from anomos.net.link import CloseReason, Link, LinkManager, NoTransportError
from anomos.peer.download import (
    DEFAULT_SOURCES,
    DEFAULT_STALL_LIMIT,
    CircuitRecord,
    DownloadReport,
    TorrentDownload,
)
from anomos.peer.launch import TrackerDialAhead
from anomos.pluginmanager import Plugins
from anomos.torrent.metainfo import Metainfo
from anomos.torrent.session import TorrentSession
from anomos.tracker.client import (
    MAX_LOST_AGE_MS,
    AnnounceReply,
    LostNeighbour,
    TorrentStatus,
    TrackerBusy,
    TrackerClient,
)
from anomos.tracker.identity import TrackerTrustError

if TYPE_CHECKING:
    from anomos.peer.portmap import PortMapper

log = logging.getLogger(__name__)

#: Seconds before retrying the tracker after a failure.
RETRY_MIN = 1.0
RETRY_MAX = 30.0
#: Seconds to gather further link losses before reporting them to the tracker.
LOST_REPORT_DELAY = 0.2
#: Seconds an assigned neighbour may stay without a link before we ask the
#: tracker again (its address may have changed); doubles while nothing changes.
STALE_NEIGHBOUR_REFRESH = 10.0
#: Seconds between checks of the assigned neighbours' links.
LINK_WATCH_INTERVAL = 2.0
#: Seconds a neighbour we dial may stay without a link before we report it to the
#: tracker as "unreachable" (a firewall, a partition, a transport we lack), which
#: replaces that edge; reported again only if the tracker still assigns it as long after.
UNREACHABLE_AFTER = 45.0
#: Seconds the goodbye announce may take when stopping (the tracker may be down).
STOP_ANNOUNCE_TIMEOUT = 5.0


__all__ = ["CircuitRecord", "DownloadReport", "Peer"]


@attrs.define(eq=False)
class Peer:
    """One anomos peer process (or one of many in a test process)."""

    plugins: Plugins
    settings: Settings
    tracker_url: str
    fingerprint: str
    #: The tracker's stream dialled before this peer was made (``anomos get``'s launch).
    tracker_ahead: TrackerDialAhead | None = attrs.field(default=None, kw_only=True)
    identity: PeerIdentity = attrs.field(init=False)
    tracker: TrackerClient = attrs.field(init=False)
    links: LinkManager = attrs.field(init=False)
    switch: CircuitSwitch = attrs.field(init=False)
    sessions: dict[bytes, TorrentSession] = attrs.field(factory=dict, init=False)
    address: str = attrs.field(default="", init=False)
    ratio: float = attrs.field(default=0.0, init=False)
    #: The tracker's last word on this peer's accounts (uploaded, downloaded, relayed as
    #: credited and as claimed, ratio).
    account: AnnounceReply | None = attrs.field(default=None, init=False)
    _interval: float = attrs.field(default=60.0, init=False)
    #: The tracker's minimum interval between announces, and when we last announced.
    _min_interval: float = attrs.field(default=0.0, init=False)
    _last_announce: float = attrs.field(default=float("-inf"), init=False)
    #: An announce asked for that may not wait for the minimum interval.
    _urgent: bool = attrs.field(default=False, init=False)
    _group: gevent.pool.Group = attrs.field(factory=gevent.pool.Group, init=False)
    _announce_now: gevent.event.Event = attrs.field(factory=gevent.event.Event, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    #: Whether an announce succeeded yet (until then the loop retries with backoff).
    _announced: bool = attrs.field(default=False, init=False)
    #: Whether (and since when) the tracker cannot be reached: one line when that
    #: starts, one when it ends, whichever loop (announces, downloads) notices.
    tracker_wait: Waiting = attrs.field(
        factory=lambda: Waiting("waiting for the tracker", log), init=False
    )
    #: NID -> (monotonic time the link dropped, why) not yet reported to the tracker.
    _lost: dict[int, tuple[float, str]] = attrs.field(factory=dict, init=False)
    #: Whether the tracker could dial us back (AnnounceReply.reachable), as last told.
    reachable: str = attrs.field(default="unchecked", init=False)
    #: The router's port mapping kept for us (``--upnp``), if any.
    _portmap: PortMapper | None = attrs.field(default=None, init=False)
    #: Monotonic times of this peer's first steps (a download's ``startup`` shows
    #: them): ``peer`` (made: the program's imports are behind it), ``listening``,
    #: ``announced`` (the tracker's first answer, with our neighbours).
    startup: dict[str, float] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.startup["peer"] = time.monotonic()
        private_dir(self.settings.state_dir)  # resume file names are the infohashes shared
        self.identity = PeerIdentity.load_or_create(self.settings.state_dir)
        self.tracker = TrackerClient(
            self.tracker_url,
            self.fingerprint,
            self.identity,
            source_host=self.settings.listen_host,
            timeout=self.settings.connect_timeout * 3,
            dialer=self._dial_tracker,
        )
        self.links = LinkManager(
            self.identity,
            self.plugins,
            self.settings,
            on_frame=None,
            on_unknown_nid=self._on_unknown_nid,
            # A caller with our tracker's edge ticket is let in without asking it first.
            trackers=frozenset({self.tracker.fingerprint}),
            on_admitted=lambda nid: self.announce_soon(),
            peer=self,
        )
        self.switch = CircuitSwitch(
            self.links,
            self.identity,
            self.plugins,
            peer=self,
            on_request=self._on_request,
            trackers={self.fingerprint},  # serve only requests our tracker signed
            state_dir=self.settings.state_dir,  # replay caches survive restarts
        )
        switch_down = self.links.on_link_down

        def on_link_down(link: Link, reason: CloseReason) -> None:
            if switch_down is not None:
                switch_down(link, reason)  # break the circuits first
            self._on_link_down(link, reason)

        self.links.on_link_down = on_link_down
        if self.settings.transport == "tcp":  # others (tor) come up with the listener
            # The first announce's TCP and TLS handshakes overlap the rest of our start.
            if self.tracker_ahead is not None:
                self.tracker_ahead.settle()  # its TCP handshake is done: TLS starts now
            self.tracker.connect_ahead()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Listen, announce, join the neighbour graph, then keep announcing.

        A tracker that cannot be reached is retried with backoff (it may be
        restarting); a tracker with the wrong identity is a fatal error.
        """
        self.address = self.links.start()
        self.startup.setdefault("listening", time.monotonic())
        if self.settings.upnp:
            self.address = self._map_port(self.address)
        try:
            self.announce()
        except (TrackerTrustError, ConfigError):
            self.links.close()
            raise
        except AnomosError as exc:
            self.tracker_wait.enter(str(exc))
        self.spawn(self._announce_loop)
        self.spawn(self._link_watch)
        self._write_peer_file()
        self.plugins.notify("anomos_peer_started", peer=self)
        log.info("peer %s listening on %s", self.identity.identity_public.hex()[:16], self.address)

    def _map_port(self, local: str) -> str:
        """``--upnp``: the router's public address for our port, or ``local`` (one line)."""
        from anomos.peer.portmap import PortMapError, PortMapper  # only with --upnp

        self._portmap = PortMapper(local)
        try:
            return self._portmap.start().external
        except PortMapError as exc:
            log.warning("UPnP: no port mapping (%s); carrying on without one", exc)
            self._portmap = None
            return local

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # No announce of ours may overtake the goodbye and bring us back.
        self._group.kill(block=True, timeout=STOP_ANNOUNCE_TIMEOUT)
        if self._announced:
            timeout, self.tracker.timeout = self.tracker.timeout, STOP_ANNOUNCE_TIMEOUT
            try:
                self.tracker.announce(
                    address=self.address,
                    torrents=self._statuses(),
                    relayed=self.relayed,
                    stopped=True,
                    receipts=self.links.receipts(),
                )
            except AnomosError as exc:
                log.info("final announce failed: %s", exc)
            finally:
                self.tracker.timeout = timeout
        self.tracker.close()
        if self.tracker_ahead is not None:
            self.tracker_ahead.close()
        self._group.kill(block=False)
        for session in self.sessions.values():
            session.close()
        self.switch.close()
        self.links.close()
        if self._portmap is not None:
            self._portmap.close()
        self.plugins.notify("anomos_peer_stopped", peer=self)

    @property
    def relayed(self) -> int:
        return int(self.switch.relayed_bytes)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """Run ``fn`` in a greenlet of this peer (killed when it stops; crashes logged)."""
        g = self._group.spawn(fn, *args)
        g.link_exception(lambda g: log.error("%s crashed: %r", fn.__name__, g.exception))
        return g

    def _write_peer_file(self) -> None:
        doc = {
            "address": self.address,
            "identity": self.identity.identity_public.hex(),
            "pid": os.getpid(),
        }
        atomic_write(self.settings.state_dir / "peer.json", json.dumps(doc).encode())

    # ------------------------------------------------------------------ tracker
    def _dial_tracker(self, address: str, timeout: float) -> Any:
        """Reach the tracker through this peer's transports, never around them (the
        first time, maybe with the stream dialled before the peer was made)."""
        ahead, self.tracker_ahead = self.tracker_ahead, None
        if ahead is not None:
            stream = ahead.take(address)
            if stream is not None:
                return stream
        try:
            return self.links.dial(address, timeout=timeout)
        except NoTransportError as exc:
            raise TrackerTrustError(str(exc)) from None  # retrying will not help
        except TransportError as exc:
            raise TrackerError(f"cannot reach the tracker: {exc}") from None

    def _statuses(self) -> list[TorrentStatus]:
        return [
            TorrentStatus(infohash=ih, uploaded=s.uploaded, downloaded=s.downloaded, left=s.left)
            for ih, s in self.sessions.items()
        ]

    def announce(self) -> AnnounceReply:
        """Announce now, reporting the neighbours whose links dropped since the last one
        and what each neighbour sent us (its relay credit depends on it)."""
        now = time.monotonic()
        for nid in [n for n, (at, _) in self._lost.items() if now - at > MAX_LOST_AGE_MS / 1000]:
            # Held back longer than the tracker looks back (it was unreachable): the
            # tracker has expired or heard from that neighbour since, and would refuse it.
            del self._lost[nid]
        reported = {
            nid: entry
            for nid, entry in self._lost.items()
            if self.links.get(nid) is None  # back up meanwhile: nothing to report
        }
        lost = [
            LostNeighbour(nid, int((now - at) * 1000), why) for nid, (at, why) in reported.items()
        ]
        self._last_announce = now
        with self.links.asking_tracker():
            reply = self.tracker.announce(
                address=self.address,
                torrents=self._statuses(),
                relayed=self.relayed,
                lost=lost,
                receipts=self.links.receipts(),
            )
            self.links.set_neighbours(reply.neighbours, asked_at=now)
        for nid, entry in reported.items():
            if self._lost.get(nid) == entry:
                del self._lost[nid]
        for nid in [n for n in self._lost if self.links.get(n) is not None]:
            del self._lost[nid]
        self._announced = True
        self.startup.setdefault("announced", time.monotonic())
        self._interval = max(1.0, float(reply.interval))
        self._min_interval = float(reply.min_interval)
        self.ratio = reply.ratio
        self.account = reply
        self._tell_reachability(reply.reachable)
        if lost:
            log.info("reported %d lost neighbour(s) to the tracker", len(lost))
        return reply

    def _tell_reachability(self, state: str) -> None:
        """One line when the tracker's verdict on dialling us changes (docs/operations.md)."""
        if state == self.reachable:
            return
        self.reachable = state
        if state == "reachable":
            log.info("reachable at %s", self.address)
        elif state == "unreachable":
            log.info(
                "not reachable from outside: behind NAT or a firewall; "
                "neighbours will dial out from here"
            )

    def announce_soon(self, *, urgent: bool = False) -> None:
        """Have the announce loop announce as soon as the tracker allows: after its
        minimum interval since the last announce, unless ``urgent`` (the tracker asks
        for it at once: it forgot us, or our neighbours need replacing)."""
        self._urgent = self._urgent or urgent
        self._announce_now.set()

    def _announce_loop(self) -> None:
        """Announce every interval, at once on request, and with backoff while it fails
        (never before a busy tracker's Retry-After); the tracker being down is logged
        when it starts and when it ends, not at every attempt."""
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        wait = self._interval if self._announced else backoff.next()
        not_before = 0.0
        while not self._stopped:
            self._announce_now.wait(wait)
            self._announce_now.clear()
            if self._lost:
                gevent.sleep(LOST_REPORT_DELAY)  # one report for links that drop together
            elif not self._urgent:
                # Lost links are reported at once (the tracker wants them so); anything
                # else waits for the tracker's minimum interval.
                gevent.sleep(max(0.0, self._last_announce + self._min_interval - time.monotonic()))
            self._urgent = False
            gevent.sleep(max(0.0, not_before - time.monotonic()))
            try:
                self.announce()
            except TrackerTrustError as exc:
                log.error("announce refused: %s", exc)
                wait = RETRY_MAX
            except TrackerBusy as exc:
                wait = backoff.next(at_least=exc.retry_after)
                not_before = time.monotonic() + wait
                log.info("tracker busy: announcing again in %.1f s", wait)
            except AnomosError as exc:
                self.tracker_wait.enter(str(exc))
                wait = backoff.next()
            else:
                self.tracker_wait.leave()
                backoff.reset()
                wait = self._interval

    def _on_link_down(self, link: Link, reason: CloseReason) -> None:
        """Tell the tracker at once when a neighbour's link drops (not when we dropped it)."""
        if self._stopped or reason.cause.local:
            return
        nb = self.links.neighbours().get(link.nid)
        if nb is None or bytes(nb.identity) != link.identity:
            return  # no longer assigned: the tracker knows already
        why = "lost" if reason.cause.lost else "protocol"
        if why == "protocol":
            log.warning("neighbour NID %d broke the protocol (%s): reporting it", link.nid, reason)
        self._lost[link.nid] = (time.monotonic(), why)
        self.announce_soon()

    def _link_watch(self) -> None:
        """Ask the tracker again when assigned neighbours stay unlinked (moved, restarted),
        and report the ones we dial but never reach as "unreachable"."""
        missing_since: dict[int, float] = {}
        #: (NID, identity) of a neighbour we dial -> since when it has had no link
        unreachable_since: dict[tuple[int, bytes], float] = {}
        # Each refresh that changes nothing doubles the wait, up to the announce interval.
        refresh = Backoff(STALE_NEIGHBOUR_REFRESH, STALE_NEIGHBOUR_REFRESH, jitter=0.0)
        last_refresh = time.monotonic()
        while not self._stopped:
            gevent.sleep(LINK_WATCH_INTERVAL)
            now = time.monotonic()
            assigned = self.links.neighbours()
            for nid in list(missing_since):
                if nid not in assigned or self.links.get(nid) is not None:
                    del missing_since[nid]
            for nid in assigned:
                if self.links.get(nid) is None:
                    missing_since.setdefault(nid, now)
            self._watch_unreachable(assigned, unreachable_since, now)
            if not missing_since:
                refresh.reset()
                continue
            oldest = min(missing_since.values())
            if now - oldest >= refresh.delay and now - last_refresh >= refresh.delay:
                log.info(
                    "%d assigned neighbour(s) not linked: asking the tracker again",
                    len(missing_since),
                )
                last_refresh = now
                refresh.limit = max(self._interval, STALE_NEIGHBOUR_REFRESH)
                refresh.next()
                self.announce_soon(urgent=True)

    def _watch_unreachable(
        self, assigned: dict[int, Any], since: dict[tuple[int, bytes], float], now: float
    ) -> None:
        """Report a neighbour we dial that has had no link for UNREACHABLE_AFTER seconds.

        A link that never came up never goes down, so nothing else would tell the
        tracker, and a "lost" report is void while the neighbour keeps announcing.
        Once per assignment: the clock starts again at the report, and the tracker
        takes the edge away; only an edge it kept (say, over its per-announce cap)
        is reported again, UNREACHABLE_AFTER later.
        """
        dialled = {(nid, bytes(nb.identity)) for nid, nb in assigned.items() if nb.dial}
        for key in list(since):
            if key not in dialled or self.links.get(key[0]) is not None:
                del since[key]
        for key in dialled:
            nid, identity = key
            if self.links.get(nid) is not None:
                continue
            began = since.setdefault(key, now)
            if now - began < UNREACHABLE_AFTER:
                continue
            since[key] = now
            log.info(
                "neighbour NID %d (%s) not reachable for %.0f s: reporting it",
                nid,
                identity.hex()[:16],
                now - began,
            )
            self._lost[nid] = (now, "unreachable")
            self.announce_soon()

    def _on_unknown_nid(self, nid: int) -> None:
        """A neighbour we have not heard of yet dialled us: ask the tracker now."""
        try:
            self.announce()
        except AnomosError as exc:
            log.warning("refresh for unknown NID %d failed: %s", nid, exc)

    # ------------------------------------------------------------------ torrents
    def add_torrent(self, metainfo: Metainfo, data_root: Path) -> TorrentSession:
        resume = self.settings.state_dir / "resume"
        session = TorrentSession(
            metainfo, data_root, plugins=self.plugins, resume_dir=resume, label=metainfo.name
        )
        try:
            session.start()
        except BaseException:
            session.close()  # a failed or interrupted check leaves no file open
            raise
        self.sessions[metainfo.infohash] = session
        self.announce_soon()
        return session

    def remove_torrent(self, infohash: bytes) -> None:
        """Stop serving ``infohash``: its session closes (resume data saved), the tracker hears."""
        session = self.sessions.pop(infohash, None)
        if session is not None:
            session.close()
            self._announce_now.set()

    def _on_request(self, request: Any) -> Callable[[Any], None] | None:
        """A circuit asks this peer, as its terminal, for ``request.infohash``."""
        session = self.sessions.get(bytes(request.infohash))
        if session is None or session.left >= session.metainfo.total_length:
            return None  # nothing to give: refusing tells the downloader to look elsewhere

        def serve(stream: Any) -> None:
            session.add_connection(stream, "circuit", asked=True, first_ask=stream.early)

        return serve

    def download(
        self,
        session: TorrentSession,
        *,
        sources: int = DEFAULT_SOURCES,
        timeout: float | None = None,
        stall_limit: float | None = DEFAULT_STALL_LIMIT,
        launched: float | None = None,
    ) -> DownloadReport:
        """Fetch ``session``'s torrent over circuits to several sources at once
        (see :class:`~anomos.peer.download.TorrentDownload`)."""
        try:
            return TorrentDownload(
                self,
                session,
                sources=sources,
                timeout=timeout,
                stall_limit=stall_limit,
                launched=launched,
            ).run()
        finally:
            self.announce_soon()
