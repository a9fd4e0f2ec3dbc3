"""The BitTorrent peer-wire protocol (BEP 3) as pure codecs: no sockets.

Everything a peer sends is hostile: :class:`MessageReader` parses from a buffer
that never holds more than one maximal message plus the bytes just fed, checks
every field against the torrent (piece count, piece sizes, 16 KiB blocks) and
raises :class:`~anomos.errors.ProtocolError` with a one-line reason.

No extension bits are set in the handshake (no DHT, no fast extension, no
extension protocol): those would leak addresses or fingerprint the client.
Two messages of anomos' own (ids 24 and 25, unused by BEP 3, 6, 10 and 52)
carry faults between the two ends of a circuit: :class:`BadPiece` (downloader
to source: "your copy of this piece failed its hash check") and
:class:`DontHave` (source to downloader: "I no longer have this piece", as
BEP 54's ``lt_donthave``). Two more (ids 26 and 27, BEP 9's ``ut_metadata``
without the extension protocol) carry a torrent's metadata to a downloader that
started from a magnet: :class:`MetadataRequest` and :class:`MetadataPiece`.

A downloader's :class:`FirstAsk` is no message: it rides in the circuit's HELLO
(early data) so that the source sends the first blocks with its first answer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import ClassVar

import attrs

from anomos.errors import ProtocolError

PSTR = b"BitTorrent protocol"
HANDSHAKE_LEN = 1 + len(PSTR) + 8 + 20 + 20  # 68
#: Size of a request: every block is this long except the last of a piece.
BLOCK_SIZE = 16 * 1024
#: Largest piece message: length prefix excluded, id + index + begin + block.
MAX_PIECE_MESSAGE = 9 + BLOCK_SIZE

CHOKE, UNCHOKE, INTERESTED, NOT_INTERESTED, HAVE, BITFIELD, REQUEST, PIECE, CANCEL = range(9)
#: anomos' own: a source withdraws a piece; a downloader reports a piece that failed.
DONT_HAVE, BAD_PIECE = 24, 25
#: anomos' own: a magnet's downloader asks a source for the ``info`` dict, in pieces.
METADATA_REQUEST, METADATA_PIECE = 26, 27
#: Bytes of metadata per piece (BEP 9's 16 KiB), except the last.
METADATA_PIECE_SIZE = 16 * 1024
#: Metadata pieces any torrent may have (8 MiB, the metainfo limit, in 16 KiB pieces).
MAX_METADATA_PIECES = 512
#: Messages whose meaning depends on the torrent's piece count.
PIECE_MESSAGES = frozenset({HAVE, BITFIELD, REQUEST, PIECE, CANCEL, DONT_HAVE, BAD_PIECE})

_U32 = struct.Struct(">I")
_HAVE = struct.Struct(">IBI")
_REQ = struct.Struct(">IBIII")
_PIECE_HDR = struct.Struct(">IBII")
_IDX_BEGIN = struct.Struct(">II")
_TRIPLE = struct.Struct(">III")
_META_HDR = struct.Struct(">IBII")


def new_peer_id() -> bytes:
    """A fresh random peer id for one connection.

    It carries no client prefix and is never reused, so over anomos circuits
    the two ends cannot recognise each other across connections.
    """
    return os.urandom(20)


# --------------------------------------------------------------------------- bitfields
_TO_ASCII = bytes.maketrans(b"\0\1", b"01")
_FROM_ASCII = bytes.maketrans(b"01", b"\0\1")


def pack_bitfield(flags: bytes | bytearray) -> bytes:
    """One flag byte per piece (0/1) -> BEP 3 bitfield (high bit of byte 0 is piece 0)."""
    n = len(flags)
    if not n:
        return b""
    nbytes = (n + 7) // 8
    ascii_bits = bytes(flags).translate(_TO_ASCII) + b"0" * (8 * nbytes - n)
    return int(ascii_bits, 2).to_bytes(nbytes, "big")


def unpack_bitfield(data: bytes, num_pieces: int) -> bytearray:
    """BEP 3 bitfield -> one 0/1 flag byte per piece; spare bits must be zero."""
    nbytes = (num_pieces + 7) // 8
    if len(data) != nbytes:
        raise ProtocolError(
            f"bitfield of {len(data)} bytes for {num_pieces} pieces (expected {nbytes})"
        )
    if not nbytes:
        return bytearray()
    ascii_bits = format(int.from_bytes(data, "big"), f"0{8 * nbytes}b").encode()
    flags = bytearray(ascii_bits.translate(_FROM_ASCII))
    if any(flags[num_pieces:]):
        raise ProtocolError("bitfield has spare bits set past the last piece")
    del flags[num_pieces:]
    return flags


# --------------------------------------------------------------------------- messages
@attrs.frozen
class Handshake:
    """The 68-byte greeting: pstr, 8 reserved bytes (all zero), infohash, peer id."""

    infohash: bytes = attrs.field(validator=attrs.validators.max_len(20))
    peer_id: bytes = attrs.field(validator=attrs.validators.max_len(20))
    reserved: bytes = bytes(8)

    def encode(self) -> bytes:
        if len(self.infohash) != 20 or len(self.peer_id) != 20 or len(self.reserved) != 8:
            raise ValueError("handshake fields have the wrong sizes")
        return bytes([len(PSTR)]) + PSTR + self.reserved + self.infohash + self.peer_id

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Handshake:
        data = bytes(data)
        if len(data) != HANDSHAKE_LEN:
            raise ProtocolError(f"handshake of {len(data)} bytes (expected {HANDSHAKE_LEN})")
        if data[0] != len(PSTR) or data[1:20] != PSTR:
            raise ProtocolError("handshake is not the BitTorrent protocol")
        return cls(infohash=data[28:48], peer_id=data[48:68], reserved=data[20:28])


@attrs.frozen
class KeepAlive:
    def encode(self) -> bytes:
        return b"\0\0\0\0"


@attrs.frozen
class Choke:
    ID: ClassVar[int] = CHOKE

    def encode(self) -> bytes:
        return b"\0\0\0\1\0"


@attrs.frozen
class Unchoke:
    ID: ClassVar[int] = UNCHOKE

    def encode(self) -> bytes:
        return b"\0\0\0\1\1"


@attrs.frozen
class Interested:
    ID: ClassVar[int] = INTERESTED

    def encode(self) -> bytes:
        return b"\0\0\0\1\2"


@attrs.frozen
class NotInterested:
    ID: ClassVar[int] = NOT_INTERESTED

    def encode(self) -> bytes:
        return b"\0\0\0\1\3"


@attrs.frozen
class Have:
    index: int

    def encode(self) -> bytes:
        return _HAVE.pack(5, HAVE, self.index)


@attrs.frozen
class DontHave:
    """The sender no longer has piece ``index`` (its copy went bad): do not ask for it."""

    index: int

    def encode(self) -> bytes:
        return _HAVE.pack(5, DONT_HAVE, self.index)


@attrs.frozen
class BadPiece:
    """Piece ``index`` as the receiver sent it failed the sender's hash check."""

    index: int

    def encode(self) -> bytes:
        return _HAVE.pack(5, BAD_PIECE, self.index)


@attrs.frozen
class MetadataRequest:
    """Send me piece ``piece`` of the torrent's metadata (the bencoded ``info`` dict)."""

    piece: int

    def encode(self) -> bytes:
        return _HAVE.pack(5, METADATA_REQUEST, self.piece)


@attrs.frozen
class MetadataPiece:
    """Piece ``piece`` of the metadata, whose whole is ``total`` bytes."""

    piece: int
    total: int
    data: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")

    def encode(self) -> bytes:
        header = _META_HDR.pack(9 + len(self.data), METADATA_PIECE, self.piece, self.total)
        return header + self.data


@attrs.frozen
class Bitfield:
    """The packed BEP 3 bitfield; :func:`unpack_bitfield` turns it into flags."""

    bits: bytes

    def encode(self) -> bytes:
        return _U32.pack(1 + len(self.bits)) + bytes([BITFIELD]) + self.bits


@attrs.frozen
class Request:
    index: int
    begin: int
    length: int

    def encode(self) -> bytes:
        return _REQ.pack(13, REQUEST, self.index, self.begin, self.length)


@attrs.frozen
class Piece:
    index: int
    begin: int
    #: A read-only view when parsed (of the immutable bytes read), bytes when built.
    block: bytes | memoryview = attrs.field(repr=lambda b: f"<{len(b)} bytes>")

    def header(self) -> bytes:
        """The 13 bytes before the block, so senders can avoid one copy."""
        return _PIECE_HDR.pack(9 + len(self.block), PIECE, self.index, self.begin)

    def encode(self) -> bytes:
        return self.header() + self.block


@attrs.frozen
class Cancel:
    index: int
    begin: int
    length: int

    def encode(self) -> bytes:
        return _REQ.pack(13, CANCEL, self.index, self.begin, self.length)


Message = (
    KeepAlive
    | Choke
    | Unchoke
    | Interested
    | NotInterested
    | Have
    | Bitfield
    | Request
    | Piece
    | Cancel
    | DontHave
    | BadPiece
    | MetadataRequest
    | MetadataPiece
)

KEEP_ALIVE = KeepAlive()
CHOKE_MSG = Choke()
UNCHOKE_MSG = Unchoke()
INTERESTED_MSG = Interested()
NOT_INTERESTED_MSG = NotInterested()
_NO_PAYLOAD: dict[int, Message] = {
    CHOKE: CHOKE_MSG,
    UNCHOKE: UNCHOKE_MSG,
    INTERESTED: INTERESTED_MSG,
    NOT_INTERESTED: NOT_INTERESTED_MSG,
}
_NAMES = {
    CHOKE: "choke",
    UNCHOKE: "unchoke",
    INTERESTED: "interested",
    NOT_INTERESTED: "not interested",
    HAVE: "have",
    BITFIELD: "bitfield",
    REQUEST: "request",
    PIECE: "piece",
    CANCEL: "cancel",
    DONT_HAVE: "don't have",
    BAD_PIECE: "bad piece",
    METADATA_REQUEST: "metadata request",
    METADATA_PIECE: "metadata piece",
}


#: Messages whose payload is one piece index.
_INDEX_MESSAGES: dict[int, type[Have] | type[DontHave] | type[BadPiece]] = {
    HAVE: Have,
    DONT_HAVE: DontHave,
    BAD_PIECE: BadPiece,
}


def encode_piece_header(index: int, begin: int, length: int) -> bytes:
    """Header of a piece message carrying ``length`` bytes (the block follows)."""
    return _PIECE_HDR.pack(9 + length, PIECE, index, begin)


def encode_request(index: int, begin: int, length: int) -> bytes:
    return _REQ.pack(13, REQUEST, index, begin, length)


def encode_cancel(index: int, begin: int, length: int) -> bytes:
    return _REQ.pack(13, CANCEL, index, begin, length)


def encode_have(index: int) -> bytes:
    return _HAVE.pack(5, HAVE, index)


# --------------------------------------------------------------------------- first ask
#: Most blocks a first ask may ask for (2 MiB, within a circuit's first window).
MAX_FIRST_BLOCKS = 128
#: Most pieces a first ask may name.
MAX_FIRST_PIECES = 64
FIRST_ASK_VERSION = 1
_FIRST_HDR = struct.Struct(">BHB")


@attrs.frozen
class FirstAsk:
    """The downloader's first request, sent in the circuit's HELLO (see
    :mod:`anomos.protocol.e2e`): "at your first unchoke, send me ``blocks`` blocks of
    these pieces, in this order, skipping those you lack".

    Both ends derive the same blocks from it (:meth:`blocks_from`), the source from
    what it has, the downloader from the source's bitfield and haves received
    before that unchoke, so the downloader counts them as requested and never asks
    for them again, and the source's first blocks follow its REPLY at once instead
    of one circuit round trip later::

        version u8 (1) | blocks u16 | count u8 | count x piece index u32
    """

    blocks: int
    pieces: tuple[int, ...]

    def encode(self) -> bytes:
        return _FIRST_HDR.pack(FIRST_ASK_VERSION, self.blocks, len(self.pieces)) + b"".join(
            _U32.pack(i) for i in self.pieces
        )

    @classmethod
    def decode(cls, data: bytes, num_pieces: int) -> FirstAsk:
        """Check every field against the torrent; ``ProtocolError`` names what is wrong."""
        if len(data) < _FIRST_HDR.size:
            raise ProtocolError(f"first ask of {len(data)} bytes is too short")
        version, blocks, count = _FIRST_HDR.unpack_from(data)
        if version != FIRST_ASK_VERSION:
            raise ProtocolError(f"first ask has unknown version {version}")
        if not 1 <= blocks <= MAX_FIRST_BLOCKS:
            raise ProtocolError(f"first ask for {blocks} blocks, expected 1-{MAX_FIRST_BLOCKS}")
        if not 1 <= count <= MAX_FIRST_PIECES:
            raise ProtocolError(f"first ask names {count} pieces, expected 1-{MAX_FIRST_PIECES}")
        if len(data) != _FIRST_HDR.size + 4 * count:
            raise ProtocolError(f"first ask of {len(data)} bytes for {count} pieces")
        pieces = tuple(_U32.unpack_from(data, _FIRST_HDR.size + 4 * i)[0] for i in range(count))
        bad = next((i for i in pieces if i >= num_pieces), None)
        if bad is not None:
            raise ProtocolError(f"first ask names piece {bad} of {num_pieces}")
        if len(set(pieces)) != count:
            raise ProtocolError("first ask names a piece twice")
        return cls(blocks, pieces)

    def blocks_from(
        self, has: Callable[[int], bool], piece_size: Callable[[int], int]
    ) -> list[tuple[int, int, int]]:
        """``(index, begin, length)`` of the blocks asked for: the named pieces ``has``
        accepts, in order, block by block, until :attr:`blocks` are taken."""
        out: list[tuple[int, int, int]] = []
        for index in self.pieces:
            if not has(index):
                continue
            size = piece_size(index)
            for begin in range(0, size, BLOCK_SIZE):
                if len(out) == self.blocks:
                    return out
                out.append((index, begin, min(BLOCK_SIZE, size - begin)))
        return out


# --------------------------------------------------------------------------- reader
class MessageReader:
    """Incremental parser: ``feed(data)`` returns the complete messages so far.

    With ``handshake=True`` the first item returned is the peer's
    :class:`Handshake`. The unparsed remainder kept between calls is always
    shorter than one maximal message, so a peer cannot make us buffer more.
    """

    def __init__(
        self,
        num_pieces: int,
        piece_size: Callable[[int], int],
        *,
        handshake: bool = True,
    ) -> None:
        self.num_pieces = num_pieces
        self.piece_size = piece_size
        self._bitfield_len = (num_pieces + 7) // 8
        #: Largest acceptable length prefix.
        self.max_length = max(MAX_PIECE_MESSAGE, 1 + self._bitfield_len)
        self._want_handshake = handshake
        self._buf = b""

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message | Handshake]:
        """The messages completed by ``data``. A :class:`Piece`'s block is a view of
        ``data`` when that is ``bytes`` (immutable, so the view stays valid: no copy
        of every 16 KiB block), else of a copy."""
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[Message | Handshake] = []
        buf = self._buf
        if buf and not self._want_handshake and len(buf) >= 4:
            # Complete the message begun in the last read with the head of this one,
            # rather than copy all of ``data`` behind it (its length was checked).
            need = 4 + _U32.unpack_from(buf, 0)[0] - len(buf)
            if need <= len(data):
                self._parse_messages(buf + data[:need], 0, out)
                buf = self._buf = b""
                data = memoryview(data)[need:]
        if buf:
            data = buf + data
        end = len(data)
        pos = 0
        if self._want_handshake:
            if end < HANDSHAKE_LEN:
                if end and data[0] != len(PSTR):
                    raise ProtocolError("handshake is not the BitTorrent protocol")
                self._buf = bytes(data)
                return out
            out.append(Handshake.from_bytes(data[:HANDSHAKE_LEN]))
            self._want_handshake = False
            pos = HANDSHAKE_LEN
        pos = self._parse_messages(data, pos, out)
        self._buf = bytes(data[pos:]) if pos < end else b""
        return out

    def _parse_messages(
        self, buf: bytes | memoryview, pos: int, out: list[Message | Handshake]
    ) -> int:
        """Append the complete messages of ``buf`` from ``pos`` to ``out``; where the
        first incomplete one starts."""
        end = len(buf)
        mv = memoryview(buf)
        while end - pos >= 4:
            (length,) = _U32.unpack_from(mv, pos)
            if length > self.max_length:
                raise ProtocolError(
                    f"message of {length} bytes exceeds the {self.max_length}-byte limit"
                )
            if end - pos - 4 < length:
                break
            start = pos + 4
            pos = start + length
            if length == 0:
                out.append(KEEP_ALIVE)
                continue
            out.append(self._parse(mv[start], mv, start + 1, length - 1))
        return pos

    def _parse(self, msg_id: int, mv: memoryview, at: int, n: int) -> Message:
        if msg_id == PIECE:
            if n < 8:
                raise ProtocolError(f"piece message of {n + 1} bytes is too short")
            index, begin = _IDX_BEGIN.unpack_from(mv, at)
            length = n - 8
            self._check_block(index, begin, length, "piece")
            return Piece(index, begin, mv[at + 8 : at + n])
        if msg_id in (REQUEST, CANCEL):
            if n != 12:
                raise ProtocolError(f"{_NAMES[msg_id]} message of {n + 1} bytes (expected 13)")
            index, begin, length = _TRIPLE.unpack_from(mv, at)
            self._check_block(index, begin, length, _NAMES[msg_id])
            return (
                Request(index, begin, length) if msg_id == REQUEST else Cancel(index, begin, length)
            )
        if msg_id in _INDEX_MESSAGES:
            name = _NAMES[msg_id]
            if n != 4:
                raise ProtocolError(f"{name} message of {n + 1} bytes (expected 5)")
            (index,) = _U32.unpack_from(mv, at)
            if index >= self.num_pieces:
                raise ProtocolError(
                    f"{name} for piece {index} of a {self.num_pieces}-piece torrent"
                )
            return _INDEX_MESSAGES[msg_id](index)
        if msg_id in _NO_PAYLOAD:
            if n != 0:
                raise ProtocolError(f"{_NAMES[msg_id]} message carries {n} unexpected bytes")
            return _NO_PAYLOAD[msg_id]
        if msg_id == METADATA_REQUEST:
            if n != 4:
                raise ProtocolError(f"metadata request of {n + 1} bytes (expected 5)")
            (piece,) = _U32.unpack_from(mv, at)
            if piece >= MAX_METADATA_PIECES:
                raise ProtocolError(f"metadata request for piece {piece}: there are at most 512")
            return MetadataRequest(piece)
        if msg_id == METADATA_PIECE:
            if not 8 < n <= 8 + METADATA_PIECE_SIZE:
                raise ProtocolError(f"metadata piece message of {n + 1} bytes")
            piece, total = _IDX_BEGIN.unpack_from(mv, at)
            if piece >= MAX_METADATA_PIECES:
                raise ProtocolError(f"metadata piece {piece}: there are at most 512")
            return MetadataPiece(piece, total, bytes(mv[at + 8 : at + n]))
        if msg_id == BITFIELD:
            if n != self._bitfield_len:
                raise ProtocolError(
                    f"bitfield of {n} bytes for {self.num_pieces} pieces "
                    f"(expected {self._bitfield_len})"
                )
            return Bitfield(bytes(mv[at : at + n]))
        raise ProtocolError(f"unknown message id {msg_id}")

    def _check_block(self, index: int, begin: int, length: int, what: str) -> None:
        """A block must be a whole 16 KiB slot of the piece (or its short tail)."""
        if index >= self.num_pieces:
            raise ProtocolError(f"{what} for piece {index} of a {self.num_pieces}-piece torrent")
        size = self.piece_size(index)
        if begin % BLOCK_SIZE or begin >= size:
            raise ProtocolError(f"{what} at offset {begin} of piece {index} is not a block start")
        expected = min(BLOCK_SIZE, size - begin)
        if length != expected:
            raise ProtocolError(
                f"{what} of {length} bytes at {index}:{begin} (blocks are {expected} bytes)"
            )
