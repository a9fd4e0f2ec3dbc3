"""The tracker: who is in the network, and the parts that serve it.

Peers announce (keys, contact address, torrents, relayed bytes, and receipts:
the bytes they received from each neighbour) and get their neighbours;
downloaders ask for circuits and get plans whose sources stay hidden from
them (docs/tracker-api.md). :class:`Tracker` is the orchestrator: it holds the
live peers and runs the join/announce and circuits handlers over the parts,
each in its own module (docs/architecture.md has the map): ``http`` front end,
``requests`` checks, ``accounting``, ``swarms``, ``liveness``, ``graph``,
``planner``, ``persistence`` (written behind to SQLite: serving never waits
for the disk), ``settings``. All state changes run without yielding to other
greenlets, so no locks are needed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gevent

from anomos.config import join_address, split_address
from anomos.errors import ConfigError
from anomos.interfaces import RatioPolicy
from anomos.pluginmanager import Plugins
from anomos.protocol.onion import current_epoch
from anomos.protocol.ticket import TICKET_TTL, EdgeTicket, issue_ticket
from anomos.tracker.accounting import Accounting

# Names this module re-exports ("X as X") are the ones callers and tests know it by;
# each is defined in the part it belongs to.
from anomos.tracker.client import MAX_LOST_AGE_MS as MAX_LOST_AGE_MS
from anomos.tracker.client import plan_to_wire
from anomos.tracker.graph import PeerGraph
from anomos.tracker.http import ANNOUNCE_PATH as ANNOUNCE_PATH
from anomos.tracker.http import CIRCUITS_PATH as CIRCUITS_PATH
from anomos.tracker.http import MAX_BODY as MAX_BODY
from anomos.tracker.http import MAX_CONNECTIONS as MAX_CONNECTIONS
from anomos.tracker.http import STATS_PATH as STATS_PATH
from anomos.tracker.http import FrontEnd, Refused
from anomos.tracker.identity import TrackerIdentity
from anomos.tracker.images import TablesImage, build_tables_image
from anomos.tracker.limits import Limits, RecentRequests
from anomos.tracker.liveness import EXPIRY_INTERVALS as EXPIRY_INTERVALS
from anomos.tracker.liveness import UNREACHABLE_PER_ANNOUNCE as UNREACHABLE_PER_ANNOUNCE
from anomos.tracker.liveness import Liveness, Verdict
from anomos.tracker.persistence import FLUSH_INTERVAL as FLUSH_INTERVAL
from anomos.tracker.persistence import Persistence, collector_paused, freeze
from anomos.tracker.planner import PeerKeys, Planner, Swarm
from anomos.tracker.randomness import BufferedSystemRandom
from anomos.tracker.reachability import Reach, Reachability
from anomos.tracker.requests import LOW_ORDER_X25519 as LOW_ORDER_X25519
from anomos.tracker.requests import (
    MAX_CLOCK_SKEW,
    AnnounceRequest,
    Verifier,
    parse_announce,
    parse_circuits,
)
from anomos.tracker.requests import MAX_LOST as MAX_LOST
from anomos.tracker.requests import low_order_x25519 as low_order_x25519
from anomos.tracker.settings import ANNOUNCE_INTERVAL as ANNOUNCE_INTERVAL
from anomos.tracker.settings import MAX_CONNECTIONS_PER_IP as MAX_CONNECTIONS_PER_IP
from anomos.tracker.settings import MIN_INTERVAL as MIN_INTERVAL
from anomos.tracker.settings import RATE_BURST as RATE_BURST
from anomos.tracker.settings import RATE_PER_SECOND as RATE_PER_SECOND
from anomos.tracker.settings import REQUEST_TIMEOUT as REQUEST_TIMEOUT
from anomos.tracker.settings import TrackerSettings
from anomos.tracker.store import Account, Batch, PeerRow, Store
from anomos.tracker.swarms import Swarms
from anomos.tracker.tables import AccountTable, PeerTable

log = logging.getLogger(__name__)

#: Seconds until the next announce asked of a peer whose report is still pending
#: (so it hears of the replacement neighbours soon after the peer is dropped).
LOST_RECHECK_INTERVAL = 2
#: Seconds until the next announce asked of a peer the tracker is still probing
#: (it hears whether it is reachable, and the neighbours that fit, soon after).
REACH_RECHECK_INTERVAL = 3
#: A peer nobody can dial gets new neighbours only as it announces: while it has
#: fewer than the minimum it is asked back this many times per interval.
CLOSED_SHORT_DIVISOR = 4
#: Seconds ``stop`` waits for requests in progress.
STOP_TIMEOUT = 5.0


class Tracker:
    """One tracker: state directory, listening address, plugins and settings."""

    def __init__(
        self,
        state_dir: str | Path,
        listen: str,
        plugins: Plugins,
        settings: TrackerSettings | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = s = settings or TrackerSettings()
        self.state_dir = Path(state_dir)
        self.listen = listen
        split_address(listen)
        self.plugins = plugins
        self.clock = clock
        self.rng = rng or BufferedSystemRandom()  # os.urandom, read in blocks
        self.identity = TrackerIdentity.load_or_create(self.state_dir)
        suite = plugins.cipher_suite(s.cipher_suite)
        policy = plugins.path_policy(
            s.path_policy, min_relays=s.min_relays, max_relays=s.max_relays
        )
        self.graph = PeerGraph(
            min_neighbours=s.min_neighbours,
            max_neighbours=s.max_neighbours,
            rng=self.rng,
            edge_settle=s.edge_settle,
        )
        self.planner = Planner(
            self.graph,
            policy,
            suite,
            self._keys,
            tracker_key=self.identity.private_key,
            rng=self.rng,
            clock=clock,
        )
        self.accounting = Accounting(
            plugins.ratio_policy(s.ratio_policy),
            self.graph,
            min_ratio=s.min_ratio,
            ratio_grace=s.ratio_grace,
        )
        self.membership = Swarms()
        #: Per-identity and per-network limits on what announces hand out (limits.py).
        self.limits = Limits(s.limits, s.min_interval, clock)
        #: Digests of the signed requests seen lately (replays are refused).
        self.recent = RecentRequests(MAX_CLOCK_SKEW, clock)
        self.verifier = Verifier(self.identity.fingerprint, self.recent, clock)
        self.front = FrontEnd(s, self, self.verifier.verify, self.limits.network)
        #: live peers' rows, packed by graph slot (tables.py)
        self.peers = PeerTable(self.graph)
        self.liveness = Liveness(self.graph, self.limits, self.peers)
        self.announces = 0
        #: peers dropped because their neighbours lost them (for /stats)
        self.dropped = 0
        self.persistence = Persistence(
            self.state_dir,
            self._meta,
            flush_max_pending=s.flush_max_pending,
            image=self.graph.image,
            tables=self._tables_image,
        )
        #: Which peers can be dialled from outside (None: not probed, all planned as
        #: reachable); the graph plans around the ones that cannot (reachability.py).
        self.reach: Reachability | None = None
        if s.probe_reachability:
            self.reach = Reachability(
                on_verdict=self._on_reach, network_of=self.limits.network, clock=clock
            )
            self.graph.closed = self.reach.closed
        with collector_paused():
            self._restore()
        self._serving = False
        self._loops: list[gevent.Greenlet] = []
        self._closed = False
        self.address = listen

    # ------------------------------------------------------------------ public
    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def url(self) -> str:
        return f"https://{self.address}{ANNOUNCE_PATH}"

    @property
    def interval(self) -> int:
        return self.settings.interval

    @property
    def accounts(self) -> AccountTable:
        return self.accounting.accounts

    @property
    def ratio(self) -> RatioPolicy:
        return self.accounting.ratio

    @property
    def swarms(self) -> dict[bytes, Swarm]:
        return self.membership.swarms

    @property
    def sizes(self) -> dict[bytes, int]:
        return self.membership.sizes

    @property
    def store(self) -> Store:
        return self.persistence.store

    @property
    def _lost_reports(self) -> dict[bytes, dict[bytes, float]]:
        return self.liveness.reports

    def start(self) -> None:
        """Serve HTTPS and run the expiry and flush loops."""
        if self._closed or self._serving:
            raise ConfigError("tracker already started or stopped; make a new Tracker")
        host, port = split_address(self.listen)
        try:
            self.front.start(host, port, self.identity.server_context(), self.wsgi)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"tracker cannot listen on {self.listen}: {reason}") from None
        self._serving = True
        self.address = join_address(host, self.front.port)
        for loop in (self._expiry_loop, partial(self.persistence.run, self.peer_count)):
            g = gevent.spawn(loop)
            g.link_exception(lambda g: log.error("tracker background loop died: %s", g.exception))
            self._loops.append(g)
        log.info("tracker %s serving, fingerprint %s", self.url, self.fingerprint)
        self.plugins.notify("anomos_tracker_started", tracker=self)

    def peer_count(self) -> int:
        """How many peers are live now."""
        return len(self.peers)

    def stop(self) -> None:
        """Stop serving, write what is pending and close the database; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.front.stop(timeout=STOP_TIMEOUT)
        gevent.killall(self._loops)
        self._loops = []
        if self.reach is not None:
            self.reach.close()
        self.persistence.close()
        if self._serving:
            self._serving = False
            self.plugins.notify("anomos_tracker_stopped", tracker=self)

    def stats(self) -> dict[str, int]:
        """Aggregate counts, never addresses or identities."""
        return {
            "peers": len(self.peers),
            "edges": self.graph.edge_count(),
            "torrents": len(self.swarms),
            "announces": self.announces,
            "circuits_planned": self.planner.planned,
            "dropped": self.dropped,
            **({} if self.reach is None else self.reach.counts()),
        }

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """The WSGI application (the front end's), for serving from elsewhere or in tests."""
        return self.front.wsgi(environ, start_response)

    def flush(self) -> None:
        """Write the changes made since the last flush now, in one transaction."""
        self.persistence.flush()

    # ------------------------------------------------------------------ announce and join
    def announce(
        self,
        peer: bytes,
        inner: dict[bytes, Any],
        network: str | None = None,
        client: str | None = None,
    ) -> dict[bytes, Any]:
        """Handle a verified announce from ``peer``, sent from ``network`` (None: not
        limited per network) and the IP ``client`` (None: not probed back); the reply
        dict (see docs/tracker-api.md)."""
        now = self.clock()
        known = self.peers.known(peer)
        request = parse_announce(inner, known)
        if not request.stopped:
            self._check_limits(peer, known is None, network)
        self.announces += 1
        batch = self.persistence.pending
        account = self.accounting.announce(peer, request, batch)

        if request.stopped:
            if known is not None:
                self._remove_peer(peer, batch)
            self.persistence.changed()
            return self._reply(peer, [], account)

        if self.reach is not None:  # before joining: a newcomer is planned as unreachable
            self.reach.announced(peer, peer, request.address, client, shared=False)
        if known is None:
            self._join(peer, request, now, batch)
        elif self.peers.update(peer, request.onion, request.box, request.address):
            batch.peers[self._id(peer)] = self._row(peer, request, now)
        self.liveness.spoke(peer, now)
        pending = self._on_lost(peer, request.lost, now, batch, network)
        if self.graph.degree(peer) < self.graph.min_neighbours:
            self._apply_changes(self.graph.top_up(peer), batch)
        self.membership.update(peer, self._id(peer), request.torrents, batch)
        self.persistence.changed()
        fixed: list[Any] = self.graph.mark_told(peer)
        for edge in fixed:
            batch.add_edge(self._id(edge.a), self._id(edge.b), edge.nid, self._id(edge.dialer))
        interval = LOST_RECHECK_INTERVAL if pending else None
        if self.reach is not None:
            interval = self._reach_interval(peer, interval)
        return self._reply(peer, self.graph.links(peer), account, interval)

    def _on_reach(self, peer: Any, before: Reach, after: Reach) -> None:
        """Mend the graph around a new verdict: a peer found unreachable loses its edges
        to peers found unreachable too (no link between them can come up). Peers merely
        being checked keep theirs: after a tracker restart every peer is checked again
        at once, and their edges are fine. (A closed peer is given neighbours as it
        announces: see PeerGraph.closed.)"""
        log.debug("peer %s: %s -> %s", bytes(peer).hex()[:16], before.value, after.value)
        reach = self.reach
        if reach is None or after is not Reach.UNREACHABLE or peer not in self.graph:
            return
        for other in self.graph.neighbours(peer):
            if reach.state(other) is Reach.UNREACHABLE:
                self._apply_changes(self.graph.replace_edge(peer, other), self.persistence.pending)
                self.persistence.changed()

    def _reach_interval(self, peer: bytes, interval: int | None) -> int | None:
        """Ask back sooner a peer being probed (to hear the verdict) and one nobody can
        dial that is short of neighbours: it gets new ones only as it announces."""
        if self.reach is not None and self.reach.state(peer) is Reach.CHECKING:
            return min(interval or REACH_RECHECK_INTERVAL, REACH_RECHECK_INTERVAL)
        if peer in self.graph.closed and self.graph.degree(peer) < self.graph.min_neighbours:
            s = self.settings
            short = max(s.min_interval, s.interval // CLOSED_SHORT_DIVISOR)
            return min(interval or short, short)
        return interval

    def _join(self, peer: bytes, request: AnnounceRequest, now: float, batch: Batch) -> None:
        """A new peer enters the graph and gets its first neighbours."""
        changes = self.graph.add_peer(peer)
        self.peers.set(peer, request.onion, request.box, request.address, now)
        self.accounting.joined(peer, batch)
        self._apply_changes(changes, batch)
        batch.peers[self._id(peer)] = self._row(peer, request, now)

    def _row(self, peer: bytes, request: AnnounceRequest, now: float) -> PeerRow:
        """The row to store, made of the request's own values (no copies of the table's)."""
        return PeerRow(peer, request.onion, request.box, request.address, now, self._id(peer))

    def _check_limits(self, peer: bytes, joining: bool, network: str | None) -> None:
        """Refuse (429) an announce over the identity's or its network's allowance."""
        if not self.limits.announce_allowed(peer):
            raise Refused(
                429, f"announcing too often: at most one per {self.settings.min_interval} s"
            )
        if joining and network is not None and not self.limits.join_allowed(network):
            raise Refused(
                429,
                f"too many new peers from {network}: one per "
                f"{self.limits.settings.join_every:g} s; try again later",
            )

    def _on_lost(
        self,
        peer: bytes,
        lost: list[tuple[int, int, str]],
        now: float,
        batch: Batch,
        network: str | None = None,
    ) -> bool:
        """``peer`` lost its links to these NIDs (judged in :mod:`liveness`); True if a
        lost neighbour is still kept."""
        pending = False
        for other, verdict in self.liveness.judge(peer, lost, now, self.peers, network):
            if verdict is Verdict.REPLACE:
                self._on_unreachable(peer, other, batch)
            elif verdict is Verdict.DROP:
                log.info("dropping peer %s: lost by its neighbours", other.hex()[:16])
                self._remove_peer(other, batch)
                self.dropped += 1
            else:
                pending = True
        return pending

    def _on_unreachable(self, peer: bytes, other: bytes, batch: Batch) -> None:
        """``peer`` never got a link to ``other`` up (a firewall, a partition, a transport
        it lacks). ``other`` may be alive and fine with everyone else, so it is not
        suspected: only their edge is replaced, and the pair kept apart for a while."""
        changes = self.graph.replace_edge(peer, other)
        self._apply_changes(changes, batch)
        log.info(
            "peer %s cannot reach neighbour %s: edge replaced (%d new)",
            peer.hex()[:16],
            other.hex()[:16],
            len(changes.added),
        )

    def _remove_peer(self, peer: bytes, batch: Batch) -> None:
        pid = self._id(peer)
        self.membership.remove_peer(peer, pid, batch)
        # Tables indexed by the graph's slot let go of it before the graph does.
        self.accounting.leaving(peer, batch)
        self.peers.discard(peer)
        self._apply_changes(self.graph.remove_peer(peer), batch, (peer, pid))
        batch.remove_peer(pid)
        self.liveness.forget(peer)
        if self.reach is not None:
            self.reach.forget(peer)

    def _id(self, peer: bytes) -> int:
        """The peer's integer id in the store (its join sequence number)."""
        return self.graph.seq(peer)

    def _apply_changes(
        self, changes: Any, batch: Batch, gone: tuple[bytes, int] | None = None
    ) -> None:
        """Queue the graph's changes for the store; ``gone``: (peer, id) of a peer the
        graph just removed (no longer there to ask for its id)."""
        ids = dict([gone]) if gone else {}
        for a, b in changes.removed:
            batch.remove_edge(ids.get(a) or self._id(a), ids.get(b) or self._id(b))
        for edge in changes.added:
            batch.add_edge(self._id(edge.a), self._id(edge.b), edge.nid)

    def _reply(
        self,
        peer: bytes,
        links: list[tuple[Any, int, bool]],
        account: Account,
        interval: int | None = None,
    ) -> dict[bytes, Any]:
        """The reply, with byte-string keys; ``links``: (neighbour, NID, whether ``peer``
        dials it) per neighbour (:meth:`PeerGraph.links`)."""
        every, least = self.settings.interval, self.settings.min_interval
        address_of = self.peers.address_bytes
        return {
            b"neighbours": [
                {
                    b"nid": nid,
                    b"address": address_of(n),
                    b"identity": n,
                    b"dial": int(dials),
                    **(self._edge_ticket(peer, n, nid) if dials else {}),
                }
                for n, nid, dials in links
            ],
            b"epoch": current_epoch(self.clock()),
            b"interval": min(interval or every, every),
            b"min_interval": min(least, interval or least),
            **self.accounting.summary(account),
            b"reachable": (
                Reach.UNCHECKED if self.reach is None else self.reach.state(peer)
            ).value.encode(),
        }

    def _edge_ticket(self, peer: bytes, other: bytes, nid: int) -> dict[bytes, bytes]:
        """For edge ``nid`` that ``peer`` dials, if its far end has not heard of it yet,
        the ticket that lets ``other`` take the link without asking us first
        (protocol/ticket.py)."""
        if peer in self.graph.told_neighbours(other):
            return {}
        ticket = EdgeTicket(
            nid=nid,
            dialer=peer,
            listener=other,
            address=self.peers.address(peer),
            expires=int(self.clock()) + TICKET_TTL,
        )
        return {b"ticket": issue_ticket(ticket, self.identity.private_key)}

    # ------------------------------------------------------------------ circuits
    def circuits(self, peer: bytes, inner: dict[bytes, Any]) -> dict[bytes, Any]:
        """Handle a verified circuit request from ``peer``."""
        request = parse_circuits(inner)
        if peer not in self.peers:
            raise Refused(409, "announce before requesting circuits")
        refusal = self.accounting.refusal(peer)
        if refusal is not None:
            raise Refused(403, refusal)
        swarm = self.swarms.get(request.infohash)
        if swarm is None:
            return {b"circuits": []}
        # Sources near the downloader first: in a big graph most others are out of reach.
        avoid = self.planner.avoided(peer, request.infohash, request.avoid)
        depth = self.settings.max_relays + 1
        sources = self.planner.sources(peer, swarm, request.count, depth, avoid)
        plans = self.planner.plan(peer, request.infohash, sources, request.count, avoid)
        return {b"circuits": [plan_to_wire(p) for p in plans]}

    def _keys(self, peer: Any) -> PeerKeys:
        keys = self.peers.public_keys(peer)
        if keys is None:
            raise KeyError(peer)
        return PeerKeys(*keys)

    # ------------------------------------------------------------------ expiry and state
    def expire(self) -> int:
        """Drop peers silent for EXPIRY_INTERVALS intervals; how many were dropped."""
        deadline = self.clock() - EXPIRY_INTERVALS * self.settings.interval
        batch = self.persistence.pending
        gone = 0
        for peer in self.liveness.silent_since(deadline):
            self._remove_peer(peer, batch)
            gone += 1
        if gone:
            self.persistence.changed()
            log.info("tracker expired %d silent peers", gone)
        return gone

    def _expiry_loop(self) -> None:
        while True:
            gevent.sleep(self.settings.interval)
            self.expire()

    def _meta(self) -> dict[str, int]:
        return {
            "circuits_planned": self.planner.planned,
            "announces": self.announces,
            "dropped": self.dropped,
        }

    def _tables_image(self, gen: int) -> Callable[[], TablesImage]:
        """The tables' image as of batch ``gen``, packed later by the writer thread
        (see anomos.tracker.images)."""
        return partial(
            build_tables_image,
            gen,
            self.peers.image,
            self.accounts.image,
            self.graph.slot,
            self.membership.members,
        )

    def _restore(self) -> None:
        now = self.clock()
        snap = self.persistence.load(now)
        try:
            dropped = self.graph.restore(
                snap.identities, snap.seqs, snap.links, snap.image, snap.gone
            )
            if snap.columns is not None:
                self.peers.load_image(snap.columns, snap.stale_slots, now)
        except ValueError as exc:  # a bad image (the graph is still empty): every row
            log.error("tracker restore: %s; reading every row instead", exc)
            snap = self.store.load(now, images=False)
            dropped = self.graph.restore(snap.identities, snap.seqs, snap.links)
            self.persistence.image_due = True
        if dropped:
            log.warning("tracker restore: %d stored links dropped (unknown peer or NID)", dropped)
        # Restored peers get a full expiry window from now to announce again.
        self.peers.load(snap.peers, now)
        self.accounts.update(snap.accounts)
        self.membership.restore(snap, self.peers)
        self.planner.planned = snap.meta.get("circuits_planned", 0)
        self.announces = snap.meta.get("announces", 0)
        self.dropped = snap.meta.get("dropped", 0)
        self._apply_changes(self.graph.repair(), self.persistence.pending)
        self.flush()
        freeze(collect=False)
        if self.peers:
            log.info(
                "tracker restored %d peers, %d edges, %d torrents",
                len(self.peers),
                self.graph.edge_count(),
                len(self.swarms),
            )
