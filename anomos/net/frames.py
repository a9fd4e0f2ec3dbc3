"""Link frames: a pure codec plus a bounded reader, no policy and no crypto.

Every frame is ``circ_id u32 | cmd u8 | reserved u8 | length u16 | payload``
(network byte order). ``circ_id`` 0 belongs to the link itself (handshake and
keepalive); every other id names one circuit on that link. Sizes are checked
against the command *before* the payload is read, so a hostile neighbour can
never make us buffer more than one legal frame.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import Any

from anomos.errors import ProtocolError
from anomos.protocol.e2e import BODY_SIZES, CELL_BODY, SHORT_BODY
from anomos.protocol.onion import TRACKING_CODE_SIZE
from anomos.protocol.ticket import MAX_TICKET_SIZE

HEADER = struct.Struct("!IBBH")
HEADER_SIZE = HEADER.size
#: The circuit id of link-level frames (handshake, padding).
LINK_CIRC_ID = 0
#: The largest payload the 16-bit length field can describe.
MAX_PAYLOAD = 0xFFFF

#: Size of the listener's random challenge.
CHALLENGE_SIZE = 32
#: AUTH = claimed NID (u32) | identity public key (32) | Ed25519 signature (64),
#: then the tracker's edge ticket for this edge, if the dialler holds one
#: (anomos.protocol.ticket).
AUTH_SIZE = 4 + 32 + 64
#: Domain separation for the dialler's link signature.
AUTH_CONTEXT = b"anomos-link-v1"
#: Keepalive frames carry at most this much filler.
MAX_PADDING = 512
#: Default size of a :class:`FrameReader` buffer: several full DATA frames.
READ_BUFFER = 256 * 1024


class Cmd(enum.IntEnum):
    """Frame commands. 1-15 act on a circuit, 16 and up on the link (circ_id 0)."""

    CREATE = 1
    CREATED = 2
    DATA = 3
    BREAK = 4
    PADDING = 16
    AUTH_CHALLENGE = 17
    AUTH = 18
    AUTH_OK = 19


CIRCUIT_COMMANDS = frozenset({Cmd.CREATE, Cmd.CREATED, Cmd.DATA, Cmd.BREAK})
LINK_COMMANDS = frozenset({Cmd.PADDING, Cmd.AUTH_CHALLENGE, Cmd.AUTH, Cmd.AUTH_OK})

#: Allowed payload sizes per command, as (minimum, maximum).
PAYLOAD_SIZES: dict[int, tuple[int, int]] = {
    Cmd.CREATE: (TRACKING_CODE_SIZE, TRACKING_CODE_SIZE),
    Cmd.CREATED: (0, 0),
    Cmd.DATA: (SHORT_BODY, CELL_BODY),  # exactly one of the two: see DATA_SIZES
    Cmd.BREAK: (1, 1),
    Cmd.PADDING: (0, MAX_PADDING),
    Cmd.AUTH_CHALLENGE: (CHALLENGE_SIZE, CHALLENGE_SIZE),
    Cmd.AUTH: (AUTH_SIZE, AUTH_SIZE + MAX_TICKET_SIZE),
    Cmd.AUTH_OK: (0, 0),
}
_DATA = int(Cmd.DATA)
#: The payload sizes a DATA frame may have: a short or a full cell body, nothing between.
DATA_SIZES = frozenset(BODY_SIZES)
#: A complete DATA frame, the biggest frame there is.
DATA_FRAME_SIZE = HEADER_SIZE + CELL_BODY


class BreakReason(enum.IntEnum):
    """Why a circuit was torn down: in the BREAK of a hop refusing a CREATE, in an END
    record or a REFUSAL cell (end to end); every other BREAK carries CLOSED."""

    CLOSED = 0
    PROTOCOL = 1
    CRYPTO = 2
    UNKNOWN_NEIGHBOUR = 3
    REFUSED = 4
    OVERFLOW = 5
    LINK_LOST = 6
    TIMEOUT = 7
    TOO_MANY = 8
    INTERNAL = 9
    RATE_LIMITED = 10


_BREAK_TEXT = {
    BreakReason.CLOSED: "closed",
    BreakReason.PROTOCOL: "protocol violation",
    BreakReason.CRYPTO: "tracking code refused (tampered, replayed or expired)",
    BreakReason.UNKNOWN_NEIGHBOUR: "next hop is not a neighbour",
    BreakReason.REFUSED: "source refused the request",
    BreakReason.OVERFLOW: "queue overflow",
    BreakReason.LINK_LOST: "link lost",
    BreakReason.TIMEOUT: "timeout",
    BreakReason.TOO_MANY: "too many circuits",
    BreakReason.INTERNAL: "internal error",
    BreakReason.RATE_LIMITED: "rate limited",
}


def encode_break(reason: int) -> bytes:
    return bytes((reason & 0xFF,))


#: The payload of every BREAK a hop sends on a circuit it has joined, relays and ends
#: alike: one fixed value, so no hop can pass chosen bits across the next one. Only a
#: hop refusing a CREATE names its reason, to the neighbour that sent it; reasons the
#: two ends need travel end to end (an END record, or the source's refusal cell).
JOINED_BREAK = encode_break(BreakReason.CLOSED)


def describe_break(reason: int) -> str:
    """One line for a BREAK reason code (unknown codes are named, not refused)."""
    try:
        return _BREAK_TEXT[BreakReason(reason)]
    except ValueError:
        return f"unknown reason {reason}"


def cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"


def check_header(circ_id: int, cmd: int, length: int) -> None:
    """Refuse a frame whose command, size or circuit id is not allowed."""
    sizes = PAYLOAD_SIZES.get(cmd)
    if sizes is None:
        raise ProtocolError(f"unknown frame command {cmd}")
    low, high = sizes
    if cmd == _DATA:
        if length not in DATA_SIZES:
            raise ProtocolError(f"DATA frame of {length} bytes (allowed {low} or {high})")
    elif not low <= length <= high:
        raise ProtocolError(f"{cmd_name(cmd)} frame of {length} bytes (allowed {low}-{high})")
    if (circ_id == LINK_CIRC_ID) != (cmd in LINK_COMMANDS):
        raise ProtocolError(f"{cmd_name(cmd)} frame on circuit id {circ_id}")


def encode_header(circ_id: int, cmd: int, length: int) -> bytes:
    return HEADER.pack(circ_id, cmd, 0, length)


def encode_frame(circ_id: int, cmd: int, payload: bytes = b"") -> bytes:
    """A whole frame, validated like an incoming one (for small frames and tests)."""
    check_header(circ_id, cmd, len(payload))
    return HEADER.pack(circ_id, cmd, 0, len(payload)) + payload


def decode_break(payload: Any) -> int:
    if len(payload) != 1:
        raise ProtocolError(f"BREAK payload must be 1 byte, not {len(payload)}")
    return int(payload[0])


def auth_message(challenge: bytes, server_identity: bytes, nid: int) -> bytes:
    """What the dialler signs: binds its claim to this listener and this challenge."""
    return AUTH_CONTEXT + bytes(challenge) + bytes(server_identity) + nid.to_bytes(4, "big")


def encode_auth(nid: int, identity: bytes, signature: bytes, ticket: bytes = b"") -> bytes:
    if len(identity) != 32 or len(signature) != 64 or not 0 <= nid <= 0xFFFFFFFF:
        raise ValueError("bad AUTH fields")
    if len(ticket) > MAX_TICKET_SIZE:
        raise ValueError("edge ticket too long for an AUTH")
    return nid.to_bytes(4, "big") + identity + signature + ticket


def decode_auth(payload: Any) -> tuple[int, bytes, bytes, bytes]:
    """(claimed NID, identity public key, signature, edge ticket or b"") of an AUTH payload."""
    data = bytes(payload)
    if not AUTH_SIZE <= len(data) <= AUTH_SIZE + MAX_TICKET_SIZE:
        raise ProtocolError(f"AUTH of {len(data)} bytes (expected {AUTH_SIZE} and a ticket)")
    return int.from_bytes(data[:4], "big"), data[4:36], data[36:AUTH_SIZE], data[AUTH_SIZE:]


class FrameReader:
    """Reads frames from a socket with ``recv_into`` into one preallocated buffer.

    Iterating yields ``(circ_id, cmd, payload)``; ``payload`` is a memoryview
    into the buffer, valid only until the next frame is requested, so the
    consumer must act on it (or copy it) before asking for more. A clean end
    of stream between frames ends the iteration; anything malformed raises
    :class:`ProtocolError`.
    """

    def __init__(self, sock: Any, *, buffer_size: int = READ_BUFFER) -> None:
        if buffer_size < 2 * DATA_FRAME_SIZE:
            raise ValueError("FrameReader buffer too small for two DATA frames")
        self._sock = sock
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        #: Bytes received so far, frames and partial frames alike.
        self.bytes_in = 0

    def __iter__(self) -> Iterator[tuple[int, int, memoryview]]:
        return self

    def __next__(self) -> tuple[int, int, memoryview]:
        buf = self._buf
        while True:
            start = self._start
            avail = self._end - start
            if avail >= HEADER_SIZE:
                circ_id, cmd, _reserved, length = HEADER.unpack_from(buf, start)
                if cmd != _DATA or length != CELL_BODY or not circ_id:  # a full DATA: fine
                    check_header(circ_id, cmd, length)
                total = HEADER_SIZE + length
                if avail >= total:
                    self._start = start + total
                    return circ_id, cmd, self._view[start + HEADER_SIZE : start + total]
            self._fill()

    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._end - self._start

    def _fill(self) -> None:
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = start = end = 0
        elif len(self._buf) - end < DATA_FRAME_SIZE:
            # Move the partial frame (at most one frame) to the front.
            self._view[: end - start] = self._view[start:end]
            self._start, self._end = 0, end - start
            start, end = self._start, self._end
        n = self._sock.recv_into(self._view[end:])
        if not n:
            if end != start:
                raise ProtocolError("connection closed in the middle of a frame")
            raise StopIteration
        self._end = end + n
        self.bytes_in += n
