"""Turning a request body into checked, typed values, or a one-line refusal.

Everything a peer sends is hostile until it passes here: the envelope's
signature (good for this tracker and this endpoint only), its time stamp, that
it was not seen before (:class:`anomos.tracker.limits.RecentRequests`), then
every field of the message, each with its type and bound. The handlers in
:mod:`anomos.tracker.server` see only :class:`AnnounceRequest` and
:class:`CircuitRequest`; whatever is refused raises :class:`Refused` with the
HTTP status the front end answers.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

import attrs
import nacl.bindings
import nacl.exceptions

from anomos import bencode
from anomos.config import split_address
from anomos.errors import AnomosError, ConfigError
from anomos.tracker.client import (
    EVENTS,
    MAX_AVOIDED,
    MAX_CIRCUITS,
    MAX_LOST_AGE_MS,
    MAX_NEIGHBOURS,
    SOURCE_TAG_SIZE,
    signed_message,
)
from anomos.tracker.http import MAX_BODY, Refused
from anomos.tracker.limits import RecentRequests, Seen

#: Seconds a signed request stays acceptable (clock skew plus transit).
MAX_CLOCK_SKEW = 300
#: Torrents one announce may list.
MAX_TORRENTS = 256
#: Lost neighbours one announce may report.
MAX_LOST = 64
#: Why a neighbour is reported: its link went down, it broke the protocol, or it was
#: never reachable (assigned, dialled, never linked; it may well be alive).
LOST_WHY = ("lost", "protocol", "unreachable")


#: A field name as bencoded dicts key it (cached: a lookup is cheaper than an encode).
_encoded = functools.cache(str.encode)


def _field(d: dict[bytes, Any], key: str) -> Any:
    try:
        return d[_encoded(key)]
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


def _address_field(d: dict[bytes, Any], known: str | None = None) -> str:
    """``HOST:PORT``; ``known`` is the address already accepted from this peer (an
    unchanged one is not parsed again)."""
    raw = _field(d, "address")
    if known is not None and type(raw) is bytes and raw == known.encode():
        return known
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


def _parse_lost(raw: Any) -> list[tuple[int, int, str]]:
    """The optional ``lost`` field: [(nid, milliseconds ago, why), ...]."""
    if not isinstance(raw, list) or len(raw) > MAX_LOST:
        raise Refused(400, f"field 'lost' must be a list of at most {MAX_LOST}")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise Refused(400, "each lost neighbour must be a dict")
        why = item.get(b"why", b"lost")
        if not isinstance(why, bytes) or why.decode("ascii", "replace") not in LOST_WHY:
            raise Refused(400, f"lost neighbour 'why' must be one of {', '.join(LOST_WHY)}")
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


def _parse_torrents(raw: Any) -> dict[bytes, tuple[int, int, int, str]]:
    """The ``torrents`` field: {infohash: (uploaded, downloaded, left, event)}."""
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


@attrs.frozen
class AnnounceRequest:
    """A checked announce (docs/tracker-api.md): who the peer is, where it listens,
    its counters, and the neighbours it lost."""

    #: Counters are cumulative per session; a new session starts them from zero.
    session: bytes
    onion: bytes
    box: bytes
    address: str
    relayed: int
    #: The peer leaves the network (its goodbye).
    stopped: bool
    #: infohash -> (uploaded, downloaded, left, event), this session's counters
    torrents: dict[bytes, tuple[int, int, int, str]]
    #: (nid, milliseconds ago, why) per lost neighbour
    lost: list[tuple[int, int, str]]
    #: nid -> bytes received from that neighbour this session
    receipts: dict[int, int]


def parse_announce(
    inner: dict[bytes, Any], known: tuple[bytes, bytes, str] | None
) -> AnnounceRequest:
    """Check an announce's fields, in this order (the first bad one is named);
    ``known``: the (onion, box, address) already accepted from this peer, if any
    (unchanged values are not checked again)."""
    session = _field(inner, "session")
    if not isinstance(session, bytes) or not 1 <= len(session) <= 32:
        raise Refused(400, "field 'session' must be 1-32 bytes")
    onion = _x25519_field(inner, "onion", known[0] if known else None)
    box = _x25519_field(inner, "box", known[1] if known else None)
    address = _address_field(inner, known[2] if known else None)
    relayed = _int_field(inner, "relayed")
    stopped = _int_field(inner, "stopped", 0, 1)
    torrents = _parse_torrents(_field(inner, "torrents"))
    lost = _parse_lost(inner.get(b"lost", []))
    receipts = _parse_receipts(inner.get(b"receipts", []))
    return AnnounceRequest(
        session, onion, box, address, relayed, bool(stopped), torrents, lost, receipts
    )


@attrs.frozen
class CircuitRequest:
    """A checked request for ``count`` circuits to sources of ``infohash``."""

    infohash: bytes
    count: int
    #: Source tags of earlier plans whose sources are not to be planned again.
    avoid: tuple[bytes, ...] = ()


def parse_circuits(inner: dict[bytes, Any]) -> CircuitRequest:
    infohash = _bytes_field(inner, "infohash", (20, 32))
    count = _int_field(inner, "count", 1, MAX_CIRCUITS)
    avoid = inner.get(b"avoid", [])
    if (
        not isinstance(avoid, list)
        or len(avoid) > MAX_AVOIDED
        or any(not isinstance(tag, bytes) or len(tag) != SOURCE_TAG_SIZE for tag in avoid)
    ):
        raise Refused(
            400,
            f"field 'avoid' must list at most {MAX_AVOIDED} source tags of {SOURCE_TAG_SIZE} bytes",
        )
    return CircuitRequest(infohash, count, tuple(avoid))


@attrs.define(eq=False)
class Verifier:
    """Checks a request's envelope: signed by the peer it names, for this tracker and
    path, stamped within ``MAX_CLOCK_SKEW`` of our clock, and not seen before."""

    fingerprint: str
    recent: RecentRequests
    clock: Callable[[], float]
    #: path -> what a peer signs before the message (:func:`signed_message`), made once
    _prefixes: dict[str, bytes] = attrs.field(factory=dict, init=False)

    def _signed_prefix(self, path: str) -> bytes:
        prefix = self._prefixes.get(path)
        if prefix is None:
            prefix = self._prefixes[path] = signed_message(self.fingerprint, path, b"")
        return prefix

    def verify(self, path: str, body: bytes) -> tuple[bytes, dict[bytes, Any]]:
        """The peer identity and the inner message of a request to ``path``."""
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
            # libsodium's check itself: a VerifyKey object (or cryptography's Ed25519, 1.6x
            # slower here) adds nothing, and a cached key would not save the point's
            # decompression, which libsodium does per check (docs/performance.md).
            nacl.bindings.crypto_sign_open(sig + self._signed_prefix(path) + msg, peer)
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
