"""Sealed requests: constant size, only the source opens them, only a trusted tracker
signs them, expiry and strict fields."""

from __future__ import annotations

import struct

import nacl.public
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from anomos.errors import CryptoError
from anomos.protocol import request as requestmod
from anomos.protocol.request import (
    MAX_MATERIAL,
    PLAINTEXT_SIZE,
    REQUEST_BLOB_SIZE,
    REQUEST_MAX_TTL,
    SeenRequests,
    SourceRequest,
    tracker_fingerprint,
)
from anomos.testing import tracker_key, tracker_trust

NOW = 1_700_000_000


def seal_request(
    req: SourceRequest, box: object, key: ec.EllipticCurvePrivateKey | None = None
) -> bytes:
    return requestmod.seal_request(req, box, key or tracker_key())  # type: ignore[arg-type]


def open_request(blob: bytes, box: object, now: float, trackers: object = None) -> SourceRequest:
    return requestmod.open_request(blob, box, trackers or tracker_trust(), now=now)  # type: ignore[arg-type]


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
    """``plain``, zero padded, in a valid seal to ``box`` (no tracker involved)."""
    plain = plain + bytes(PLAINTEXT_SIZE - len(plain))
    return bytes(nacl.public.SealedBox(box.public_key).encrypt(plain))


def test_bad_fields_inside_a_valid_seal_refused(box: nacl.public.PrivateKey) -> None:
    good = request().encode()
    expires = struct.pack(">Q", NOW + 300)
    signed = sealed_plaintext(box, b"")  # only for its size
    assert len(signed) == REQUEST_BLOB_SIZE
    cases = {
        "unknown version": b"\x07" + good[1:],
        "longer than the blob": bytes([2, 20]) + b"i" * 20 + bytes([1]) + b"x" + b"\xff\xff",
        "bad field": bytes([2, 5]) + b"short" + bytes([1]) + b"x" + b"\x00\x00" + expires,
        "bad field.*suite": bytes([2, 20]) + b"i" * 20 + bytes([3]) + b"a b" + b"\x00\x00"
        + expires,
        "untrusted tracker|malformed tracker key": good,  # no signature after the body
    }  # fmt: skip
    for reason, plain in cases.items():
        with pytest.raises(CryptoError, match=reason):
            open_request(sealed_plaintext(box, plain), box, now=NOW)


def test_non_zero_padding_after_the_signature_refused(box: nacl.public.PrivateKey) -> None:
    blob = seal_request(request(), box.public_key)
    plain = bytearray(nacl.public.SealedBox(box).decrypt(blob))
    plain[-1] = 1
    with pytest.raises(CryptoError, match="non-zero padding"):
        open_request(sealed_plaintext(box, bytes(plain)), box, now=NOW)


def test_only_requests_signed_by_a_trusted_tracker_are_served(
    box: nacl.public.PrivateKey,
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    forged = seal_request(request(), box.public_key, other)
    with pytest.raises(CryptoError, match="untrusted tracker"):
        open_request(forged, box, now=NOW)
    # Trusting that tracker too, its request opens.
    both = tracker_trust() | {tracker_fingerprint(other.public_key())}
    assert open_request(forged, box, now=NOW, trackers=both) == request()


def test_a_signed_request_cannot_be_changed_or_moved_to_another_source(
    box: nacl.public.PrivateKey,
) -> None:
    blob = seal_request(request(), box.public_key)
    plain = bytearray(nacl.public.SealedBox(box).decrypt(blob))
    # Whoever opens a request (its source) cannot change what it says...
    tampered = bytearray(plain)
    tampered[5] ^= 1  # inside the infohash
    with pytest.raises(CryptoError, match="bad tracker signature"):
        open_request(sealed_plaintext(box, bytes(tampered)), box, now=NOW)
    # ...nor re-seal it to another peer: the signature covers the source's box key.
    elsewhere = nacl.public.PrivateKey.generate()
    with pytest.raises(CryptoError, match="bad tracker signature"):
        open_request(sealed_plaintext(elsewhere, bytes(plain)), elsewhere, now=NOW)
    # A garbage tracker key is refused with its own error.
    n = len(request().encode())
    bad_point = bytearray(plain)
    bad_point[n : n + 33] = b"\x05" + bytes(32)
    with pytest.raises(CryptoError, match="malformed tracker key"):
        open_request(sealed_plaintext(box, bytes(bad_point)), box, now=NOW)


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
