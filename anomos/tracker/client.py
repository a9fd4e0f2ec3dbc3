"""A peer's side of the tracker API (docs/tracker-api.md): announce, request circuits.

Every request is signed with the peer's Ed25519 identity and sent over TLS 1.3
to a tracker pinned by the SHA-256 of its public key; the pin is checked right
after the handshake, before a byte of the request leaves. Whatever the tracker
answers is treated as hostile: bounded size, strict types, one-line
:class:`TrackerError` for every failure.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import gevent

from anomos import bencode
from anomos.config import join_address, split_address
from anomos.errors import AnomosError, ConfigError, TrackerError
from anomos.identity import PeerIdentity
from anomos.protocol.onion import LAYER_KEYS_SIZE, MAX_HOPS, TRACKING_CODE_SIZE, LayerKeys
from anomos.protocol.request import REQUEST_BLOB_SIZE
from anomos.protocol.ticket import MAX_TICKET_SIZE
from anomos.tracker.identity import (
    TrackerTrustError,
    check_pin,
    normalise_fingerprint,
    pinned_context,
)

#: Prefix of every signed message (followed by the tracker's fingerprint, the request
#: path and the inner message).
SIGNATURE_CONTEXT = b"anomos-tracker-v2"
#: Random bytes in every request, so that two alike in the same second differ (the
#: tracker refuses a request it has seen: a replay).
NONCE_SIZE = 8
#: Largest reply accepted from the tracker.
MAX_REPLY = 1024 * 1024
#: Seconds a whole request may take unless the caller says otherwise.
REQUEST_TIMEOUT = 30.0
#: Seconds an idle connection to the tracker is kept for the next request (the
#: circuits right after the join, a replan), which then skips TCP and TLS; closed
#: then, well before the tracker's idle limit (anomos.tracker.settings.KEEPALIVE_IDLE,
#: 15 s), so that peers sharing an address hold few of its connections.
KEEPALIVE_REUSE = 5.0
#: Most circuits one request may ask for (the server enforces the same bound).
MAX_CIRCUITS = 8
#: Sources a circuit request may ask the tracker to leave out (by their plans' tags).
MAX_AVOIDED = 16
#: Bytes of a plan's source tag (anomos.tracker.planner.SourceTags).
SOURCE_TAG_SIZE = 44
#: Most neighbours a reply may list (and receipts an announce may carry: one per neighbour).
MAX_NEIGHBOURS = 64
#: Milliseconds a lost-neighbour report may look back; the tracker refuses older ones.
MAX_LOST_AGE_MS = 3_600_000
#: Events a torrent entry may carry, as in BitTorrent.
EVENTS = ("", "started", "completed", "stopped")


#: Longest Retry-After honoured (a tracker asking for more is asked again after this).
MAX_RETRY_AFTER = 600.0


#: The values of an announce reply's ``reachable`` (tracker/reachability.py's Reach).
REACH_STATES = ("unchecked", "checking", "reachable", "unreachable")


class TrackerRefused(TrackerError):
    """The tracker answered, with a refusal (its failure reason is the message)."""


class TrackerBusy(TrackerRefused):
    """The tracker is rate-limiting this peer (HTTP 429): ask again after ``retry_after``."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotAnnounced(TrackerRefused):
    """The tracker does not know this peer (it expired, was dropped or the tracker
    lost it): announce, then ask again."""


@attrs.frozen
class Neighbour:
    """A peer to keep a link with; ``dial`` says whether this side opens it."""

    nid: int
    address: str
    identity: bytes = attrs.field(repr=lambda b: b.hex()[:16])
    dial: bool
    #: The tracker's edge ticket for this edge (anomos.protocol.ticket), sent in our
    #: AUTH when we dial a neighbour that has not been told of the edge yet.
    ticket: bytes = attrs.field(default=b"", repr=False, eq=False)


@attrs.frozen
class AnnounceReply:
    """What the tracker answers to an announce."""

    neighbours: tuple[Neighbour, ...]
    epoch: int
    interval: int
    ratio: float
    uploaded: int
    downloaded: int
    #: Relayed bytes credited: what we claimed, as far as our neighbours confirm it.
    relayed: int
    min_interval: int = 0
    #: Relayed bytes we claimed in all (credited or not).
    relayed_claimed: int = 0
    #: Uploaded bytes we claimed in all; ``uploaded`` is what our neighbours confirm of it.
    uploaded_claimed: int = 0
    #: Whether the tracker could dial us back (``anomos.tracker.reachability.Reach``):
    #: "reachable", "unreachable", "checking", or "unchecked" (it does not probe).
    reachable: str = "unchecked"


@attrs.frozen
class CircuitPlan:
    """One circuit to a source the downloader never learns.

    Send ``tracking_code`` in CREATE on the link of ``first_nid``; apply
    ``layers`` (path order) to cells; put ``request_blob`` in the HELLO; agree
    end-to-end keys with the cipher suite ``suite`` using ``material``.
    """

    first_nid: int
    tracking_code: bytes = attrs.field(repr=False)
    layers: tuple[LayerKeys, ...] = attrs.field(repr=False)
    request_blob: bytes = attrs.field(repr=False)
    suite: str
    material: bytes = attrs.field(repr=False)
    #: The source's name sealed for the tracker alone (b"": a tracker without tags),
    #: different in every plan: handed back in ``avoid`` so that a source caught
    #: lying is not planned again, without the downloader learning who it is.
    source_tag: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class LostNeighbour:
    """A neighbour whose link dropped: reported so the tracker stops routing over it."""

    nid: int
    #: Milliseconds since the link dropped (the tracker ignores a report older
    #: than the neighbour's own last announce: it came back since).
    ago_ms: int
    #: ``"lost"`` (the link went down), ``"protocol"`` (we cut it: it broke the protocol)
    #: or ``"unreachable"`` (we dial it and never got a link up: the tracker replaces the edge).
    why: str = "lost"


@attrs.frozen
class TorrentStatus:
    """A torrent's counters for this session, as reported in an announce."""

    infohash: bytes
    uploaded: int
    downloaded: int
    left: int
    event: str = ""


def signed_message(fingerprint: str, path: str, msg: bytes) -> bytes:
    """What a peer signs: the request is good for one tracker and one endpoint only."""
    return SIGNATURE_CONTEXT + bytes.fromhex(fingerprint) + path.encode() + msg


def signed_body(
    identity: PeerIdentity, path: str, inner: dict[str, Any], fingerprint: str
) -> bytes:
    """The request body: the bencoded inner message signed for ``path`` of the tracker
    whose fingerprint is ``fingerprint``."""
    msg = bencode.encode(inner)
    sig = identity.signing.sign(signed_message(fingerprint, path, msg)).signature
    return bencode.encode({"peer": identity.identity_public, "msg": msg, "sig": sig})


def plan_to_wire(plan: CircuitPlan) -> dict[bytes, Any]:
    """The plan as the tracker sends it (byte-string keys: bencoded in one pass)."""
    return {
        b"first_nid": plan.first_nid,
        b"tracking_code": plan.tracking_code,
        b"layers": [layer.to_bytes() for layer in plan.layers],
        b"request": plan.request_blob,
        b"suite": plan.suite.encode(),
        b"material": plan.material,
        b"source_tag": plan.source_tag,
    }


#: Opens a stream to ``HOST:PORT`` within ``timeout`` seconds (a transport's ``dial``).
Dialer = Callable[[str, float], socket.socket]


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTPS bound to a source address, refusing a tracker whose key is not the pinned one.

    With a ``dialer`` (the peer's transport), the TCP stream is opened by it, so a
    peer configured for Tor reaches the tracker only through Tor.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        fingerprint: str,
        source_host: str | None,
        timeout: float,
        dialer: Dialer | None = None,
    ) -> None:
        self._tls = pinned_context()
        super().__init__(
            host,
            port,
            timeout=timeout,
            context=self._tls,
            source_address=(source_host, 0) if source_host else None,
        )
        self._fingerprint = fingerprint
        self._dialer = dialer

    def connect(self) -> None:
        if self._dialer is None:
            if self.host.lower().endswith(".onion"):
                raise TrackerTrustError(
                    f"tracker {self.host} is an onion service: use --transport tor to reach it"
                )
            super().connect()
        else:
            raw = self._dialer(join_address(self.host, self.port), self.timeout or REQUEST_TIMEOUT)
            raw.settimeout(self.timeout)
            _no_delay(raw)
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        _no_delay(self.sock)
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            check_pin(self.sock, self._fingerprint)
        except TrackerError:
            self.close()
            raise


def _no_delay(sock: object) -> None:
    """Requests go out at once, not after the previous reply's delayed ACK."""
    with contextlib.suppress(OSError, AttributeError):  # not every transport is TCP
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


#: What a kept-alive connection the tracker closed meanwhile fails with, before any reply.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)


class TrackerClient:
    """Talks to one tracker on behalf of one peer identity, over one kept-alive
    connection while requests follow each other closely (:data:`KEEPALIVE_REUSE`)."""

    def __init__(
        self,
        url: str,
        fingerprint: str,
        identity: PeerIdentity,
        *,
        source_host: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
        dialer: Dialer | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname or not parsed.path.endswith("/announce"):
            raise ConfigError(f"tracker URL {url!r} is not https://HOST:PORT/.../announce")
        self.url = url
        self.host = parsed.hostname
        try:
            self.port = parsed.port or 443
        except ValueError:
            raise ConfigError(f"tracker URL {url!r} has a bad port") from None
        self.announce_path = parsed.path
        self.circuits_path = parsed.path[: -len("announce")] + "circuits"
        self.fingerprint = normalise_fingerprint(fingerprint)
        self.identity = identity
        self.source_host = source_host if source_host not in ("", "0.0.0.0", "::") else None
        self.timeout = timeout
        self.dialer = dialer
        #: Counters are cumulative per session; a new session tells the tracker to rebase.
        self.session = secrets.token_bytes(8)
        #: The connection the last request left open, and when (monotonic) it went idle.
        self._idle: _PinnedConnection | None = None
        self._idle_since = 0.0
        #: Connections opened (TCP and TLS paid), for tests and benchmarks.
        self.connections_opened = 0
        #: Opens a connection ahead of the first request (:meth:`connect_ahead`).
        self._ahead: gevent.Greenlet | None = None

    def connect_ahead(self) -> None:
        """Open the connection the next request will use in the background, so its
        TCP and TLS handshakes overlap what the caller does until then (a peer's
        start: its state, its torrents, its listener). Failures are left to that
        request, which tries again and says why."""
        if self._ahead is None and self._idle is None:
            self._ahead = gevent.spawn(self._open_ahead)
            gevent.sleep(0)  # its SYN leaves now; the kernel completes the TCP handshake

    def _open_ahead(self) -> None:
        conn, _ = self._connection()
        try:
            conn.connect()
        except BaseException as exc:
            conn.close()
            if not isinstance(exc, (AnomosError, OSError, http.client.HTTPException)):
                raise  # killed (GreenletExit)
        else:
            self._keep(conn)
        finally:
            self._ahead = None

    def close(self) -> None:
        """Close the kept-alive connection, if any."""
        if self._ahead is not None:
            self._ahead.kill(block=True, timeout=1)
        conn, self._idle = self._idle, None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ API
    def announce(
        self,
        address: str,
        torrents: Iterable[TorrentStatus],
        relayed: int,
        stopped: bool = False,
        lost: Iterable[LostNeighbour] = (),
        receipts: Mapping[int, int] | None = None,
    ) -> AnnounceReply:
        """Report this peer and its torrents (and the neighbours it lost); learn its
        neighbours, the epoch and its ratio.

        ``receipts``: NID -> link bytes received from that neighbour this session
        (cumulative across reconnections): the tracker credits the neighbour's
        relaying with them.
        """
        split_address(address)
        receipts = receipts or {}
        if len(receipts) > MAX_NEIGHBOURS:
            raise ConfigError(
                f"{len(receipts)} receipts: an announce carries at most {MAX_NEIGHBOURS}"
            )
        inner: dict[str, Any] = {
            "time": int(time.time()),
            "session": self.session,
            "onion": self.identity.onion_public,
            "box": self.identity.box_public,
            "address": address,
            "torrents": [
                {
                    "infohash": t.infohash,
                    "uploaded": t.uploaded,
                    "downloaded": t.downloaded,
                    "left": t.left,
                    "event": t.event,
                }
                for t in torrents
            ],
            "relayed": relayed,
            "stopped": int(stopped),
        }
        lost_list = [{"nid": x.nid, "ago": max(0, x.ago_ms), "why": x.why} for x in lost]
        if lost_list:
            inner["lost"] = lost_list
        if receipts:
            inner["receipts"] = [
                {"nid": nid, "received": max(0, received)}
                for nid, received in sorted(receipts.items())
            ]
        reply = self._post(self.announce_path, inner)
        try:
            return _parse_announce(reply)
        except (KeyError, TypeError, ValueError, AnomosError) as exc:
            raise TrackerError(f"tracker sent a malformed announce reply: {_why(exc)}") from None

    def request_circuits(
        self, infohash: bytes, count: int, avoid: Sequence[bytes] = ()
    ) -> list[CircuitPlan]:
        """Up to ``count`` circuits to sources of ``infohash`` (maybe fewer, maybe none),
        none to the sources of the plans whose ``source_tag`` is in ``avoid``."""
        if not 1 <= count <= MAX_CIRCUITS:
            raise ConfigError(f"circuit count {count} is outside 1-{MAX_CIRCUITS}")
        if len(avoid) > MAX_AVOIDED:
            raise ConfigError(f"{len(avoid)} sources to avoid (at most {MAX_AVOIDED})")
        inner: dict[str, Any] = {"time": int(time.time()), "infohash": infohash, "count": count}
        if avoid:
            inner["avoid"] = list(avoid)
        reply = self._post(self.circuits_path, inner)
        try:
            items = reply[b"circuits"]
            if not isinstance(items, list) or len(items) > count:
                raise ValueError("too many circuits")
            return [_parse_plan(item) for item in items]
        except (KeyError, TypeError, ValueError, AnomosError) as exc:
            raise TrackerError(f"tracker sent a malformed circuits reply: {_why(exc)}") from None

    # ------------------------------------------------------------------ transport
    def _connection(self) -> tuple[_PinnedConnection, bool]:
        """The idle connection if it is fresh enough (and True), else a new one."""
        ahead = self._ahead
        if ahead is not None and ahead is not gevent.getcurrent():
            ahead.join(self.timeout)  # the connection opened ahead is for us
        conn, self._idle = self._idle, None
        if conn is not None:
            if time.monotonic() - self._idle_since < KEEPALIVE_REUSE:
                return conn, True
            conn.close()
        self.connections_opened += 1
        conn = _PinnedConnection(
            self.host,
            self.port,
            fingerprint=self.fingerprint,
            source_host=self.source_host,
            timeout=self.timeout,
            dialer=self.dialer,
        )
        return conn, False

    def _keep(self, conn: _PinnedConnection) -> None:
        """``conn`` answered in full and stays open: keep it for the next request (one
        idle connection at most; requests made at once each open their own)."""
        if self._idle is not None:
            self._idle.close()
        self._idle, self._idle_since = conn, time.monotonic()
        gevent.spawn_later(KEEPALIVE_REUSE, self._expire, conn)

    def _expire(self, conn: _PinnedConnection) -> None:
        if self._idle is conn:
            self.close()

    def _post(self, path: str, inner: dict[str, Any]) -> dict[bytes, Any]:
        where = f"tracker {self.host}:{self.port}"
        while True:
            # Signed afresh for each attempt: a new nonce, never a replay.
            body = signed_body(
                self.identity,
                path,
                {**inner, "nonce": secrets.token_bytes(NONCE_SIZE)},
                self.fingerprint,
            )
            conn, reused = self._connection()
            try:
                with gevent.Timeout(self.timeout, TrackerError(f"{where} timed out")):
                    conn.request(
                        "POST", path, body=body, headers={"Content-Type": "application/x-bencode"}
                    )
                    resp = conn.getresponse()
                    data = resp.read(MAX_REPLY + 1)
            except BaseException as exc:
                conn.close()
                if reused and isinstance(exc, _STALE):
                    continue  # closed by the tracker while idle: it read none of this request
                error = _failure(exc, where)
                if error is exc:
                    raise
                raise error from None
            if resp.isclosed() and not resp.will_close:
                self._keep(conn)
            else:
                conn.close()
            break
        if len(data) > MAX_REPLY:
            raise TrackerError(f"{where} sent a reply over {MAX_REPLY} bytes")
        try:
            reply = bencode.decode(data, max_size=MAX_REPLY)
        except AnomosError:
            reply = None
        if not isinstance(reply, dict):
            if resp.status != 200:
                raise TrackerError(f"{where} answered HTTP {resp.status} {resp.reason}")
            raise TrackerError(f"{where} sent a reply that is not a bencoded dict")
        failure = reply.get(b"failure reason")
        if failure is not None or resp.status != 200:
            text = (
                failure.decode("utf-8", "replace")[:200]
                if isinstance(failure, bytes)
                else f"HTTP {resp.status}"
            )
            message = f"{where} refused {path.rsplit('/', 1)[-1]}: {_one_line(text)}"
            if resp.status == 429:
                raise TrackerBusy(message, _retry_after(resp.getheader("Retry-After")))
            cls = NotAnnounced if resp.status == 409 else TrackerRefused
            raise cls(message)
        return reply


# ---------------------------------------------------------------------------- reply parsing


def _int(value: Any, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"integer {value!r} out of range")
    return value


def _bytes(value: Any, size: int | None = None, max_size: int = 4096) -> bytes:
    if not isinstance(value, bytes) or len(value) > max_size:
        raise ValueError("expected a byte string")
    if size is not None and len(value) != size:
        raise ValueError(f"expected {size} bytes, got {len(value)}")
    return value


def _text(value: Any, max_size: int = 300) -> str:
    return _bytes(value, max_size=max_size).decode("utf-8")


def _parse_announce(reply: dict[bytes, Any]) -> AnnounceReply:
    raw = reply[b"neighbours"]
    if not isinstance(raw, list) or len(raw) > MAX_NEIGHBOURS:
        raise ValueError("neighbours is not a short list")
    neighbours = []
    for item in raw:
        address = _text(item[b"address"])
        split_address(address)
        neighbours.append(
            Neighbour(
                nid=_int(item[b"nid"], 1, 2**32 - 1),
                address=address,
                identity=_bytes(item[b"identity"], 32),
                dial=bool(_int(item[b"dial"], 0, 1)),
                ticket=_bytes(item.get(b"ticket", b""), max_size=MAX_TICKET_SIZE),
            )
        )
    return AnnounceReply(
        neighbours=tuple(neighbours),
        epoch=_int(reply[b"epoch"], 0, 2**32 - 1),
        interval=_int(reply[b"interval"], 1, 86400),
        ratio=float(_text(reply[b"ratio"], 32)),
        uploaded=_int(reply[b"uploaded"]),
        downloaded=_int(reply[b"downloaded"]),
        relayed=_int(reply[b"relayed"]),
        min_interval=_int(reply.get(b"min_interval", 0), 0, 86400),
        relayed_claimed=_int(reply.get(b"relayed_claimed", reply[b"relayed"])),
        uploaded_claimed=_int(reply.get(b"uploaded_claimed", reply[b"uploaded"])),
        reachable=_reach(reply.get(b"reachable", b"unchecked")),
    )


def _reach(value: Any) -> str:
    text = _text(value, 16)
    if text not in REACH_STATES:
        raise ValueError(f"reachable is {text!r}")
    return text


def _parse_plan(item: Any) -> CircuitPlan:
    layers = item[b"layers"]
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_HOPS:
        raise ValueError(f"layers is not a list of 1-{MAX_HOPS} entries")
    return CircuitPlan(
        first_nid=_int(item[b"first_nid"], 1, 2**32 - 1),
        tracking_code=_bytes(item[b"tracking_code"], TRACKING_CODE_SIZE),
        layers=tuple(LayerKeys.from_bytes(_bytes(x, LAYER_KEYS_SIZE)) for x in layers),
        request_blob=_bytes(item[b"request"], REQUEST_BLOB_SIZE),
        suite=_text(item[b"suite"], 32),
        material=_bytes(item[b"material"], max_size=256),
        source_tag=_bytes(item.get(b"source_tag", b""), max_size=SOURCE_TAG_SIZE),
    )


def _failure(exc: BaseException, where: str) -> BaseException:
    """The one-line :class:`TrackerError` for a failed exchange (anything else as is)."""
    if isinstance(exc, TimeoutError):
        return TrackerError(f"{where} timed out")
    if isinstance(exc, ssl.SSLError):
        return TrackerError(f"TLS with {where} failed: {exc.reason or exc}")
    if isinstance(exc, (OSError, http.client.HTTPException)):
        reason = getattr(exc, "strerror", None) or exc or type(exc).__name__
        return TrackerError(f"cannot reach {where}: {_one_line(str(reason))}")
    return exc


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (delay-seconds form), bounded; 1 s if absent or odd."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    if not math.isfinite(seconds):
        seconds = 1.0
    return min(MAX_RETRY_AFTER, max(1.0, seconds))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _why(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc.args[0]!r}"
    return _one_line(str(exc)) or type(exc).__name__
