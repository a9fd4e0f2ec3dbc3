"""Fuzzing open_request: hostile blobs, hostile plaintexts behind a valid seal.

Anyone who knows a source's box public key can seal any plaintext to it, so
the plaintext decoder is fuzzed behind a real SealedBox as well as with raw
blobs, and hostile bodies are also signed by the trusted tracker (as a buggy
or hostile tracker would). A request opens to a SourceRequest that re-encodes
to the same body, or is refused with one CryptoError line.
"""

from __future__ import annotations

import struct
import sys
import tracemalloc
from pathlib import Path

import nacl.public
import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile

from anomos.errors import CryptoError
from anomos.protocol import request
from anomos.protocol.request import SourceRequest

TARGET = fuzzlib.TARGETS["request"]
SEEDS = TARGET.seeds()
NOW = fuzzlib.NOW

requests = st.builds(
    SourceRequest,
    infohash=st.sampled_from(request.INFOHASH_SIZES).flatmap(
        lambda n: st.binary(min_size=n, max_size=n)
    ),
    suite=st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True),
    material=st.binary(max_size=request.MAX_MATERIAL),
    expires=st.integers(int(NOW), int(NOW) + request.REQUEST_MAX_TTL),
)


def seal(plain: bytes) -> bytes:
    return bytes(nacl.public.SealedBox(fuzzlib.BOX_PRIVATE.public_key).encrypt(plain))


def seal_request(req: SourceRequest) -> bytes:
    return request.seal_request(req, fuzzlib.BOX_PUBLIC, fuzzlib.TRACKER_KEY)


def open_request(blob: bytes, now: float = NOW) -> SourceRequest:
    return request.open_request(blob, fuzzlib.BOX_PRIVATE, fuzzlib.TRACKERS, now=now)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """Field by field, with lengths that lie and trailing bytes."""

    def field(width: int, limit: int) -> bytes:
        body = draw(st.binary(max_size=limit))
        n = draw(st.one_of(st.just(len(body)), st.integers(0, 256**width - 1)))
        return n.to_bytes(width, "big") + body

    plain = b"".join(
        [
            bytes([draw(st.sampled_from([request.VERSION, 0, 1, 255]))]),
            field(1, 40),
            field(1, 40),
            field(2, 300),
            struct.pack(">Q", draw(st.integers(0, 2**64 - 1))),
            draw(st.one_of(st.just(b""), st.binary(max_size=8))),
        ]
    )
    return plain[: fuzzlib._MAX_SIGNED_BODY]


@fuzz_settings(2)
@given(hostile(SEEDS, max_size=600))
def test_hostile_blobs(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@fuzz_settings(3)
@given(hostile_bodies(), st.booleans())
def test_hostile_plaintexts_behind_a_valid_seal(body: bytes, signed: bool) -> None:
    if signed:
        plain = request.signed_plaintext(body, fuzzlib.BOX_PUBLIC, fuzzlib.TRACKER_KEY)
    else:
        plain = fuzzlib._fit(body, request.PLAINTEXT_SIZE)
    try:
        req = open_request(seal(plain))
    except CryptoError as exc:
        fuzzlib.check_message(exc)
    else:
        assert signed and req.encode() == body


@fuzz_settings(1)
@given(requests)
def test_round_trip_at_constant_size(req: SourceRequest) -> None:
    blob = seal_request(req)
    assert len(blob) == request.REQUEST_BLOB_SIZE
    assert open_request(blob) == req


@fuzz_settings(1)
@given(requests, st.data())
def test_any_change_to_a_blob_is_refused(req: SourceRequest, data: st.DataObject) -> None:
    blob = bytearray(seal_request(req))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CryptoError) as err:
        open_request(bytes(blob))
    fuzzlib.check_message(err.value)


@fuzz_settings(1)
@given(st.integers(0, 2**63 - 1), st.floats(0, 2.0**40))
def test_expiry_window(expires: int, now: float) -> None:
    req = SourceRequest(infohash=b"h" * 20, suite="x25519", material=b"", expires=expires)
    blob = seal_request(req)
    if now <= expires <= now + request.REQUEST_MAX_TTL:
        assert open_request(blob, now) == req
    else:
        with pytest.raises(CryptoError) as err:
            open_request(blob, now)
        fuzzlib.check_message(err.value)


@pytest.mark.parametrize("size", [0, request.REQUEST_BLOB_SIZE - 1, 10 * 1024 * 1024])
def test_wrong_sizes_refused_without_copying(size: int) -> None:
    data = bytes(size)
    tracemalloc.start()
    try:
        with pytest.raises(CryptoError, match="expected"):
            open_request(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
