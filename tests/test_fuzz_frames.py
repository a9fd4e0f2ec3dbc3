"""Fuzzing link frames: FrameReader over hostile streams, decode_auth, decode_break.

Whatever a neighbour sends, in whatever reads, the reader yields the frames it
encodes, ends cleanly at EOF between frames, or raises ProtocolError with one
line; it refuses an oversized or unknown frame from its header alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gevent
import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile

import anomos.net.frames as frames
from anomos.errors import ProtocolError

TARGET = fuzzlib.TARGETS["frames"]
SEEDS = TARGET.seeds()
Cmd = frames.Cmd


@st.composite
def legal_frames(draw: st.DrawFn) -> tuple[int, int, bytes]:
    cmd = draw(st.sampled_from(sorted(frames.PAYLOAD_SIZES)))
    low, high = frames.PAYLOAD_SIZES[cmd]
    if cmd == Cmd.DATA:  # a short or a full cell, nothing between
        length = draw(st.sampled_from(sorted(frames.DATA_SIZES)))
    else:
        length = draw(st.integers(low, min(high, low + 64)) if high - low > 64 else st.just(low))
    if cmd in frames.LINK_COMMANDS:
        circ_id = frames.LINK_CIRC_ID
    else:
        circ_id = draw(st.integers(1, 2**32 - 1))
    fill = draw(st.binary(min_size=1, max_size=8))
    return circ_id, int(cmd), (fill * length)[:length]


def read_all(data: bytes, chunk: int, buffer_size: int) -> list[tuple[int, int, bytes]]:
    sock = fuzzlib.ChunkSocket(data, chunk)
    reader = frames.FrameReader(sock, buffer_size=buffer_size)
    return [(c, m, bytes(p)) for c, m, p in reader]


@fuzz_settings(3)
@given(hostile(SEEDS, max_size=1024))
def test_hostile_streams(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@fuzz_settings(1)
@given(
    st.lists(legal_frames(), max_size=12),
    st.integers(0, 40_000),
    st.sampled_from([2 * frames.DATA_FRAME_SIZE, frames.READ_BUFFER]),
)
def test_round_trip_however_the_stream_is_read(
    sent: list[tuple[int, int, bytes]], chunk: int, buffer_size: int
) -> None:
    data = b"".join(frames.encode_frame(c, m, p) for c, m, p in sent)
    with gevent.Timeout(30):
        assert read_all(data, chunk, buffer_size) == sent


@fuzz_settings(2)
@given(st.lists(legal_frames(), min_size=1, max_size=6), st.data())
def test_a_stream_cut_inside_a_frame_is_refused(
    sent: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(frames.encode_frame(c, m, p) for c, m, p in sent)
    ends = {0}
    for _c, _m, p in sent:
        ends.add(max(ends) + frames.HEADER_SIZE + len(p))
    cut = data.draw(st.integers(1, len(stream) - 1).filter(lambda n: n not in ends))
    with pytest.raises(ProtocolError, match="middle of a frame") as err:
        read_all(stream[:cut], data.draw(st.integers(0, 5000)), frames.READ_BUFFER)
    fuzzlib.check_message(err.value)


class OneShotSocket:
    """Gives one header, then fails the test if the reader asks for more."""

    def __init__(self, header: bytes) -> None:
        self.header = header

    def recv_into(self, buf: memoryview) -> int:
        if not self.header:
            raise AssertionError("the reader waited for the payload of a refused header")
        n = len(self.header)
        buf[:n] = self.header
        self.header = b""
        return n


@fuzz_settings(2)
@given(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 0xFFFF))
def test_headers_are_judged_before_any_payload(circ_id: int, cmd: int, length: int) -> None:
    reader = frames.FrameReader(OneShotSocket(frames.encode_header(circ_id, cmd, length)))
    try:
        frames.check_header(circ_id, cmd, length)
    except ProtocolError:
        with pytest.raises(ProtocolError) as err:
            next(reader)
        fuzzlib.check_message(err.value)
    else:  # a legal header: the reader waits for exactly its payload
        if length:
            with pytest.raises(AssertionError, match="waited"):
                next(reader)
        else:
            assert next(reader) == (circ_id, cmd, b"")


@fuzz_settings(1)
@given(hostile([frames.encode_auth(9, b"k" * 32, b"s" * 64)], 200))
def test_decode_auth(data: bytes) -> None:
    try:
        nid, identity, signature, ticket = frames.decode_auth(data)
    except ProtocolError as exc:
        fuzzlib.check_message(exc)
    else:
        assert frames.encode_auth(nid, identity, signature, ticket) == data


def test_every_break_payload_decodes_and_is_described() -> None:
    for reason in range(256):
        payload = frames.encode_break(reason)
        assert frames.decode_break(memoryview(payload)) == reason
        text = frames.describe_break(frames.decode_break(payload))
        assert text and "\n" not in text


def test_decode_break_refuses_a_wrong_size() -> None:
    with pytest.raises(ProtocolError):
        frames.decode_break(b"")
