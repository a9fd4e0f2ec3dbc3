"""Peer-wire codecs: round trips, incremental parsing, and hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomos.errors import ProtocolError
from anomos.torrent import wire
from anomos.torrent.wire import (
    BLOCK_SIZE,
    HANDSHAKE_LEN,
    Bitfield,
    Cancel,
    Handshake,
    Have,
    MessageReader,
    Piece,
    Request,
    pack_bitfield,
    unpack_bitfield,
)

PIECE_LEN = 4 * BLOCK_SIZE
NUM_PIECES = 10
LAST_PIECE = 40_000  # the last piece is short: blocks of 16384, 16384, 7232


def piece_size(index: int) -> int:
    return LAST_PIECE if index == NUM_PIECES - 1 else PIECE_LEN


def reader(handshake: bool = False) -> MessageReader:
    return MessageReader(NUM_PIECES, piece_size, handshake=handshake)


ALL = [
    wire.KEEP_ALIVE,
    wire.CHOKE_MSG,
    wire.UNCHOKE_MSG,
    wire.INTERESTED_MSG,
    wire.NOT_INTERESTED_MSG,
    Have(3),
    Bitfield(pack_bitfield(bytes([1, 0, 1, 1, 0, 0, 0, 0, 1, 1]))),
    Request(2, BLOCK_SIZE, BLOCK_SIZE),
    Request(9, 2 * BLOCK_SIZE, LAST_PIECE - 2 * BLOCK_SIZE),
    Piece(1, 3 * BLOCK_SIZE, bytes(range(256)) * 64),
    Piece(9, 2 * BLOCK_SIZE, b"x" * (LAST_PIECE - 2 * BLOCK_SIZE)),
    Cancel(0, 0, BLOCK_SIZE),
    wire.DontHave(4),
    wire.BadPiece(9),
]


def test_handshake_is_68_bytes_and_round_trips() -> None:
    hs = Handshake(infohash=b"i" * 20, peer_id=b"p" * 20)
    data = hs.encode()
    assert len(data) == HANDSHAKE_LEN == 68
    assert data[:20] == b"\x13BitTorrent protocol"
    assert data[20:28] == bytes(8)  # no extension bits: nothing to fingerprint
    assert Handshake.from_bytes(data) == hs


def test_peer_ids_are_random_per_connection() -> None:
    ids = {wire.new_peer_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 20 for i in ids)


def test_all_messages_round_trip_in_one_feed() -> None:
    hs = Handshake(infohash=b"i" * 20, peer_id=b"p" * 20)
    stream = hs.encode() + b"".join(m.encode() for m in ALL)
    assert reader(handshake=True).feed(stream) == [hs, *ALL]


def test_messages_parse_when_fed_byte_by_byte() -> None:
    stream = b"".join(m.encode() for m in ALL)
    r = reader()
    got = []
    for i in range(len(stream)):
        got += r.feed(stream[i : i + 1])
    assert got == ALL


@given(cuts=st.lists(st.integers(1, 3 * BLOCK_SIZE), min_size=1, max_size=40))
def test_blocks_survive_any_split_of_the_stream_intact_and_in_order(cuts: list[int]) -> None:
    """Blocks are views of the bytes read, and a message split across reads is
    completed from the next one: every byte must land in its own block, in order,
    however the stream is cut (also as bytearrays overwritten after each feed)."""
    pieces = [
        Piece(i % NUM_PIECES, 0, bytes((i * 7 + j) % 251 for j in range(BLOCK_SIZE)))
        for i in range(6)
    ]
    stream = b"".join(m.encode() for m in [Have(1), *pieces, Have(2)])
    for mutable in (False, True):
        r = reader()
        got: list[object] = []
        pos = 0
        for cut in [*cuts, len(stream)]:
            chunk = stream[pos : pos + cut]
            pos += len(chunk)
            if mutable:
                buffer = bytearray(chunk)
                got += r.feed(buffer)
                buffer[:] = bytes(len(buffer))  # a caller reusing its read buffer
            else:
                got += r.feed(chunk)
        assert got == [Have(1), *pieces, Have(2)]
        assert [bytes(m.block) for m in got if isinstance(m, Piece)] == [p.block for p in pieces]


def test_piece_header_helper_matches_encode() -> None:
    p = Piece(4, BLOCK_SIZE, b"z" * BLOCK_SIZE)
    assert wire.encode_piece_header(4, BLOCK_SIZE, BLOCK_SIZE) + p.block == p.encode()
    assert wire.encode_request(1, 0, 5) == Request(1, 0, 5).encode()
    assert wire.encode_cancel(1, 0, 5) == Cancel(1, 0, 5).encode()
    assert wire.encode_have(7) == Have(7).encode()


def frame(msg_id: int, payload: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(payload), msg_id) + payload


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">I", 1 << 20), "exceeds"),
        (frame(wire.REQUEST, struct.pack(">III", 0, 0, 2 * BLOCK_SIZE)), "blocks are"),
        (frame(wire.REQUEST, struct.pack(">III", 0, 0, 100)), "blocks are"),
        (frame(wire.REQUEST, struct.pack(">III", 0, 100, BLOCK_SIZE)), "not a block start"),
        (frame(wire.REQUEST, struct.pack(">III", 0, PIECE_LEN, BLOCK_SIZE)), "not a block start"),
        (frame(wire.REQUEST, struct.pack(">III", NUM_PIECES, 0, BLOCK_SIZE)), "10-piece"),
        (frame(wire.REQUEST, struct.pack(">III", 9, 2 * BLOCK_SIZE, BLOCK_SIZE)), "blocks are"),
        (frame(wire.REQUEST, struct.pack(">II", 0, 0)), "expected 13"),
        (frame(wire.CANCEL, struct.pack(">III", 0, 0, BLOCK_SIZE + 1)), "blocks are"),
        (frame(wire.PIECE, struct.pack(">II", 0, 0) + b"x" * 100), "blocks are"),
        (frame(wire.PIECE, b"abc"), "too short"),
        (frame(wire.HAVE, struct.pack(">I", NUM_PIECES)), "10-piece"),
        (frame(wire.HAVE, b"\0\0"), "expected 5"),
        (frame(wire.DONT_HAVE, struct.pack(">I", NUM_PIECES)), "don't have for piece 10"),
        (frame(wire.BAD_PIECE, struct.pack(">I", NUM_PIECES)), "bad piece for piece 10"),
        (frame(wire.BAD_PIECE, b"\0\0\0\0\0"), "expected 5"),
        (frame(wire.BITFIELD, b"\xff"), "expected 2"),
        (frame(wire.CHOKE, b"x"), "unexpected"),
        (frame(42, b""), "unknown message id 42"),
    ],
)
def test_malformed_messages_raise_one_line_protocol_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as exc:
        reader().feed(data)
    assert "\n" not in str(exc.value)


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    r = reader()
    with pytest.raises(ProtocolError, match="exceeds"):
        r.feed(struct.pack(">I", r.max_length + 1))


def test_buffer_never_holds_more_than_one_message() -> None:
    r = reader()
    whole = Piece(0, 0, b"q" * BLOCK_SIZE).encode()
    assert r.feed(whole[:-1]) == []
    assert len(r._buf) == len(whole) - 1 <= r.max_length + 4
    assert r.feed(whole[-1:]) == [Piece(0, 0, b"q" * BLOCK_SIZE)]
    assert r._buf == b""


def test_bad_handshakes() -> None:
    with pytest.raises(ProtocolError, match="not the BitTorrent protocol"):
        reader(handshake=True).feed(b"\x05hello")
    bad = bytearray(Handshake(infohash=b"i" * 20, peer_id=b"p" * 20).encode())
    bad[5] ^= 1
    with pytest.raises(ProtocolError, match="not the BitTorrent protocol"):
        reader(handshake=True).feed(bytes(bad))


def test_bitfield_spare_bits_must_be_zero() -> None:
    with pytest.raises(ProtocolError, match="spare bits"):
        unpack_bitfield(b"\xff\xff", NUM_PIECES)
    with pytest.raises(ProtocolError, match="expected 2"):
        unpack_bitfield(b"\xff", NUM_PIECES)


@given(st.lists(st.integers(0, 1), max_size=300))
def test_bitfield_round_trip(flags: list[int]) -> None:
    packed = pack_bitfield(bytes(flags))
    assert len(packed) == (len(flags) + 7) // 8
    assert unpack_bitfield(packed, len(flags)) == bytearray(flags)
    if flags:
        assert (packed[0] >> 7) == flags[0]  # piece 0 is the high bit
