"""Sealed requests: constant size, only the source opens them, expiry and strict fields."""

from __future__ import annotations

import struct

import nacl.public
import pytest

from anomos.errors import CryptoError
from anomos.protocol.request import (
    MAX_MATERIAL,
    PLAINTEXT_SIZE,
    REQUEST_BLOB_SIZE,
    REQUEST_MAX_TTL,
    SeenRequests,
    SourceRequest,
    open_request,
    seal_request,
)

NOW = 1_700_000_000


def request(**kw: object) -> SourceRequest:
    fields: dict[object, object] = {
        "infohash": b"\x11" * 20,
        "suite": "x25519",
        "material": b"m" * 32,
        "expires": NOW + 300,
    }
    fields.update(kw)
    return SourceRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture
def box() -> nacl.public.PrivateKey:
    return nacl.public.PrivateKey.generate()


@pytest.mark.parametrize(
    "req",
    [
        request(),
        request(infohash=b"\x22" * 32, suite="a", material=b""),
        request(suite="s" * 32, material=b"\xff" * MAX_MATERIAL),
    ],
)
def test_round_trip_with_constant_size(box: nacl.public.PrivateKey, req: SourceRequest) -> None:
    blob = seal_request(req, bytes(box.public_key))
    assert len(blob) == REQUEST_BLOB_SIZE
    assert open_request(blob, box, now=NOW) == req
    assert open_request(blob, bytes(box), now=NOW) == req  # raw key bytes work too
    assert not req.material or req.material not in blob


def test_sealing_twice_gives_unrelated_blobs(box: nacl.public.PrivateKey) -> None:
    req = request()
    assert seal_request(req, box.public_key) != seal_request(req, box.public_key)


def test_wrong_key_refused(box: nacl.public.PrivateKey) -> None:
    blob = seal_request(request(), box.public_key)
    with pytest.raises(CryptoError, match="not for this key"):
        open_request(blob, nacl.public.PrivateKey.generate(), now=NOW)


def test_expired_and_far_future_refused(box: nacl.public.PrivateKey) -> None:
    blob = seal_request(request(expires=NOW - 1), box.public_key)
    with pytest.raises(CryptoError, match="expired"):
        open_request(blob, box, now=NOW)
    assert open_request(blob, box, now=NOW - 1).expires == NOW - 1
    far = seal_request(request(expires=NOW + REQUEST_MAX_TTL + 10), box.public_key)
    with pytest.raises(CryptoError, match="more than a day"):
        open_request(far, box, now=NOW)


def test_tampered_wrong_size_and_garbage_refused(box: nacl.public.PrivateKey) -> None:
    blob = seal_request(request(), box.public_key)
    for pos in (0, 31, 32, 100, REQUEST_BLOB_SIZE - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(CryptoError, match="does not open"):
            open_request(bytes(bad), box, now=NOW)
    with pytest.raises(CryptoError, match="bytes, expected"):
        open_request(blob[:-1], box, now=NOW)
    with pytest.raises(CryptoError, match="does not open"):
        open_request(bytes(REQUEST_BLOB_SIZE), box, now=NOW)


def sealed_plaintext(box: nacl.public.PrivateKey, plain: bytes) -> bytes:
    assert len(plain) == PLAINTEXT_SIZE
    return bytes(nacl.public.SealedBox(box.public_key).encrypt(plain))


def test_bad_fields_inside_a_valid_seal_refused(box: nacl.public.PrivateKey) -> None:
    good = request().encode()
    expires = struct.pack(">Q", NOW + 300)
    cases = {
        "unknown version": b"\x07" + good[1:],
        "non-zero padding": good[:-1] + b"\x01",
        "longer than the blob": bytes([1, 20]) + b"i" * 20 + bytes([1]) + b"x" + b"\xff\xff",
        "bad field": bytes([1, 5]) + b"short" + bytes([1]) + b"x" + b"\x00\x00" + expires,
        "bad field.*suite": bytes([1, 20]) + b"i" * 20 + bytes([3]) + b"a b" + b"\x00\x00",
    }
    for reason, plain in cases.items():
        plain = plain + bytes(PLAINTEXT_SIZE - len(plain))
        with pytest.raises(CryptoError, match=reason):
            open_request(sealed_plaintext(box, plain), box, now=NOW)


def test_request_fields_are_validated() -> None:
    for bad in (
        {"infohash": b"x" * 19},
        {"suite": ""},
        {"suite": "has space"},
        {"suite": "x" * 33},
        {"material": b"m" * (MAX_MATERIAL + 1)},
        {"expires": -1},
    ):
        with pytest.raises(ValueError):
            request(**bad)


def test_seen_requests_refuses_replays_and_stays_bounded(box: nacl.public.PrivateKey) -> None:
    seen = SeenRequests(limit=3)
    blobs = [seal_request(request(expires=NOW + i), box.public_key) for i in range(1, 4)]
    for blob in blobs:
        seen.check(blob, open_request(blob, box, now=NOW), now=NOW)
    with pytest.raises(CryptoError, match="replayed"):
        seen.check(blobs[0], request(), now=NOW)
    extra = seal_request(request(), box.public_key)
    with pytest.raises(CryptoError, match="too many"):
        seen.check(extra, request(), now=NOW)
    assert len(seen) == 3
    # Once the first two expire they make room.
    seen.check(extra, request(), now=NOW + 2.5)
    assert len(seen) == 2
