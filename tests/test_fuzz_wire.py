"""Fuzzing the peer-wire codecs: handshake, MessageReader, bitfields.

A peer's bytes, however cut into reads, give the messages they encode or a
ProtocolError with one line; the reader never waits for (or buffers) more
than one legal message, whatever length prefix a peer announces.
"""

from __future__ import annotations

import itertools
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile

import anomos.torrent.wire as wire
from anomos.errors import ProtocolError

TARGET = fuzzlib.TARGETS["wire"]
SEEDS = TARGET.seeds()
N = fuzzlib.WIRE_PIECES
size = fuzzlib.wire_piece_size


def reader(handshake: bool = True) -> wire.MessageReader:
    return wire.MessageReader(N, size, handshake=handshake)


@st.composite
def blocks(draw: st.DrawFn) -> tuple[int, int, int]:
    index = draw(st.integers(0, N - 1))
    begin = draw(st.integers(0, (size(index) - 1) // wire.BLOCK_SIZE)) * wire.BLOCK_SIZE
    return index, begin, min(wire.BLOCK_SIZE, size(index) - begin)


def _piece(block: tuple[int, int, int], fill: int) -> wire.Piece:
    index, begin, length = block
    return wire.Piece(index, begin, bytes([fill]) * length)


messages = st.one_of(
    st.sampled_from(
        [
            wire.KEEP_ALIVE,
            wire.CHOKE_MSG,
            wire.UNCHOKE_MSG,
            wire.INTERESTED_MSG,
            wire.NOT_INTERESTED_MSG,
        ]
    ),
    st.builds(wire.Have, st.integers(0, N - 1)),
    st.builds(
        lambda flags: wire.Bitfield(wire.pack_bitfield(bytes(flags))),
        st.lists(st.integers(0, 1), min_size=N, max_size=N),
    ),
    st.builds(lambda b: wire.Request(*b), blocks()),
    st.builds(lambda b: wire.Cancel(*b), blocks()),
    st.builds(_piece, blocks(), st.integers(0, 255)),
)


def feed_in_pieces(r: wire.MessageReader, data: bytes, cuts: list[int]) -> list[object]:
    out: list[object] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        out += r.feed(data[a:b])
    return out


@fuzz_settings(3)
@given(hostile(SEEDS, max_size=1024))
def test_hostile_streams(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@fuzz_settings(1)
@given(st.lists(messages, max_size=12), st.lists(st.integers(0, 2**20), max_size=8))
def test_round_trip_however_the_stream_is_cut(msgs: list[object], cuts: list[int]) -> None:
    hello = wire.Handshake(infohash=b"i" * 20, peer_id=b"p" * 20)
    data = hello.encode() + b"".join(m.encode() for m in msgs)  # type: ignore[attr-defined]
    assert feed_in_pieces(reader(), data, cuts) == [hello, *msgs]


@fuzz_settings(2)
@given(hostile(SEEDS, max_size=1024), st.lists(st.integers(0, 2**20), max_size=8))
def test_cutting_the_stream_changes_nothing(data: bytes, cuts: list[int]) -> None:
    """A reader must not accept in pieces what it refuses whole, or the reverse."""
    data = data[1:]  # the target's chunk-size byte
    try:
        whole = reader().feed(data)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            feed_in_pieces(reader(), data, cuts)
    else:
        assert feed_in_pieces(reader(), data, cuts) == whole


@fuzz_settings(1)
@given(st.binary(max_size=16), st.integers(0, 120))
def test_bitfields(data: bytes, pieces: int) -> None:
    try:
        flags = wire.unpack_bitfield(data, pieces)
    except ProtocolError as exc:
        fuzzlib.check_message(exc)
    else:
        assert len(flags) == pieces and set(flags) <= {0, 1}
        assert wire.pack_bitfield(flags) == data


@fuzz_settings(1)
@given(hostile([wire.Handshake(infohash=b"i" * 20, peer_id=b"p" * 20).encode()], 80))
def test_handshakes(data: bytes) -> None:
    try:
        hello = wire.Handshake.from_bytes(data)
    except ProtocolError as exc:
        fuzzlib.check_message(exc)
    else:
        assert hello.encode() == data


@pytest.mark.parametrize("length", [2**32 - 1, 2**31, 10**6])
def test_huge_length_prefix_refused_at_once(length: int) -> None:
    r = reader(handshake=False)
    with pytest.raises(ProtocolError, match="limit") as err:
        r.feed(length.to_bytes(4, "big"))
    fuzzlib.check_message(err.value)


def test_a_maximal_message_fed_slowly_stays_bounded() -> None:
    """A peer trickling the largest legal message never makes the reader hold more."""
    r = reader(handshake=False)
    body = wire.Piece(0, 0, b"b" * wire.BLOCK_SIZE).encode()
    tracemalloc.start()
    try:
        got: list[object] = []
        for i in range(0, len(body), 512):
            got += r.feed(body[i : i + 512])
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [wire.Piece(0, 0, b"b" * wire.BLOCK_SIZE)]
    assert peak < 4 * len(body)
