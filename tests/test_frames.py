"""The link frame codec and the bounded FrameReader, without sockets."""

from __future__ import annotations

import random

import pytest

from anomos.errors import ProtocolError
from anomos.net import frames
from anomos.net.frames import Cmd, FrameReader, encode_frame, encode_header
from anomos.protocol.e2e import CELL_BODY, SHORT_BODY
from anomos.protocol.onion import TRACKING_CODE_SIZE


class ChunkedSocket:
    """Hands out a byte string in the chunk sizes given, like a slow network."""

    def __init__(self, data: bytes, sizes: list[int] | None = None) -> None:
        self.data = data
        self.pos = 0
        self.sizes = sizes or []
        self.calls = 0

    def recv_into(self, view: memoryview) -> int:
        self.calls += 1
        size = self.sizes.pop(0) if self.sizes else len(view)
        n = min(size, len(view), len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def sample_frames(rng: random.Random, count: int) -> list[tuple[int, int, bytes]]:
    out = []
    for _ in range(count):
        kind = rng.choice(["data", "create", "created", "break", "padding"])
        circ = rng.randrange(1, 2**32)
        if kind == "data":
            out.append((circ, Cmd.DATA, rng.randbytes(CELL_BODY)))
        elif kind == "create":
            out.append((circ, Cmd.CREATE, rng.randbytes(TRACKING_CODE_SIZE)))
        elif kind == "created":
            out.append((circ, Cmd.CREATED, b""))
        elif kind == "break":
            out.append((circ, Cmd.BREAK, bytes([rng.randrange(10)])))
        else:
            out.append((0, Cmd.PADDING, rng.randbytes(rng.randrange(frames.MAX_PADDING + 1))))
    return out


def test_frames_survive_any_chunking() -> None:
    rng = random.Random(7)
    sent = sample_frames(rng, 60)
    wire = b"".join(encode_frame(*f) for f in sent)
    sizes = [rng.choice([1, 3, 8, 100, 16384, 70000]) for _ in range(5000)]
    reader = FrameReader(ChunkedSocket(wire, sizes), buffer_size=2 * frames.DATA_FRAME_SIZE)
    got = [(c, cmd, bytes(p)) for c, cmd, p in reader]
    assert got == sent
    assert reader.bytes_in == len(wire)
    assert reader.buffered() == 0


def test_reader_uses_few_reads_for_big_chunks() -> None:
    wire = encode_frame(5, Cmd.DATA, bytes(CELL_BODY)) * 16
    sock = ChunkedSocket(wire)
    assert len(list(FrameReader(sock))) == 16
    # 512 KiB through a 256 KiB buffer: a handful of recv_into calls, not one per frame.
    assert sock.calls <= 5


def test_short_and_full_data_frames_in_one_stream() -> None:
    sizes = [SHORT_BODY, CELL_BODY, SHORT_BODY, SHORT_BODY, CELL_BODY]
    wire = b"".join(encode_frame(7, Cmd.DATA, bytes([n]) * size) for n, size in enumerate(sizes))
    got = [(len(p), p[0]) for _c, _m, p in FrameReader(ChunkedSocket(wire))]
    assert got == [(size, n) for n, size in enumerate(sizes)]


def test_payload_is_a_view_into_the_buffer() -> None:
    reader = FrameReader(ChunkedSocket(encode_frame(9, Cmd.DATA, b"x" * CELL_BODY)))
    circ_id, cmd, payload = next(reader)
    assert (circ_id, cmd) == (9, Cmd.DATA)
    assert isinstance(payload, memoryview) and len(payload) == CELL_BODY


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (encode_header(1, 99, 0), "unknown frame command 99"),
        (encode_header(1, Cmd.DATA, 100), "DATA frame of 100 bytes"),
        (encode_header(1, Cmd.DATA, 0xFFFF), "DATA frame of 65535 bytes"),
        # Between the two cell sizes, or next to one: a DATA frame is one or the other.
        (encode_header(1, Cmd.DATA, SHORT_BODY + 1), r"DATA frame of 2041 bytes \(allowed 2040 or"),
        (encode_header(1, Cmd.DATA, SHORT_BODY - 1), "DATA frame of 2039 bytes"),
        (encode_header(1, Cmd.DATA, CELL_BODY - 1), "DATA frame of 32759 bytes"),
        (encode_header(1, Cmd.DATA, 16384), "DATA frame of 16384 bytes"),
        (encode_header(0, Cmd.DATA, SHORT_BODY), "DATA frame on circuit id 0"),
        (encode_header(1, Cmd.CREATE, 10), "CREATE frame of 10 bytes"),
        (encode_header(1, Cmd.BREAK, 2), "BREAK frame of 2 bytes"),
        (encode_header(0, Cmd.PADDING, 60000), "PADDING frame of 60000 bytes"),
        (encode_header(0, Cmd.DATA, CELL_BODY), "DATA frame on circuit id 0"),
        (encode_header(3, Cmd.AUTH, frames.AUTH_SIZE), "AUTH frame on circuit id 3"),
    ],
)
def test_bad_headers_are_refused_before_the_payload(header: bytes, message: str) -> None:
    sock = ChunkedSocket(header)  # no payload follows: refusal must not wait for one
    with pytest.raises(ProtocolError, match=message):
        next(FrameReader(sock))


def test_end_of_stream() -> None:
    frame = encode_frame(4, Cmd.CREATED)
    reader = FrameReader(ChunkedSocket(frame))
    assert next(reader)[1] == Cmd.CREATED
    with pytest.raises(StopIteration):
        next(reader)
    truncated = encode_frame(4, Cmd.DATA, bytes(CELL_BODY))[:-1]
    with pytest.raises(ProtocolError, match="middle of a frame"):
        next(FrameReader(ChunkedSocket(truncated)))


def test_encode_frame_validates() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(1, Cmd.DATA, b"short")
    assert encode_frame(0, Cmd.AUTH_OK) == bytes([0, 0, 0, 0, Cmd.AUTH_OK, 0, 0, 0])


def test_auth_codec_and_message() -> None:
    identity, signature = bytes(range(32)), bytes(range(64))
    payload = frames.encode_auth(0xDEADBEEF, identity, signature)
    assert len(payload) == frames.AUTH_SIZE
    assert frames.decode_auth(memoryview(payload)) == (0xDEADBEEF, identity, signature, b"")
    ticketed = frames.encode_auth(7, identity, signature, b"t" * 200)
    assert frames.decode_auth(ticketed) == (7, identity, signature, b"t" * 200)
    message = frames.auth_message(b"c" * 32, b"s" * 32, 7)
    assert message == b"anomos-link-v1" + b"c" * 32 + b"s" * 32 + b"\x00\x00\x00\x07"
    with pytest.raises(ProtocolError):
        frames.decode_auth(payload[:-1])
    with pytest.raises(ProtocolError):  # more than AUTH and the largest ticket
        frames.decode_auth(payload + bytes(frames.MAX_TICKET_SIZE + 1))


def test_break_reasons() -> None:
    assert frames.decode_break(frames.encode_break(frames.BreakReason.REFUSED)) == 4
    assert frames.describe_break(frames.BreakReason.CRYPTO).startswith("tracking code refused")
    assert frames.describe_break(200) == "unknown reason 200"
