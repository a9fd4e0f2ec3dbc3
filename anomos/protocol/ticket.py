"""Edge tickets: the tracker's signed word that a dialler is a listener's neighbour.

A peer learns its neighbours from its announce reply; each of them learns of
the new edge only at its own next announce. A listener dialled on an NID it
does not know yet used to ask the tracker first (three round trips, and an
announce the tracker may refuse as too soon after the last). Instead, for each
edge whose far end has not been told yet, the tracker signs a ticket into the
dialler's reply, and the dialler carries it in its AUTH frame. The listener
checks that a tracker it pins signed it (``cryptography``'s ECDSA, the key of
the sealed requests), that it names the caller (whose AUTH signature proved
the identity), the listener itself and the NID dialled, and that it has not
expired; then it accepts the link without asking (docs/protocol.md, links).

Layout (integers big-endian)::

    body   = version u8 | nid u32 | expires u64 | dialler identity (32)
             | listener identity (32) | len u8 | dialler address (ASCII)
    ticket = body | tracker key (P-256, compressed, 33) | signature (r | s, 64)
    signed = "anomos edge ticket v1" 0x00 | body
"""

from __future__ import annotations

import struct
import time
from collections.abc import Collection

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from anomos.errors import CryptoError
from anomos.protocol.request import (
    TRACKER_SIGNATURE_SIZE,
    check_tracker_signature,
    tracker_signature,
)

VERSION = 1
#: Seconds a ticket stays good: long enough for a dialler's first tries, short
#: enough that an edge the tracker has since taken away cannot be linked for long.
TICKET_TTL = 120
#: A dialler stops offering a ticket this many seconds before it expires (its
#: clock and the listener's may differ a little); the listener then asks the tracker.
TICKET_MARGIN = 10
#: The longest contact address a ticket names.
MAX_ADDRESS = 255
_HEAD = struct.Struct(">BIQ32s32sB")
#: The largest ticket there is.
MAX_TICKET_SIZE = _HEAD.size + MAX_ADDRESS + TRACKER_SIGNATURE_SIZE
_DOMAIN = b"anomos edge ticket v1\x00"


@attrs.frozen
class EdgeTicket:
    """Edge ``nid`` between ``dialer`` and ``listener`` (identity keys), good until
    ``expires`` (Unix seconds); ``address`` is the dialler's contact address."""

    nid: int
    dialer: bytes = attrs.field(repr=lambda b: b.hex()[:16])
    listener: bytes = attrs.field(repr=lambda b: b.hex()[:16])
    address: str
    expires: int

    def encode(self) -> bytes:
        """The body the tracker signs."""
        address = self.address.encode("ascii")
        if len(address) > MAX_ADDRESS or len(self.dialer) != 32 or len(self.listener) != 32:
            raise ValueError("edge ticket field out of range")
        head = _HEAD.pack(VERSION, self.nid, self.expires, self.dialer, self.listener, len(address))
        return head + address

    @classmethod
    def decode(cls, body: bytes) -> EdgeTicket:
        """Strict inverse of :meth:`encode`; ``CryptoError`` naming what is wrong."""
        if len(body) < _HEAD.size:
            raise CryptoError(f"edge ticket of {len(body)} bytes is truncated")
        version, nid, expires, dialer, listener, n = _HEAD.unpack_from(body)
        if version != VERSION:
            raise CryptoError(f"edge ticket has unknown version {version}")
        if len(body) != _HEAD.size + n:
            raise CryptoError("edge ticket has a bad address length")
        try:
            address = body[_HEAD.size :].decode("ascii")
        except UnicodeDecodeError:
            raise CryptoError("edge ticket address is not ASCII") from None
        return cls(nid, dialer, listener, address, expires)


def issue_ticket(ticket: EdgeTicket, tracker_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The tracker's side: ``ticket`` signed with its long-term key."""
    body = ticket.encode()
    return body + tracker_signature(tracker_key, _DOMAIN + body)


def ticket_expires(blob: bytes) -> int | None:
    """When ``blob`` expires, read without checking anything (the dialler's side:
    whether it is still worth offering); None if it cannot be read."""
    try:
        return EdgeTicket.decode(bytes(blob[:-TRACKER_SIGNATURE_SIZE])).expires
    except (CryptoError, ValueError):
        return None


def offerable(blob: bytes, now: float | None = None) -> bool:
    """Whether a dialler should still offer ``blob`` (not within the margin of expiry)."""
    expires = ticket_expires(blob) if blob else None
    now = time.time() if now is None else now
    return expires is not None and now < expires - TICKET_MARGIN


def open_ticket(
    blob: bytes,
    trackers: Collection[str],
    *,
    dialer: bytes,
    listener: bytes,
    nid: int,
    now: float | None = None,
) -> EdgeTicket:
    """The listener's side: the ticket, if one of ``trackers`` signed it for exactly
    this edge (``nid``, the authenticated ``dialer``, this ``listener``) and it has
    not expired; else ``CryptoError`` naming why."""
    blob = bytes(blob)
    if not TRACKER_SIGNATURE_SIZE < len(blob) <= MAX_TICKET_SIZE:
        raise CryptoError(f"edge ticket of {len(blob)} bytes")
    body = blob[:-TRACKER_SIGNATURE_SIZE]
    ticket = EdgeTicket.decode(body)
    check_tracker_signature(blob[-TRACKER_SIGNATURE_SIZE:], _DOMAIN + body, trackers, "edge ticket")
    if ticket.listener != bytes(listener):
        raise CryptoError("edge ticket was issued for another listener")
    if ticket.dialer != bytes(dialer):
        raise CryptoError("edge ticket was issued to another peer")
    if ticket.nid != nid:
        raise CryptoError(f"edge ticket is for NID {ticket.nid}, not {nid}")
    now = time.time() if now is None else now
    if ticket.expires < now:
        raise CryptoError(f"edge ticket expired {int(now - ticket.expires)} s ago")
    if ticket.expires > now + 2 * TICKET_TTL:
        raise CryptoError("edge ticket claims to stay good for too long")
    return ticket
