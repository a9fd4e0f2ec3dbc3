"""The tracker: an HTTPS API over the neighbour graph, the swarms and the planner.

Peers announce (keys, contact address, torrents, relayed bytes, and receipts:
the bytes they received from each neighbour) and get their neighbours;
downloaders ask for circuits and get plans whose sources stay hidden from
them. A peer is credited only the relayed bytes its neighbours confirm. The
exact wire format is in docs/tracker-api.md.

Everything is served from memory; the changes announces make are written to
SQLite together, once a second, in one transaction by a writer thread
(:mod:`anomos.tracker.store`), so serving never waits for the disk; circuit
requests write nothing. A peer not seen for ``EXPIRY_INTERVALS``
announce intervals is dropped and its neighbours repaired. All state changes
run without yielding to other greenlets, so no locks are needed.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import json
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import gevent
import nacl.exceptions
import nacl.signing
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from anomos import bencode
from anomos.config import join_address, split_address
from anomos.errors import AnomosError, ConfigError
from anomos.interfaces import RatioPolicy
from anomos.pluginmanager import Plugins
from anomos.protocol.onion import current_epoch
from anomos.tracker.client import (
    EVENTS,
    MAX_CIRCUITS,
    MAX_LOST_AGE_MS,
    MAX_NEIGHBOURS,
    plan_to_wire,
    signed_message,
)
from anomos.tracker.graph import PeerGraph
from anomos.tracker.identity import TrackerIdentity
from anomos.tracker.limits import Limits, LimitSettings, RecentRequests, Seen
from anomos.tracker.planner import PeerKeys, Planner, Swarm
from anomos.tracker.reachability import Reach, Reachability
from anomos.tracker.store import Account, Batch, PeerRow, Store, SwarmRow

log = logging.getLogger(__name__)

#: Seconds between a peer's announces (told to peers).
ANNOUNCE_INTERVAL = 60
#: Seconds a peer should wait at least between announces (told to peers).
MIN_INTERVAL = 5
#: A peer silent for this many intervals is expired.
EXPIRY_INTERVALS = 3
#: Largest request body accepted.
MAX_BODY = 64 * 1024
#: Seconds a signed request stays acceptable (clock skew plus transit).
MAX_CLOCK_SKEW = 300
#: Torrents one announce may list.
MAX_TORRENTS = 256
#: Torrents whose last reported counters are remembered per identity.
MAX_REPORTS = 1024
#: Per client IP: requests per second refilled, and the burst allowed.
RATE_PER_SECOND = 10.0
RATE_BURST = 60.0
#: Client IPs whose buckets are remembered (least recently seen forgotten first).
MAX_RATE_CLIENTS = 65536
#: Seconds a connection may take, in all, for its TLS handshake, its request and
#: our reply (a deadline for the whole connection, so trickling bytes buys nothing).
REQUEST_TIMEOUT = 20.0
#: Connections served at once.
MAX_CONNECTIONS = 512
#: Connections one client IP may hold open at once (more are closed unanswered).
MAX_CONNECTIONS_PER_IP = 16
#: Bytes a peer may download before ``--min-ratio`` applies (newcomers start at 0).
RATIO_GRACE = 1 << 30
#: Highest ``--min-ratio`` accepted (a typo like 50 would lock everyone out).
MAX_MIN_RATIO = 10.0
#: Lost neighbours one announce may report.
MAX_LOST = 64
#: Distinct neighbours that must report a peer lost before it is dropped (fewer
#: if it has fewer neighbours); one report only stops planning over that edge.
LOST_REPORTS_TO_DROP = 2
#: Edges one announce may have replaced by reporting neighbours "unreachable" (more
#: are ignored), so that one peer cannot churn the graph fast.
UNREACHABLE_PER_ANNOUNCE = 2
#: Seconds until the next announce asked of a peer the tracker is still probing
#: (it hears whether it is reachable, and the neighbours that fit, soon after).
REACH_RECHECK_INTERVAL = 3
#: A peer nobody can dial gets new neighbours only as it announces: while it has
#: fewer than the minimum it is asked back this many times per interval.
CLOSED_SHORT_DIVISOR = 4
#: Seconds until the next announce asked of a peer whose report is still pending
#: (so it hears of the replacement neighbours soon after the peer is dropped).
LOST_RECHECK_INTERVAL = 2
#: Seconds between writes of accumulated changes to the database (a crash loses at most
#: this much, plus a write under way; peers simply announce again).
FLUSH_INTERVAL = 1.0
#: Announces after which changes are handed to the writer at once, whatever the time.
FLUSH_MAX_PENDING = 2000
#: Seconds between moves of the surviving objects out of the garbage collector's sight
#: (gc.freeze): a full collection then walks only what is younger, not a million peers'
#: state (a stall of seconds). Cyclic garbage still alive at that moment is never
#: collected: a few in-flight requests' worth every few minutes.
FREEZE_INTERVAL = 300.0
#: Seconds ``stop`` waits for requests in progress.
STOP_TIMEOUT = 5.0

ANNOUNCE_PATH = "/announce"
CIRCUITS_PATH = "/circuits"
STATS_PATH = "/stats"


class Refused(AnomosError):
    """A request the tracker answers with an HTTP error and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


@attrs.define(eq=False)
class RateLimiter:
    """Token bucket per client IP, with a bounded memory of clients."""

    rate: float = RATE_PER_SECOND
    burst: float = RATE_BURST
    clock: Callable[[], float] = time.monotonic
    _buckets: collections.OrderedDict[str, tuple[float, float]] = attrs.field(
        factory=collections.OrderedDict, init=False
    )

    def allow(self, client: str) -> bool:
        now = self.clock()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > MAX_RATE_CLIENTS:
            self._buckets.popitem(last=False)
        return ok


# ---------------------------------------------------------------------------- validation


def _field(d: dict[bytes, Any], key: str) -> Any:
    try:
        return d[key.encode()]
    except KeyError:
        raise Refused(400, f"missing field {key!r}") from None


def _int_field(d: dict[bytes, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = _field(d, key)
    if type(value) is not int or not lo <= value <= hi:
        raise Refused(400, f"field {key!r} must be an integer in {lo}..{hi}")
    return value


def _bytes_field(d: dict[bytes, Any], key: str, sizes: tuple[int, ...]) -> bytes:
    value = _field(d, key)
    if not isinstance(value, bytes) or len(value) not in sizes:
        raise Refused(400, f"field {key!r} must be {' or '.join(map(str, sizes))} bytes")
    return value


_P25519 = 2**255 - 19
#: u-coordinates of the X25519 public keys of small order, for which every shared secret
#: is all zeros (libsodium's list): 0, 1, the two of order 8, p - 1, and the non-canonical
#: p and p + 1. X25519 ignores the top bit, so it is masked off before comparing.
LOW_ORDER_X25519 = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
        _P25519,
        _P25519 + 1,
    }
)


def low_order_x25519(key: bytes) -> bool:
    """Whether ``key`` (32 bytes) is a point of small order: a comparison, no scalar mult."""
    return int.from_bytes(key, "little") & ((1 << 255) - 1) in LOW_ORDER_X25519


def _x25519_field(d: dict[bytes, Any], key: str, known: bytes | None) -> bytes:
    """A 32-byte X25519 public key that is not a low-order point (it would break every
    circuit through the peer); ``known`` is the key already accepted from this peer."""
    value = _bytes_field(d, key, (32,))
    if value != known and low_order_x25519(value):
        raise Refused(400, f"field {key!r} is not a usable X25519 public key")
    return value


def _address_field(d: dict[bytes, Any]) -> str:
    raw = _field(d, "address")
    try:
        if not isinstance(raw, bytes) or len(raw) > 255:
            raise ValueError
        address = raw.decode("ascii")
        if not address.isprintable() or " " in address:
            raise ValueError
        _host, port = split_address(address)
    except (ValueError, ConfigError):
        raise Refused(400, "field 'address' must be HOST:PORT") from None
    if not 1 <= port <= 65535:
        raise Refused(400, "field 'address' needs a port in 1..65535")
    return address


#: Why a neighbour is reported: its link went down, it broke the protocol, or it was
#: never reachable (assigned, dialled, never linked; it may well be alive).
_LOST_WHY = ("lost", "protocol", "unreachable")


def _parse_lost(raw: Any) -> list[tuple[int, int, str]]:
    """The optional ``lost`` field: [(nid, milliseconds ago, why), ...]."""
    if not isinstance(raw, list) or len(raw) > MAX_LOST:
        raise Refused(400, f"field 'lost' must be a list of at most {MAX_LOST}")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise Refused(400, "each lost neighbour must be a dict")
        why = item.get(b"why", b"lost")
        if not isinstance(why, bytes) or why.decode("ascii", "replace") not in _LOST_WHY:
            raise Refused(400, f"lost neighbour 'why' must be one of {', '.join(_LOST_WHY)}")
        out.append(
            (
                _int_field(item, "nid", 1, 2**32 - 1),
                _int_field(item, "ago", 0, MAX_LOST_AGE_MS),
                why.decode("ascii"),
            )
        )
    return out


def _parse_receipts(raw: Any) -> dict[int, int]:
    """The optional ``receipts`` field: {nid: bytes received from that neighbour this session}."""
    if not isinstance(raw, list) or len(raw) > MAX_NEIGHBOURS:
        raise Refused(400, f"field 'receipts' must be a list of at most {MAX_NEIGHBOURS}")
    out = {}
    for item in raw:
        if not isinstance(item, dict):
            raise Refused(400, "each receipt must be a dict")
        nid = _int_field(item, "nid", 1, 2**32 - 1)
        out[nid] = _int_field(item, "received")
    return out


@attrs.define
class _Receipts:
    """What one reporter's receipts said last, in its current session (memory only)."""

    session: bytes
    #: Whether these baselines start with the session (its counters started at zero)
    #: or were picked up mid-session by a restarted tracker (first receipts are
    #: baselines only: what came before them may have been credited already).
    from_start: bool
    #: nid -> (the neighbour at that NID, bytes it was last confirmed to have sent)
    last: dict[int, tuple[bytes, int]] = attrs.field(factory=dict)


def _confirmed_upload(account: Account) -> int:
    """Uploaded bytes credited: the peer's claim, as far as its neighbours' receipts
    confirm link bytes from it that the relay credit has not used already.

    A source's uploads leave it over its links like the cells it relays, so the
    receipts bound both together: what a peer says it uploaded is never taken on
    trust (it could claim 10^13 bytes), only the bytes others saw leave it.
    """
    return min(account.uploaded, max(0, account.relayed_confirmed - account.relayed))


def _add_delta(reported: int, last: int) -> int:
    """Bytes to credit from a cumulative counter; a smaller value means it was reset."""
    return reported - last if reported >= last else reported


# ---------------------------------------------------------------------------- the tracker


class _Handler(WSGIHandler):
    """A client that goes away mid-request or mid-reply (every peer that exits
    does) is no error of ours: one debug line, not pywsgi's traceback."""

    def handle_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        if issubclass(t, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
            log.debug("tracker client %s went away: %s", self.client_address, v)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


class _Server(WSGIServer):
    """pywsgi over TLS: a deadline on each whole connection, a cap on connections per IP.

    At the deadline the connection is shut down under whatever reads or writes
    it (the TLS handshake, the request line, the body, our reply), so a client
    trickling a byte at a time holds a slot for REQUEST_TIMEOUT at most.
    """

    handler_class = _Handler

    def __init__(self, *args: Any, shared_clients: frozenset[str] = frozenset(), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.shared_clients = shared_clients

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        ip = str(address[0]) if isinstance(address, tuple) and address else "?"
        if self.per_ip[ip] >= MAX_CONNECTIONS_PER_IP and ip not in self.shared_clients:
            log.debug("tracker: %s already holds %d connections", ip, MAX_CONNECTIONS_PER_IP)
            client_socket.close()
            return None
        self.per_ip[ip] += 1
        # Our own handle on the connection: the TLS wrapper takes over the original.
        handle = client_socket.dup()
        timer = gevent.spawn_later(REQUEST_TIMEOUT, _cut, handle, address)
        client_socket.settimeout(REQUEST_TIMEOUT)
        try:
            return super().wrap_socket_and_handle(client_socket, address)
        except (ssl.SSLError, OSError) as exc:
            log.debug("tracker connection from %s failed: %s", address, exc)
            return None
        finally:
            timer.kill(block=False)
            handle.close()
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]


def _cut(sock: Any, address: Any) -> None:
    log.debug("tracker connection from %s took over %g s: cut", address, REQUEST_TIMEOUT)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Tracker:
    """One tracker: state directory, listening address, plugins and policies."""

    def __init__(
        self,
        state_dir: str | Path,
        listen: str,
        plugins: Plugins,
        *,
        path_policy: str = "weighted",
        cipher_suite: str = "x25519",
        ratio_policy: str = "relay-credit",
        min_neighbours: int = 4,
        max_neighbours: int = 6,
        min_relays: int = 2,
        max_relays: int = 4,
        interval: int = ANNOUNCE_INTERVAL,
        min_interval: int = MIN_INTERVAL,
        rate: float = RATE_PER_SECOND,
        burst: float = RATE_BURST,
        edge_settle: float | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        shared_clients: Iterable[str] = (),
        min_ratio: float = 0.0,
        ratio_grace: int = RATIO_GRACE,
        limits: LimitSettings | None = None,
        probe_reachability: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        if not 0 <= min_ratio <= MAX_MIN_RATIO:
            raise ConfigError(f"--min-ratio {min_ratio:g}: need 0 to {MAX_MIN_RATIO:g}")
        if ratio_grace < 0:
            raise ConfigError("--ratio-grace must not be negative")
        #: Share ratio a peer needs to be given circuits once it downloaded more than
        #: ``ratio_grace`` bytes (0: no minimum). Relaying raises it: see _ratio_refusal.
        self.min_ratio = min_ratio
        self.ratio_grace = ratio_grace
        #: Addresses that stand for many clients (tor's end of an onion service):
        #: no per-address connection cap, and rate limits per peer identity instead.
        self.shared_clients = frozenset(shared_clients)
        self.listen = listen
        split_address(listen)
        self.plugins = plugins
        self.interval = interval
        self.min_interval = min_interval
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self.identity = TrackerIdentity.load_or_create(self.state_dir)
        self.ratio: RatioPolicy = plugins.ratio_policy(ratio_policy)
        suite = plugins.cipher_suite(cipher_suite)
        policy = plugins.path_policy(path_policy, min_relays=min_relays, max_relays=max_relays)
        self.max_relays = max_relays
        self.graph = PeerGraph(
            min_neighbours=min_neighbours,
            max_neighbours=max_neighbours,
            rng=self.rng,
            edge_settle=edge_settle,
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
        self.limiter = RateLimiter(rate, burst)
        #: Per-identity and per-network limits on what announces hand out (limits.py).
        self.limits = Limits(limits or LimitSettings(), min_interval, clock)
        #: Digests of the signed requests seen lately (replays are refused).
        self.recent = RecentRequests(MAX_CLOCK_SKEW, clock)
        #: live peers
        self.peers: dict[bytes, PeerRow] = {}
        #: live peers, least recently seen first (expiry pops from the front)
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.accounts: dict[bytes, Account] = {}
        self.swarms: dict[bytes, Swarm] = {}
        self._peer_torrents: dict[bytes, set[bytes]] = {}
        self.sizes: dict[bytes, int] = {}
        self.announces = 0
        self.store = Store(self.state_dir)
        self._pending = Batch()
        self._pending_count = 0
        #: peer -> neighbours that reported it lost since it last announced -> when
        self._lost_reports: dict[bytes, dict[bytes, float]] = {}
        #: peers dropped because their neighbours lost them (for /stats)
        self.dropped = 0
        #: reporter -> its receipt baselines (not persisted: see _confirm)
        self._receipts: dict[bytes, _Receipts] = {}
        #: Which peers can be dialled from outside (None: not probed, all planned as
        #: reachable); the graph plans around the ones that cannot (reachability.py).
        self.reach: Reachability | None = None
        if probe_reachability:
            self.reach = Reachability(
                on_verdict=self._on_reach, network_of=self.limits.network, clock=clock
            )
            self.graph.closed = self.reach.closed
        self._restore()
        self._server: _Server | None = None
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

    def start(self) -> None:
        """Serve HTTPS and run the expiry and flush loops."""
        if self._closed or self._server is not None:
            raise ConfigError("tracker already started or stopped; make a new Tracker")
        host, port = split_address(self.listen)
        server = _Server(
            (host, port),
            self.wsgi,
            spawn=Pool(MAX_CONNECTIONS),
            shared_clients=self.shared_clients,
            log=None,
            error_log=log,
            ssl_context=self.identity.server_context(),
        )
        try:
            server.start()
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"tracker cannot listen on {self.listen}: {reason}") from None
        self._server = server
        self.address = join_address(host, server.server_port)
        for loop in (self._expiry_loop, self._flush_loop):
            g = gevent.spawn(loop)
            g.link_exception(lambda g: log.error("tracker background loop died: %s", g.exception))
            self._loops.append(g)
        log.info("tracker %s serving, fingerprint %s", self.url, self.fingerprint)
        self.plugins.notify("anomos_tracker_started", tracker=self)

    def stop(self) -> None:
        """Stop serving, write what is pending and close the database; idempotent."""
        if self._closed:
            return
        self._closed = True
        was_serving = self._server is not None
        if self._server is not None:
            self._server.stop(timeout=STOP_TIMEOUT)
            self._server = None
        gevent.killall(self._loops)
        self._loops = []
        if self.reach is not None:
            self.reach.close()
        self.flush()
        self.store.close()
        if was_serving:
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

    # ------------------------------------------------------------------ announce
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
        session = _field(inner, "session")
        if not isinstance(session, bytes) or not 1 <= len(session) <= 32:
            raise Refused(400, "field 'session' must be 1-32 bytes")
        row = self.peers.get(peer)
        onion = _x25519_field(inner, "onion", row.onion if row else None)
        box = _x25519_field(inner, "box", row.box if row else None)
        address = _address_field(inner)
        relayed = _int_field(inner, "relayed")
        stopped = _int_field(inner, "stopped", 0, 1)
        torrents = self._parse_torrents(_field(inner, "torrents"))
        lost = _parse_lost(inner.get(b"lost", []))
        receipts = _parse_receipts(inner.get(b"receipts", []))
        if not stopped:
            self._check_limits(peer, row is None, network)
        self.announces += 1
        batch = self._pending
        fresh = self.accounts.get(peer, Account()).session != session
        account = self._credit(peer, session, relayed, torrents, batch)
        self._confirm(peer, session, fresh, receipts, batch)

        if stopped:
            self._receipts.pop(peer, None)
            if row is not None:
                self._remove_peer(peer, batch)
            self._changed()
            return self._reply(peer, [], account)

        if self.reach is not None:  # before joining: a newcomer is planned as unreachable
            self.reach.announced(peer, peer, address, client, shared=False)
        if row is None:
            row = PeerRow(peer, onion, box, address, now, 0)
            self.peers[peer] = row
            changes = self.graph.add_peer(peer)
            row.seq = self.graph.seq(peer)
            self._apply_changes(changes, batch)
            batch.peers[row.seq] = row
        else:
            if (row.onion, row.box, row.address) != (onion, box, address):
                row.onion, row.box, row.address = onion, box, address
                batch.peers[row.seq] = row
            row.last_seen = now
        # Speaking proves it alive: earlier reports of it being lost are void.
        self._lost_reports.pop(peer, None)
        pending = self._on_lost(peer, lost, now, batch, network) if lost else False
        if self.graph.degree(peer) < self.graph.min_neighbours:
            self._apply_changes(self.graph.top_up(peer), batch)
        self._seen[peer] = now
        self._seen.move_to_end(peer)
        self._update_swarms(peer, torrents, batch)
        self._changed()
        fixed: list[Any] = self.graph.mark_told(peer)
        for edge in fixed:
            batch.add_edge(self._id(edge.a), self._id(edge.b), edge.nid, self._id(edge.dialer))
        interval = LOST_RECHECK_INTERVAL if pending else None
        if self.reach is not None:
            interval = self._reach_interval(peer, interval)
        return self._reply(peer, list(self.graph.neighbours(peer)), account, interval)

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
                self._apply_changes(self.graph.replace_edge(peer, other), self._pending)
                self._changed()

    def _reach_interval(self, peer: bytes, interval: int | None) -> int | None:
        """Ask back sooner a peer being probed (to hear the verdict) and one nobody can
        dial that is short of neighbours: it gets new ones only as it announces."""
        if self.reach is not None and self.reach.state(peer) is Reach.CHECKING:
            return min(interval or REACH_RECHECK_INTERVAL, REACH_RECHECK_INTERVAL)
        if peer in self.graph.closed and self.graph.degree(peer) < self.graph.min_neighbours:
            short = max(self.min_interval, self.interval // CLOSED_SHORT_DIVISOR)
            return min(interval or short, short)
        return interval

    def _check_limits(self, peer: bytes, joining: bool, network: str | None) -> None:
        """Refuse (429) an announce over the identity's or its network's allowance."""
        if not self.limits.announce_allowed(peer):
            raise Refused(429, f"announcing too often: at most one per {self.min_interval} s")
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
        """``peer`` lost its links to these NIDs; True if a lost neighbour is still kept.

        The edge is taken out of planning at once (a circuit over it would fail);
        the neighbour is dropped, and its neighbours repaired, once enough of its
        neighbours report it. A report older than the neighbour's own last
        announce is ignored: it came back (restarted) since. A neighbour reported
        ``unreachable`` is not suspected at all: see :meth:`_on_unreachable`.
        """
        pending = False
        replaced = 0
        for nid, age_ms, why in lost:
            other: Any = self.graph.peer_by_nid(peer, nid)
            row = self.peers.get(other) if other is not None else None
            if other is None or row is None:
                continue
            if why == "unreachable":
                if replaced >= UNREACHABLE_PER_ANNOUNCE or not self.limits.replacement_allowed(
                    peer, network
                ):
                    log.info(
                        "peer %s reports neighbour %s unreachable: over %d per announce "
                        "or its allowance, ignored",
                        peer.hex()[:16],
                        other.hex()[:16],
                        UNREACHABLE_PER_ANNOUNCE,
                    )
                    continue
                self._on_unreachable(peer, other, batch)
                replaced += 1
                continue
            if row.last_seen >= now - age_ms / 1000.0:
                continue
            self.graph.unsettle(peer, other)
            reporters = self._lost_reports.setdefault(other, {})
            reporters[peer] = now
            log.info(
                "peer %s reports neighbour %s: %s (%d report(s))",
                peer.hex()[:16],
                other.hex()[:16],
                why,
                len(reporters),
            )
            if len(reporters) >= min(LOST_REPORTS_TO_DROP, self.graph.degree(other)):
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

    def _credit(
        self,
        peer: bytes,
        session: bytes,
        relayed: int,
        torrents: dict[bytes, tuple[int, int, int, str]],
        batch: Batch,
    ) -> Account:
        """Add what the peer reports beyond its last report in this session to its totals
        (and mark the account for writing only if that changed anything)."""
        account = self.accounts.get(peer)
        changed = account is None or account.session != session
        if account is None:
            account = self.accounts[peer] = Account()
        if account.session != session:
            # A new session: its counters start from zero, so every baseline does too.
            account.session, account.relayed_reported = session, 0
            account.reports.clear()
            batch.clear_reports(peer)
        if relayed != account.relayed_reported:
            account.relayed_claimed += _add_delta(relayed, account.relayed_reported)
            account.relayed_reported = relayed
            changed = True
        for ih, (up, down, _left, _event) in torrents.items():
            last = account.reports.get(ih)
            if last == (up, down):
                continue
            last_up, last_down = last or (0, 0)
            account.uploaded += _add_delta(up, last_up)
            account.downloaded += _add_delta(down, last_down)
            account.reports[ih] = (up, down)
            batch.set_report(peer, ih, (up, down))
            changed = True
        if len(account.reports) > MAX_REPORTS:
            # Forget torrents the peer no longer lists (bounds memory per identity).
            for ih in [ih for ih in account.reports if ih not in torrents]:
                del account.reports[ih]
                batch.remove_report(peer, ih)
            changed = True
        if changed:
            batch.accounts[peer] = account
        return account

    def _confirm(
        self,
        reporter: bytes,
        session: bytes,
        fresh: bool,
        receipts: dict[int, int],
        batch: Batch,
    ) -> None:
        """Credit each neighbour what ``reporter`` received from it since its last receipt.

        Receipts are cumulative per session and NID, like the other counters. For
        an NID that is not one of the reporter's edges nobody is credited. The
        baselines live in memory only: after a tracker restart, the first receipt
        of each NID in a session already under way is a baseline only, never credit.
        ``fresh``: this announce starts a session the tracker had not seen.
        """
        state = self._receipts.get(reporter)
        if state is None or state.session != session:
            state = self._receipts[reporter] = _Receipts(session, from_start=fresh)
        last, state.last = state.last, {}
        for nid, received in receipts.items():
            sender: Any = self.graph.peer_by_nid(reporter, nid)
            if sender is None:
                continue
            state.last[nid] = (sender, received)
            before = last.get(nid)
            if before is not None and before[0] == sender:
                delta = _add_delta(received, before[1])
            elif state.from_start:
                delta = received  # a new neighbour at this NID: its counter began at zero
            else:
                continue  # picked up mid-session: a baseline only
            if delta:
                account = self.accounts.setdefault(sender, Account())
                account.relayed_confirmed += delta
                batch.accounts[sender] = account

    def _parse_torrents(self, raw: Any) -> dict[bytes, tuple[int, int, int, str]]:
        if not isinstance(raw, list) or len(raw) > MAX_TORRENTS:
            raise Refused(400, f"field 'torrents' must be a list of at most {MAX_TORRENTS}")
        out: dict[bytes, tuple[int, int, int, str]] = {}
        for item in raw:
            if not isinstance(item, dict):
                raise Refused(400, "each torrent must be a dict")
            ih = _bytes_field(item, "infohash", (20, 32))
            event = _field(item, "event")
            if not isinstance(event, bytes) or event.decode("ascii", "replace") not in EVENTS:
                raise Refused(400, f"torrent event must be one of {', '.join(EVENTS[1:])} or empty")
            out[ih] = (
                _int_field(item, "uploaded"),
                _int_field(item, "downloaded"),
                _int_field(item, "left"),
                event.decode("ascii"),
            )
        return out

    def _update_swarms(
        self, peer: bytes, torrents: dict[bytes, tuple[int, int, int, str]], batch: Batch
    ) -> None:
        """Make the peer's swarm membership exactly the torrents it listed (minus stopped ones)."""
        mine = self._peer_torrents.setdefault(peer, set())
        for ih in list(mine):
            if ih not in torrents or torrents[ih][3] == "stopped":
                self._leave_swarm(peer, ih, batch)
        for ih, (up, down, left, event) in torrents.items():
            if event == "stopped":
                continue
            swarm = self._swarm(ih)
            before = swarm.rows.get(peer)
            swarm.set(peer, SwarmRow(left, up, down))
            mine.add(ih)
            if before is None or before.left != left:  # the counters are in its account
                batch.set_swarm(ih, self._id(peer), left)
            if swarm.size > self.sizes.get(ih, -1):
                self.sizes[ih] = swarm.size
                batch.torrents[ih] = swarm.size

    def _swarm(self, ih: bytes) -> Swarm:
        swarm = self.swarms.get(ih)
        if swarm is None:
            swarm = self.swarms[ih] = Swarm()
            swarm.size = self.sizes.get(ih, 0)
        return swarm

    def _leave_swarm(self, peer: bytes, ih: bytes, batch: Batch) -> None:
        swarm = self.swarms.get(ih)
        if swarm is not None:
            swarm.remove(peer)
            if not swarm:
                del self.swarms[ih]
        self._peer_torrents.get(peer, set()).discard(ih)
        batch.remove_swarm(ih, self._id(peer))

    def _remove_peer(self, peer: bytes, batch: Batch) -> None:
        for ih in list(self._peer_torrents.get(peer, ())):
            self._leave_swarm(peer, ih, batch)
        self._peer_torrents.pop(peer, None)
        self._apply_changes(self.graph.remove_peer(peer), batch)
        batch.remove_peer(self._id(peer))
        self.peers.pop(peer, None)
        self._seen.pop(peer, None)
        self._lost_reports.pop(peer, None)
        if self.reach is not None:
            self.reach.forget(peer)

    def _id(self, peer: bytes) -> int:
        """The peer's integer id in the store (its join sequence number)."""
        return self.peers[peer].seq

    def _apply_changes(self, changes: Any, batch: Batch) -> None:
        for a, b in changes.removed:
            batch.remove_edge(self._id(a), self._id(b))
        for edge in changes.added:
            batch.add_edge(self._id(edge.a), self._id(edge.b), edge.nid)

    def _reply(
        self,
        peer: bytes,
        neighbours: list[Any],
        account: Account,
        interval: int | None = None,
    ) -> dict[bytes, Any]:
        """The reply, with byte-string keys: bencoded as is, in one pass."""
        ratio = self._ratio_of(account)
        return {
            b"neighbours": [
                {
                    b"nid": self.graph.nid(peer, n),
                    b"address": self.peers[n].address.encode(),
                    b"identity": n,
                    b"dial": int(self.graph.dialer(peer, n) == peer),
                }
                for n in neighbours
            ],
            b"epoch": current_epoch(self.clock()),
            b"interval": min(interval or self.interval, self.interval),
            b"min_interval": min(self.min_interval, interval or self.min_interval),
            b"ratio": b"inf" if math.isinf(ratio) else f"{ratio:.6f}".encode(),
            b"uploaded": _confirmed_upload(account),
            b"uploaded_claimed": account.uploaded,
            b"downloaded": account.downloaded,
            b"relayed": account.relayed,
            b"relayed_claimed": account.relayed_claimed,
            b"reachable": (
                Reach.UNCHECKED if self.reach is None else self.reach.state(peer)
            ).value.encode(),
        }

    # ------------------------------------------------------------------ circuits
    def circuits(self, peer: bytes, inner: dict[bytes, Any]) -> dict[bytes, Any]:
        """Handle a verified circuit request from ``peer``."""
        infohash = _bytes_field(inner, "infohash", (20, 32))
        count = _int_field(inner, "count", 1, MAX_CIRCUITS)
        if peer not in self.peers:
            raise Refused(409, "announce before requesting circuits")
        refusal = self._ratio_refusal(peer)
        if refusal is not None:
            raise Refused(403, refusal)
        swarm = self.swarms.get(infohash)
        if swarm is None:
            return {b"circuits": []}
        # Sources near the downloader first: in a big graph most others are out of reach.
        sources = self.planner.sources(peer, swarm, count, self.max_relays + 1)
        plans = self.planner.plan(peer, infohash, sources, count)
        return {b"circuits": [plan_to_wire(p) for p in plans]}

    def _ratio_of(self, account: Account) -> float:
        """The ratio plugin's share ratio, with the uploaded and relayed bytes
        neighbours confirmed."""
        return self.ratio.ratio(_confirmed_upload(account), account.downloaded, account.relayed)

    def _ratio_refusal(self, peer: bytes) -> str | None:
        """Why ``peer`` gets no circuits under this tracker's minimum ratio, or None.

        Only downloads past the grace allowance count; the peer keeps relaying
        (and seeding) meanwhile, which is how it earns its way back.
        """
        if not self.min_ratio:
            return None
        account = self.accounts.get(peer)
        if account is None or account.downloaded <= self.ratio_grace:
            return None
        ratio = self._ratio_of(account)
        if ratio >= self.min_ratio:
            return None
        return (
            f"share ratio {ratio:.2f} is below this tracker's minimum {self.min_ratio:g}: "
            "seed or relay for others to raise it"
        )

    def _keys(self, peer: Any) -> PeerKeys:
        row = self.peers[peer]
        return PeerKeys(row.onion, row.box)

    # ------------------------------------------------------------------ expiry and state
    def expire(self) -> int:
        """Drop peers silent for EXPIRY_INTERVALS intervals; how many were dropped."""
        deadline = self.clock() - EXPIRY_INTERVALS * self.interval
        batch = self._pending
        gone = 0
        while self._seen:
            peer, seen = next(iter(self._seen.items()))
            if seen >= deadline:
                break
            self._remove_peer(peer, batch)
            gone += 1
        if gone:
            self._changed()
            log.info("tracker expired %d silent peers", gone)
        return gone

    def _expiry_loop(self) -> None:
        while True:
            gevent.sleep(self.interval)
            self.expire()

    def flush(self) -> None:
        """Write the changes made since the last flush now, in one transaction."""
        batch, self._pending, self._pending_count = self._pending, Batch(), 0
        batch.meta.update(self._meta())
        self.store.write(batch)

    def _write_behind(self) -> None:
        """Hand the changes to the store's writer thread, unless it is still busy
        with the previous ones (then they keep accumulating: serving never waits)."""
        if self.store.busy:
            return
        batch, self._pending, self._pending_count = self._pending, Batch(), 0
        batch.meta.update(self._meta())
        self.store.submit(batch)

    def _changed(self) -> None:
        self._pending_count += 1
        if self._pending_count >= FLUSH_MAX_PENDING:
            self._write_behind()

    def _flush_loop(self) -> None:
        frozen = time.monotonic()
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            if self._pending_count:
                self._write_behind()
            if time.monotonic() - frozen >= FREEZE_INTERVAL:
                frozen = time.monotonic()
                _freeze()

    def _meta(self) -> dict[str, int]:
        return {
            "circuits_planned": self.planner.planned,
            "announces": self.announces,
            "dropped": self.dropped,
        }

    def _restore(self) -> None:
        snap = self.store.load()
        now = self.clock()
        for row in snap.peers:
            self.peers[row.identity] = row
            # Restored peers get a full expiry window from now to announce again.
            row.last_seen = now
            self._seen[row.identity] = now
            self.graph.restore_peer(row.identity, row.seq)
        self.graph.restore_edges((a, b, nid, snap.dialers.get((a, b))) for a, b, nid in snap.edges)
        self.accounts = dict(snap.accounts)
        self.sizes = dict(snap.torrents)
        for ih, peer, srow in snap.swarm:
            if peer in self.peers:
                self._swarm(ih).set(peer, srow)
                self._peer_torrents.setdefault(peer, set()).add(ih)
        self.planner.planned = snap.meta.get("circuits_planned", 0)
        self.announces = snap.meta.get("announces", 0)
        self.dropped = snap.meta.get("dropped", 0)
        self._apply_changes(self.graph.repair(), self._pending)
        self.flush()
        _freeze()
        if self.peers:
            log.info(
                "tracker restored %d peers, %d edges, %d torrents",
                len(self.peers),
                self.graph.edge_count(),
                len(self.swarms),
            )

    # ------------------------------------------------------------------ HTTP
    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """The WSGI application: routing, limits, signature checks, one-line errors."""
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        client = environ.get("REMOTE_ADDR", "?")
        shared = client in self.shared_clients
        try:
            if not shared and not self.limiter.allow(client):
                raise Refused(429, "too many requests; slow down")
            if path == STATS_PATH:
                if shared and not self.limiter.allow(f"{client} /stats"):
                    raise Refused(429, "too many requests; slow down")
                if method != "GET":
                    raise Refused(405, "use GET for /stats")
                body = json.dumps(self.stats()).encode()
                return _respond(start_response, 200, body, "application/json")
            if path not in (ANNOUNCE_PATH, CIRCUITS_PATH):
                raise Refused(404, f"no such endpoint {path[:64]!r}")
            if method != "POST":
                raise Refused(405, f"use POST for {path}")
            peer, inner = self._verified(path, _read_body(environ))
            if shared and not self.limiter.allow(peer.hex()):
                raise Refused(429, "too many requests; slow down")
            if path == ANNOUNCE_PATH:
                network = None if shared else self.limits.network(client)
                reply = self.announce(peer, inner, network, None if shared else client)
            else:
                reply = self.circuits(peer, inner)
            return _respond(start_response, 200, bencode.encode(reply))
        except Refused as exc:
            # A client over its rate gets a token back within 1/rate seconds.
            retry = [("Retry-After", str(max(1, math.ceil(1 / self.limiter.rate))))]
            return _respond(
                start_response,
                exc.status,
                bencode.encode({b"failure reason": exc.reason}),
                headers=retry if exc.status == 429 else [],
            )
        except Exception:
            log.exception("tracker failed on %s", path[:64])
            return _respond(
                start_response, 500, bencode.encode({b"failure reason": b"internal error"})
            )

    def _verified(self, path: str, body: bytes) -> tuple[bytes, dict[bytes, Any]]:
        """Check the envelope's signature and timestamp; the peer identity and inner dict."""
        try:
            outer = bencode.decode(body, max_size=MAX_BODY, max_depth=4)
        except AnomosError:
            raise Refused(400, "request body is not valid bencode") from None
        if not isinstance(outer, dict):
            raise Refused(400, "request body must be a bencoded dict")
        peer = _bytes_field(outer, "peer", (32,))
        msg = _field(outer, "msg")
        sig = _bytes_field(outer, "sig", (64,))
        if not isinstance(msg, bytes):
            raise Refused(400, "field 'msg' must be a byte string")
        try:
            nacl.signing.VerifyKey(peer).verify(signed_message(self.fingerprint, path, msg), sig)
        except (nacl.exceptions.BadSignatureError, ValueError):
            raise Refused(
                403, "bad signature: request not signed by the claimed peer for this tracker"
            ) from None
        try:
            inner = bencode.decode(msg, max_size=MAX_BODY, max_depth=4)
        except AnomosError:
            raise Refused(400, "field 'msg' is not valid bencode") from None
        if not isinstance(inner, dict):
            raise Refused(400, "field 'msg' must be a bencoded dict")
        stamp = _int_field(inner, "time")
        if abs(stamp - self.clock()) > MAX_CLOCK_SKEW:
            raise Refused(403, f"request time is more than {MAX_CLOCK_SKEW} s off the tracker's")
        digest = hashlib.blake2b(peer + path.encode() + msg, digest_size=16).digest()
        seen = self.recent.add(digest, stamp)
        if seen is not Seen.NEW:
            raise Refused(403 if seen is Seen.REPLAYED else 429, seen.value)
        return peer, inner


def _freeze() -> None:
    """Collect the young generations, then exempt every surviving object from future
    collections: the tracker's state is long-lived, and walking it would stall serving."""
    gc.collect(1)
    gc.freeze()


def _read_body(environ: dict[str, Any]) -> bytes:
    length_text = environ.get("CONTENT_LENGTH") or ""
    try:
        length = int(length_text) if length_text else -1
    except ValueError:
        raise Refused(400, "bad Content-Length") from None
    if length > MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    stream = environ["wsgi.input"]
    body: bytes = stream.read(length) if length >= 0 else stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    return body


def _respond(
    start_response: Callable[..., Any],
    status: int,
    body: bytes,
    content_type: str = "application/x-bencode",
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start_response(
        f"{status} {_STATUS_TEXT.get(status, 'Error')}",
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])],
    )
    return [body]
