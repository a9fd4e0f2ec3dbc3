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
from typing import Any

import attrs
import gevent
import gevent.event
import gevent.pool

from anomos.config import Settings
from anomos.errors import AnomosError, TrackerError
from anomos.identity import PeerIdentity
from anomos.net.circuit import CircuitSwitch
from anomos.net.link import LinkManager
from anomos.pluginmanager import Plugins
from anomos.torrent.metainfo import Metainfo
from anomos.torrent.session import TorrentSession
from anomos.tracker.client import AnnounceReply, CircuitPlan, TorrentStatus, TrackerClient

log = logging.getLogger(__name__)

#: Seconds before retrying the tracker after a failure.
RETRY_MIN = 1.0
RETRY_MAX = 30.0
#: Seconds allowed for a circuit to be built and its end-to-end keys agreed.
CIRCUIT_TIMEOUT = 30.0
#: Sources (circuits) a download keeps open at once.
DEFAULT_SOURCES = 4
#: Seconds between progress checks of the download loop.
DOWNLOAD_TICK = 0.5


@attrs.frozen
class CircuitRecord:
    """What the downloader may know about one circuit it used: never addresses."""

    relays: int
    received: int
    seconds: float


@attrs.frozen
class DownloadReport:
    infohash: str
    size: int
    seconds: float
    circuits: tuple[CircuitRecord, ...]
    #: Circuits that could not be built (a relay gone, a stale neighbour, ...).
    failed: int = 0

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
        }


@attrs.define(eq=False)
class Peer:
    """One anomos peer process (or one of many in a test process)."""

    plugins: Plugins
    settings: Settings
    tracker_url: str
    fingerprint: str
    identity: PeerIdentity = attrs.field(init=False)
    tracker: TrackerClient = attrs.field(init=False)
    links: LinkManager = attrs.field(init=False)
    switch: CircuitSwitch = attrs.field(init=False)
    sessions: dict[bytes, TorrentSession] = attrs.field(factory=dict, init=False)
    address: str = attrs.field(default="", init=False)
    ratio: float = attrs.field(default=0.0, init=False)
    _interval: float = attrs.field(default=60.0, init=False)
    _group: gevent.pool.Group = attrs.field(factory=gevent.pool.Group, init=False)
    _announce_now: gevent.event.Event = attrs.field(factory=gevent.event.Event, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
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
            peer=self,
        )
        self.switch = CircuitSwitch(
            self.links, self.identity, self.plugins, peer=self, on_request=self._on_request
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Listen, announce, join the neighbour graph, then keep announcing."""
        self.address = self.links.start()
        self.announce()
        self._spawn(self._announce_loop)
        self._write_peer_file()
        self.plugins.notify("anomos_peer_started", peer=self)
        log.info("peer %s listening on %s", self.identity.identity_public.hex()[:16], self.address)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.tracker.announce(
                address=self.address, torrents=self._statuses(), relayed=self.relayed, stopped=True
            )
        except AnomosError as exc:
            log.info("final announce failed: %s", exc)
        self._group.kill(block=False)
        for session in self.sessions.values():
            session.close()
        self.switch.close()
        self.links.close()
        self.plugins.notify("anomos_peer_stopped", peer=self)

    @property
    def relayed(self) -> int:
        return int(self.switch.relayed_bytes)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        g = self._group.spawn(fn, *args)
        g.link_exception(lambda g: log.error("%s crashed: %r", fn.__name__, g.exception))
        return g

    def _write_peer_file(self) -> None:
        path = self.settings.state_dir / "peer.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "address": self.address,
                    "identity": self.identity.identity_public.hex(),
                    "pid": os.getpid(),
                }
            )
        )
        tmp.replace(path)

    # ------------------------------------------------------------------ tracker
    def _dial_tracker(self, address: str, timeout: float) -> Any:
        """Reach the tracker through this peer's transports, never around them."""
        return self.links.dial(address, timeout=timeout)

    def _statuses(self) -> list[TorrentStatus]:
        return [
            TorrentStatus(infohash=ih, uploaded=s.uploaded, downloaded=s.downloaded, left=s.left)
            for ih, s in self.sessions.items()
        ]

    def announce(self) -> AnnounceReply:
        reply = self.tracker.announce(
            address=self.address, torrents=self._statuses(), relayed=self.relayed
        )
        self._interval = max(1.0, float(reply.interval))
        self.ratio = reply.ratio
        self.links.set_neighbours(reply.neighbours)
        return reply

    def _announce_loop(self) -> None:
        backoff = RETRY_MIN
        while not self._stopped:
            self._announce_now.wait(self._interval)
            self._announce_now.clear()
            try:
                self.announce()
                backoff = RETRY_MIN
            except AnomosError as exc:
                log.warning("announce failed: %s", exc)
                gevent.sleep(backoff)
                backoff = min(RETRY_MAX, backoff * 2)

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
        session.start()
        self.sessions[metainfo.infohash] = session
        self._announce_now.set()
        return session

    def _on_request(self, request: Any) -> Callable[[Any], None] | None:
        """A circuit asks this peer, as its terminal, for ``request.infohash``."""
        session = self.sessions.get(bytes(request.infohash))
        if session is None or session.left >= session.metainfo.total_length:
            return None  # nothing to give: refusing tells the downloader to look elsewhere

        def serve(stream: Any) -> None:
            session.add_connection(stream, "circuit")

        return serve

    def download(
        self,
        session: TorrentSession,
        *,
        sources: int = DEFAULT_SOURCES,
        timeout: float | None = None,
    ) -> DownloadReport:
        """Fetch ``session``'s torrent over circuits to several sources at once."""
        started = time.monotonic()
        records: list[CircuitRecord] = []
        failures: list[str] = []
        active: set[gevent.Greenlet] = set()
        changed = gevent.event.Event()
        backoff = RETRY_MIN
        next_request = 0.0
        infohash = session.metainfo.infohash

        def run_circuit(plan: CircuitPlan) -> None:
            t0 = time.monotonic()
            try:
                stream = self.switch.open_circuit(plan, timeout=CIRCUIT_TIMEOUT)
            except AnomosError as exc:
                failures.append(str(exc))
                log.info("circuit with %d relays failed: %s", len(plan.layers) - 1, exc)
                return
            try:
                session.add_connection(stream, f"circuit/{len(plan.layers) - 1} relays").join()
            finally:
                stream.close()
                records.append(
                    CircuitRecord(
                        relays=len(plan.layers) - 1,
                        received=stream.bytes_received,
                        seconds=round(time.monotonic() - t0, 3),
                    )
                )

        def finished(g: gevent.Greenlet) -> None:
            active.discard(g)
            changed.set()

        while not session.complete:
            if timeout is not None and time.monotonic() - started > timeout:
                raise AnomosError(f"download not complete after {timeout:.0f} s")
            missing = sources - len(active)
            if missing > 0 and time.monotonic() >= next_request:
                try:
                    plans = self.tracker.request_circuits(infohash, missing)
                except TrackerError as exc:
                    log.warning("no circuits yet: %s", exc)
                    plans = []
                if plans:
                    backoff = RETRY_MIN
                else:
                    next_request = time.monotonic() + backoff
                    backoff = min(RETRY_MAX / 3, backoff * 2)
                for plan in plans:
                    g = self._spawn(run_circuit, plan)
                    active.add(g)
                    g.link(finished)
            changed.wait(DOWNLOAD_TICK)
            changed.clear()
        gevent.killall(list(active), timeout=5)
        seconds = time.monotonic() - started
        self._announce_now.set()
        return DownloadReport(
            infohash=infohash.hex(),
            size=session.metainfo.total_length,
            seconds=seconds,
            circuits=tuple(records),
            failed=len(failures),
        )
