"""Fuzzing end-to-end cells: HELLO/REPLY first cells and AEAD records.

The first cells are framed by hand-written length fields, so they are fuzzed
field by field with lengths at the cell's edges. Records are fuzzed raw and
behind a valid AEAD (the other end of a circuit holds the key and may be
hostile): a record opens to a known kind and at most MAX_RECORD_DATA bytes, or
is refused with one line, and a channel that refused once refuses everything.
"""

from __future__ import annotations

import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile

from anomos.errors import CryptoError, ProtocolError
from anomos.interfaces import SessionKeys
from anomos.protocol import e2e

TARGET = fuzzlib.TARGETS["e2e"]
SEEDS = TARGET.seeds()
CELL = e2e.CELL_BODY
EDGE_LENGTHS = [0, 1, 31, 32, 64, 512, CELL - 8, CELL - 6, CELL - 5, CELL - 4, CELL - 3, 65535]


def pair() -> tuple[e2e.E2EChannel, e2e.E2EChannel]:
    keys = fuzzlib.E2E_KEYS
    return e2e.E2EChannel(keys), e2e.E2EChannel(SessionKeys(send=keys.recv, recv=keys.send))


@st.composite
def first_cells(draw: st.DrawFn) -> bytes:
    """A HELLO- or REPLY-like body whose length fields may point anywhere."""
    kind = draw(st.sampled_from([e2e.HELLO_TYPE, e2e.REPLY_TYPE, 0, 0xFF]))
    version = draw(st.sampled_from([e2e.HELLO_VERSION, 0, 2]))
    parts = [bytes([kind, version])]
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.binary(max_size=64))
        n = draw(st.one_of(st.just(len(field)), st.sampled_from(EDGE_LENGTHS)))
        parts += [struct.pack(">H", n), field]
    body = fuzzlib._fit(b"".join(parts), CELL)
    if draw(st.booleans()):
        at = draw(st.integers(0, CELL - 1))
        body = body[:at] + bytes([draw(st.integers(1, 255))]) + body[at + 1 :]
    return body


@fuzz_settings(3)
@given(hostile(SEEDS, max_size=1024))
def test_hostile_cells(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@fuzz_settings(3)
@given(first_cells())
def test_first_cells_with_lying_lengths(body: bytes) -> None:
    for decode, count in ((e2e.decode_hello, 2), (e2e.decode_reply, 1)):
        try:
            fields = decode(body)
        except ProtocolError as exc:
            fuzzlib.check_message(exc)
        else:
            fields = fields if count == 2 else (fields,)
            encode = e2e.encode_hello if count == 2 else e2e.encode_reply
            # The decoder takes fields up to the cell's end; the encoder stops a little short.
            if all(len(f) <= e2e.MAX_HELLO_FIELD for f in fields):
                assert encode(*fields) == body


@pytest.mark.parametrize("n", [CELL - 5, CELL - 4])
def test_a_first_field_ending_at_the_cell_edge_is_refused(n: int) -> None:
    """The second length field of a HELLO would start past the cell: refuse, never crash."""
    body = fuzzlib._fit(bytes([e2e.HELLO_TYPE, e2e.HELLO_VERSION]) + struct.pack(">H", n), CELL)
    with pytest.raises(ProtocolError) as err:
        e2e.decode_hello(body)
    fuzzlib.check_message(err.value)


@fuzz_settings(1)
@given(st.binary(max_size=600), st.binary(max_size=100))
def test_first_cells_round_trip(blob: bytes, hello: bytes) -> None:
    assert e2e.decode_hello(e2e.encode_hello(blob, hello)) == (blob, hello, b"")
    assert e2e.decode_reply(e2e.encode_reply(hello)) == hello


@fuzz_settings(2)
@given(
    st.sampled_from([*e2e.RECORD_KINDS, 0, 4, 255]),
    st.sampled_from([0, 5, e2e.MAX_RECORD_DATA, e2e.MAX_RECORD_DATA + 1, 65535]),
    st.binary(max_size=32),
)
def test_records_behind_a_valid_aead(kind: int, n: int, data: bytes) -> None:
    plain = bytes([kind]) + struct.pack(">H", n) + data
    channel = e2e.E2EChannel(fuzzlib.E2E_KEYS)
    body = fuzzlib.e2e_seal_plain(plain)
    if kind in e2e.RECORD_KINDS and n <= e2e.MAX_RECORD_DATA:
        got_kind, got = channel.open(body)
        assert got_kind == kind and got == fuzzlib._fit(data, n)
    else:
        with pytest.raises(CryptoError) as err:
            channel.open(body)
        fuzzlib.check_message(err.value)
        with pytest.raises(CryptoError, match="closed"):
            channel.open(fuzzlib.e2e_seal_plain(bytes([e2e.DATA]), counter=1))


@fuzz_settings(1)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(e2e.RECORD_KINDS)), st.binary(max_size=200)), max_size=8
    )
)
def test_records_round_trip_in_order(records: list[tuple[int, bytes]]) -> None:
    alice, bob = pair()
    for kind, data in records:
        body = alice.seal(kind, data)
        assert len(body) == e2e.SHORT_BODY  # at most 200 bytes: a short cell
        assert bob.open(body) == (kind, data)


@fuzz_settings(1)
@given(st.binary(min_size=1, max_size=64), st.sampled_from([1, 100]), st.data())
def test_any_change_to_a_record_is_refused_and_closes_the_channel(
    data: bytes, repeat: int, draw: st.DataObject
) -> None:
    alice, bob = pair()
    data *= repeat  # short and full cells
    body = bytearray(alice.seal(e2e.DATA, data))
    at = draw.draw(st.integers(0, len(body) - 1))
    body[at] ^= draw.draw(st.integers(1, 255))
    with pytest.raises(CryptoError) as err:
        bob.open(bytes(body))
    fuzzlib.check_message(err.value)
    with pytest.raises(CryptoError, match="closed"):
        bob.open(alice.seal(e2e.DATA, data))


@pytest.mark.parametrize(
    "size", [0, e2e.SHORT_BODY - 1, e2e.SHORT_BODY + 1, CELL - 1, CELL + 1, 10 * 1024 * 1024]
)
def test_wrong_sizes_refused_without_copying(size: int) -> None:
    data = bytes(size)
    channel = e2e.E2EChannel(fuzzlib.E2E_KEYS)
    tracemalloc.start()
    try:
        for decode in (e2e.decode_hello, e2e.decode_reply, channel.open):
            with pytest.raises(ProtocolError, match="bytes, expected") as err:
                decode(data)
            fuzzlib.check_message(err.value)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
