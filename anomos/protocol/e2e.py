"""End-to-end records between downloader and source, one per cell body.

Inside the per-hop layers, every cell body of an established circuit is one
AES-256-GCM record under a key only the two ends hold (see the cipher suites)::

    body = AESGCM(key, nonce = counter as 12 bytes big-endian,
                  plaintext = kind u8 | length u16 | data | zero padding) || tag (16)

The nonce is never sent: both sides count records per direction, so a cell
that is dropped, reordered, replayed or modified fails authentication. Each
direction has its own key, so a record cannot be reflected back to its sender.
The padding is inside the AEAD, and a body has one of two sizes: a *short*
body (:data:`SHORT_BODY`, a 2 KiB link frame) when the data fits in it
(:data:`MAX_SHORT_DATA` bytes: a batch of up to 118 BitTorrent requests, a
SENDME, an END, a keep-alive), else a full one (:data:`CELL_BODY`, 32 KiB).
So the wire shows which of the two classes a record is in, and nothing more
about the length of its data. Both ends seal the smallest size that fits and
open either; the size is under the AEAD like the rest (a cell padded or cut
on the way fails authentication, and the per-hop layers turn it and every
later cell to noise first: docs/threat-model.md, *Two cell sizes*).

The first cell each way (HELLO from the downloader, REPLY from the source)
exists before these keys do; :func:`encode_hello` / :func:`encode_reply` frame
them in fixed-size bodies protected only by the per-hop layers; whatever they
carry authenticates itself (a sealed box, and the suite's MAC over its transcript).
A HELLO may also carry *early data* (at most :data:`MAX_EARLY_DATA` bytes) for
the source's application, read before any record: the downloader's first
BitTorrent ask, so the source can send its first blocks right behind the REPLY
instead of one circuit round trip later. Only the source removes the last layer,
and a changed cell arrives as noise, so no relay can read or plant it; the
tracker, which chose every layer key, could read it (it learns which pieces a
downloader it already sent to that source asks for first).
A source that refuses a HELLO answers :func:`encode_refusal` instead, with its
reason: under the per-hop layers no relay can read it or plant one of its own
(a changed cell arrives as noise, see :mod:`anomos.protocol.layers`).

Why a circuit ends travels the same way, end to end: an END record carries no
data for a clean close, or one reason byte when the sender gave up on the
circuit. BREAK, which relays see and pass on, carries nothing anyone chose.
"""

from __future__ import annotations

import struct

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anomos.errors import CryptoError, ProtocolError
from anomos.interfaces import SessionKeys

#: Bytes of a full cell body (a link frame of 8 + 32760 = 32 KiB): every first
#: cell (HELLO, REPLY, REFUSAL) and every record whose data does not fit a short one.
CELL_BODY = 32760
#: Bytes of a short cell body (a link frame of 8 + 2040 = 2 KiB), for records whose
#: data fits: what a downloader sends back (request batches, SENDMEs, hints).
SHORT_BODY = 2040
#: The two sizes a DATA cell body may have, short first.
BODY_SIZES = (SHORT_BODY, CELL_BODY)
TAG_SIZE = 16
NONCE_SIZE = 12
_HEADER = 3  # kind u8 | length u16
PLAINTEXT_SIZE = CELL_BODY - TAG_SIZE
#: Most data bytes one record can carry.
MAX_RECORD_DATA = PLAINTEXT_SIZE - _HEADER
#: Most data bytes a record in a short body can carry (2021).
MAX_SHORT_DATA = SHORT_BODY - TAG_SIZE - _HEADER

DATA = 1
SENDME = 2
END = 3
RECORD_KINDS = frozenset({DATA, SENDME, END})

HELLO_TYPE = 0x48  # "H"
REPLY_TYPE = 0x52  # "R"
REFUSAL_TYPE = 0x46  # "F"
_FIRST_CELL_NAMES = {HELLO_TYPE: "HELLO", REPLY_TYPE: "REPLY", REFUSAL_TYPE: "REFUSAL"}
HELLO_VERSION = 1
_U16 = struct.Struct(">H")
#: Most bytes of early data a HELLO may carry for the source's application.
MAX_EARLY_DATA = 1024
#: Largest suite hello / reply a first cell can frame.
MAX_HELLO_FIELD = CELL_BODY - 2 - 2 * _U16.size
_ZEROS = memoryview(bytes(CELL_BODY))


@attrs.define(eq=False)
class E2EChannel:
    """One end's view of the record stream: seals what it sends, opens what it gets.

    After a record fails authentication the channel refuses everything, since
    the counters can no longer be trusted to agree: the circuit must close.
    """

    keys: SessionKeys = attrs.field(repr=False)
    _send: AESGCM = attrs.field(init=False, repr=False)
    _recv: AESGCM = attrs.field(init=False, repr=False)
    _send_count: int = attrs.field(default=0, init=False)
    _recv_count: int = attrs.field(default=0, init=False)
    #: The record being sealed; made on the first send (an idle circuit holds none).
    _plain: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _dirty: int = attrs.field(default=0, init=False, repr=False)
    _failed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        if len(self.keys.send) != 32 or len(self.keys.recv) != 32:
            raise CryptoError("end-to-end keys must be 32 bytes each")
        if self.keys.send == self.keys.recv:
            raise CryptoError("end-to-end keys must differ per direction")
        self._send = AESGCM(self.keys.send)
        self._recv = AESGCM(self.keys.recv)

    @property
    def sent(self) -> int:
        """Records sealed so far."""
        return self._send_count

    @property
    def received(self) -> int:
        """Records opened so far."""
        return self._recv_count

    def seal(self, kind: int, data: bytes | bytearray | memoryview = b"") -> bytes:
        """One cell body carrying ``data``, of :func:`body_size` bytes."""
        nonce, plain = self._next_plain(kind, data)
        return self._send.encrypt(nonce, plain, None)

    def seal_mutable(self, kind: int, data: bytes | bytearray | memoryview = b"") -> bytearray:
        """Like :meth:`seal`, into a new bytearray the caller may overwrite (layers in place)."""
        nonce, plain = self._next_plain(kind, data)
        out = bytearray(len(plain) + TAG_SIZE)
        self._send.encrypt_into(nonce, plain, None, out)
        return out

    def seal_into(
        self, kind: int, data: bytes | bytearray | memoryview, out: bytearray | memoryview
    ) -> int:
        """Like :meth:`seal`, into the start of ``out`` (at least :func:`body_size`
        bytes, e.g. a reused buffer of :data:`CELL_BODY`); the body's size."""
        nonce, plain = self._next_plain(kind, data)
        size = len(plain) + TAG_SIZE
        self._send.encrypt_into(nonce, plain, None, memoryview(out)[:size])
        return size

    def _next_plain(
        self, kind: int, data: bytes | bytearray | memoryview
    ) -> tuple[bytes, memoryview]:
        """Fill the plaintext buffer with the record; the nonce to seal it with and the
        plaintext (short or full, zero padded)."""
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown record kind {kind}")
        n = len(data)
        if n > MAX_RECORD_DATA:
            raise ValueError(f"record data is {n} bytes, at most {MAX_RECORD_DATA} fit")
        if self._send_count >= 2**64:  # pragma: no cover - 2**64 cells is out of reach
            raise CryptoError("end-to-end send counter exhausted")
        plain = self._plain
        if not plain:
            plain = self._plain = bytearray(PLAINTEXT_SIZE)
        plain[0] = kind
        plain[1] = n >> 8
        plain[2] = n & 0xFF
        end = _HEADER + n
        plain[_HEADER:end] = data
        if self._dirty > end:
            # Only re-zero what an earlier, longer record left behind.
            plain[end : self._dirty] = _ZEROS[: self._dirty - end]
        self._dirty = end
        nonce = self._send_count.to_bytes(NONCE_SIZE, "big")
        self._send_count += 1
        return nonce, memoryview(plain)[: body_size(n) - TAG_SIZE]

    def open(self, body: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """``(kind, data)`` of the next record; ``CryptoError`` if it is not that record."""
        kind, view = self.open_view(body)
        return kind, bytes(view)

    def open_view(self, body: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
        """Like :meth:`open`, the data as a view of the decrypted record (no copy)."""
        if self._failed:
            raise CryptoError("end-to-end channel closed after an authentication failure")
        size = len(body)
        if size != CELL_BODY and size != SHORT_BODY:
            raise CryptoError(f"record is {size} bytes, expected {SHORT_BODY} or {CELL_BODY}")
        nonce = self._recv_count.to_bytes(NONCE_SIZE, "big")
        try:
            plain = self._recv.decrypt(nonce, body, None)
        except InvalidTag:
            self._failed = True
            raise CryptoError(
                "end-to-end record failed authentication: tampered, reordered or replayed"
            ) from None
        self._recv_count += 1
        kind = plain[0]
        n = (plain[1] << 8) | plain[2]
        if kind not in RECORD_KINDS or n > size - TAG_SIZE - _HEADER:
            self._failed = True
            raise CryptoError(f"end-to-end record has bad kind {kind} or length {n}")
        return kind, memoryview(plain)[_HEADER : _HEADER + n]


def body_size(nbytes: int) -> int:
    """The body a record of ``nbytes`` of data is sealed in: short when it fits."""
    return SHORT_BODY if nbytes <= MAX_SHORT_DATA else CELL_BODY


class SourceRefused(ProtocolError):
    """The source answered a refusal instead of a REPLY; ``reason`` is its BREAK reason code."""

    def __init__(self, reason: int) -> None:
        super().__init__(f"the source refused the circuit (reason {reason})")
        self.reason = reason


# ----------------------------------------------------------------------------- first cells


def _frame(kind: int, fields: tuple[bytes, ...]) -> bytes:
    parts = [bytes([kind, HELLO_VERSION])]
    for field in fields:
        if len(field) > MAX_HELLO_FIELD:
            raise ValueError(f"first-cell field of {len(field)} bytes does not fit a cell")
        parts += [_U16.pack(len(field)), bytes(field)]
    body = b"".join(parts)
    if len(body) > CELL_BODY:
        raise ValueError("first-cell fields do not fit one cell")
    return body + bytes(CELL_BODY - len(body))


def _unframe(
    body: bytes | bytearray | memoryview, kind: int, count: int, optional: int = 0
) -> list[bytes]:
    """The ``count`` fields of a first cell, and up to ``optional`` more if present
    (an absent optional field reads as empty: its place is zero padding)."""
    name = _FIRST_CELL_NAMES[kind]
    if len(body) != CELL_BODY:
        raise ProtocolError(f"{name} cell is {len(body)} bytes, expected {CELL_BODY}")
    body = bytes(body)
    if body[0] != kind:
        raise ProtocolError(f"expected a {name} cell, got type {body[0]:#04x}")
    if body[1] != HELLO_VERSION:
        raise ProtocolError(f"{name} cell has unknown version {body[1]}")
    pos = 2
    fields = []
    for i in range(count + optional):
        if i >= count and not any(body[pos:]):
            fields.append(b"")
            continue
        if pos + _U16.size > CELL_BODY:
            raise ProtocolError(f"{name} cell ends inside a length field")
        (n,) = _U16.unpack_from(body, pos)
        pos += _U16.size
        if pos + n > CELL_BODY:
            raise ProtocolError(f"{name} cell has a field longer than the cell")
        fields.append(body[pos : pos + n])
        pos += n
    if any(body[pos:]):
        raise ProtocolError(f"{name} cell has non-zero padding")
    return fields


def encode_hello(request_blob: bytes, suite_hello: bytes, early: bytes = b"") -> bytes:
    """The downloader's first cell body: the sealed request, the suite's hello and, if
    any, early data for the source's application (a third field, else padding)."""
    if len(early) > MAX_EARLY_DATA:
        raise ValueError(f"early data of {len(early)} bytes, at most {MAX_EARLY_DATA}")
    return _frame(
        HELLO_TYPE, (request_blob, suite_hello, early) if early else (request_blob, suite_hello)
    )


def decode_hello(body: bytes | bytearray | memoryview) -> tuple[bytes, bytes, bytes]:
    """``(request_blob, suite_hello, early_data)``; ``ProtocolError`` on a malformed cell
    or early data over :data:`MAX_EARLY_DATA` bytes."""
    blob, hello, early = _unframe(body, HELLO_TYPE, 2, optional=1)
    if len(early) > MAX_EARLY_DATA:
        raise ProtocolError(
            f"HELLO carries {len(early)} bytes of early data, at most {MAX_EARLY_DATA}"
        )
    return blob, hello, early


def encode_reply(reply: bytes) -> bytes:
    """The source's first cell body: the suite's reply."""
    return _frame(REPLY_TYPE, (reply,))


def decode_reply(body: bytes | bytearray | memoryview) -> bytes:
    """The suite's reply; :class:`SourceRefused` for a refusal, ``ProtocolError`` if malformed."""
    if len(body) == CELL_BODY and body[0] == REFUSAL_TYPE:
        (reason,) = _unframe(body, REFUSAL_TYPE, 1)
        if len(reason) != 1:
            raise ProtocolError(f"REFUSAL cell has a reason of {len(reason)} bytes")
        raise SourceRefused(reason[0])
    (reply,) = _unframe(body, REPLY_TYPE, 1)
    return reply


def encode_refusal(reason: int) -> bytes:
    """The source's first cell body when it refuses a HELLO: its reason code (u8)."""
    return _frame(REFUSAL_TYPE, (bytes((reason & 0xFF,)),))
