"""The request the tracker seals to a source: what to serve and how to key it.

The downloader carries the blob in its HELLO cell without being able to read
it (it does not know who the source is, only the tracker does). A SealedBox
(ephemeral X25519 + XSalsa20-Poly1305) to the source's box key keeps relays
and the downloader out, and refuses any modified blob. Every blob has the
same size, :data:`REQUEST_BLOB_SIZE`, so its length says nothing about the
torrent or the cipher suite.

A SealedBox says nothing about who sealed it, so the tracker also signs the
request with its long-term key (the one whose fingerprint peers pin) and the
source serves only requests signed by a tracker it trusts: whoever learns a
peer's keys still cannot ask it for a torrent to find out whether it shares it.

Plaintext layout, zero padded to ``REQUEST_BLOB_SIZE - SEAL_OVERHEAD``::

    body      = version u8 | len u8 | infohash | len u8 | suite (ASCII)
                | len u16 | material | expires u64
    plaintext = body | tracker key (P-256, compressed, 33) | signature (r | s, 64)
    signed    = "anomos sealed request v2" 0x00 | source box public key (32) | body
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
from collections.abc import Collection

import attrs
import nacl.bindings
import nacl.exceptions
import nacl.public
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from anomos.errors import CryptoError
from anomos.protocol.replay import ReplayFile

VERSION = 2
#: Every sealed request has exactly this many bytes.
REQUEST_BLOB_SIZE = 512
SEAL_OVERHEAD = nacl.bindings.crypto_box_SEALBYTES
PLAINTEXT_SIZE = REQUEST_BLOB_SIZE - SEAL_OVERHEAD
MAX_SUITE_NAME = 32
MAX_MATERIAL = 256
INFOHASH_SIZES = (20, 32)
#: A source refuses a request that claims to stay valid longer than this (seconds).
REQUEST_MAX_TTL = 24 * 3600
#: Sealed requests a :class:`SeenRequests` remembers at once.
REQUEST_REPLAY_LIMIT = 65536
#: The tracker's public key (compressed P-256 point) and its signature (r | s).
TRACKER_KEY_SIZE = 33
SIGNATURE_SIZE = 64
TRACKER_SIGNATURE_SIZE = TRACKER_KEY_SIZE + SIGNATURE_SIZE
_DOMAIN = b"anomos sealed request v2\x00"
_ECDSA = ec.ECDSA(hashes.SHA256())

_SUITE_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_SUITE_NAME}}}")
_EXPIRES = struct.Struct(">Q")


def _check_infohash(_inst: object, _attr: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) not in INFOHASH_SIZES:
        raise ValueError(f"infohash must be 20 or 32 bytes, got {len(value)}")


def _check_suite(_inst: object, _attr: object, value: str) -> None:
    if not isinstance(value, str) or not _SUITE_RE.fullmatch(value):
        raise ValueError(f"suite name {value!r} is not 1..{MAX_SUITE_NAME} of [A-Za-z0-9_-]")


def _check_material(_inst: object, _attr: object, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) > MAX_MATERIAL:
        raise ValueError(f"material must be at most {MAX_MATERIAL} bytes")


def _check_expires(_inst: object, _attr: object, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"expires must be a Unix time in seconds, got {value!r}")


@attrs.frozen
class SourceRequest:
    """What a source learns from the tracker about one circuit ending at it."""

    infohash: bytes = attrs.field(validator=_check_infohash)
    #: Name of the cipher suite (a registry name) the endpoints must use.
    suite: str = attrs.field(validator=_check_suite)
    #: Per-circuit secret from :meth:`CipherSuite.tracker_material`.
    material: bytes = attrs.field(repr=False, validator=_check_material)
    #: Unix time (seconds) after which the source refuses the request.
    expires: int = attrs.field(validator=_check_expires)

    def encode(self) -> bytes:
        """The body: what the tracker signs, at most ``PLAINTEXT_SIZE`` minus the signature."""
        suite = self.suite.encode("ascii")
        return b"".join(
            [
                bytes([VERSION, len(self.infohash)]),
                self.infohash,
                bytes([len(suite)]),
                suite,
                struct.pack(">H", len(self.material)),
                self.material,
                _EXPIRES.pack(self.expires),
            ]
        )

    @staticmethod
    def body_length(plain: bytes) -> int:
        """Length of the body at the start of ``plain``; ``CryptoError`` if it runs past it."""
        if not plain:
            raise CryptoError("sealed request is empty")
        if plain[0] != VERSION:
            raise CryptoError(f"sealed request has unknown version {plain[0]}")
        pos = 1
        for width in (1, 1, 2):
            if pos + width > len(plain):
                raise CryptoError("sealed request is truncated")
            pos += width + int.from_bytes(plain[pos : pos + width], "big")
        pos += _EXPIRES.size
        if pos > len(plain):
            raise CryptoError("sealed request has a field longer than the blob")
        return pos

    @classmethod
    def decode(cls, body: bytes) -> SourceRequest:
        """Strict inverse of :meth:`encode`; ``CryptoError`` naming the bad field."""
        if cls.body_length(body) != len(body):
            raise CryptoError("sealed request body has trailing bytes")
        pos = 1
        fields: list[bytes] = []
        for width in (1, 1, 2):
            n = int.from_bytes(body[pos : pos + width], "big")
            pos += width
            fields.append(body[pos : pos + n])
            pos += n
        (expires,) = _EXPIRES.unpack_from(body, pos)
        infohash, suite, material = fields
        try:
            return cls(
                infohash=infohash, suite=suite.decode("ascii"), material=material, expires=expires
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise CryptoError(f"sealed request has a bad field: {exc}") from None


def _public(key: bytes | nacl.public.PublicKey) -> nacl.public.PublicKey:
    return key if isinstance(key, nacl.public.PublicKey) else nacl.public.PublicKey(key)


def _private(key: bytes | nacl.public.PrivateKey) -> nacl.public.PrivateKey:
    return key if isinstance(key, nacl.public.PrivateKey) else nacl.public.PrivateKey(key)


def tracker_fingerprint(key: PublicKeyTypes) -> str:
    """Hex SHA-256 of the key's DER SubjectPublicKeyInfo: what peers pin (see tracker.identity)."""
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def seal_request(
    req: SourceRequest,
    box_public: bytes | nacl.public.PublicKey,
    tracker_key: ec.EllipticCurvePrivateKey,
) -> bytes:
    """Sign ``req`` with the tracker's key and seal it to a source's box key.

    Exactly :data:`REQUEST_BLOB_SIZE` bytes whatever the request.
    """
    box = _public(box_public)
    plain = signed_plaintext(req.encode(), bytes(box), tracker_key)
    blob = nacl.public.SealedBox(box).encrypt(plain)
    assert len(blob) == REQUEST_BLOB_SIZE
    return bytes(blob)


def signed_plaintext(
    body: bytes, box_public: bytes, tracker_key: ec.EllipticCurvePrivateKey
) -> bytes:
    """``body | tracker key | signature``, zero padded to :data:`PLAINTEXT_SIZE`.

    The body is not checked here (fuzzers sign hostile ones); use :func:`seal_request`.
    """
    plain = body + tracker_signature(tracker_key, _DOMAIN + box_public + body)
    if len(plain) > PLAINTEXT_SIZE:
        raise ValueError(f"request body of {len(body)} bytes leaves no room for the signature")
    return plain + bytes(PLAINTEXT_SIZE - len(plain))


def open_request(
    blob: bytes,
    box_private: bytes | nacl.public.PrivateKey,
    trackers: Collection[str],
    now: float | None = None,
) -> SourceRequest:
    """Open a sealed request signed by one of ``trackers`` (pinned fingerprints).

    ``CryptoError`` if it is malformed, foreign, not signed by a trusted tracker
    or expired.
    """
    if len(blob) != REQUEST_BLOB_SIZE:
        raise CryptoError(f"sealed request is {len(blob)} bytes, expected {REQUEST_BLOB_SIZE}")
    private = _private(box_private)
    try:
        plain = nacl.public.SealedBox(private).decrypt(bytes(blob))
    except nacl.exceptions.CryptoError:
        raise CryptoError("sealed request does not open: tampered or not for this key") from None
    if len(plain) != PLAINTEXT_SIZE:
        raise CryptoError(f"sealed request plaintext is {len(plain)} bytes")
    n = SourceRequest.body_length(plain)
    end = n + TRACKER_KEY_SIZE + SIGNATURE_SIZE
    if end > len(plain):
        raise CryptoError("sealed request has no room for its signature")
    if any(plain[end:]):
        raise CryptoError("sealed request has non-zero padding")
    body = plain[:n]
    req = SourceRequest.decode(body)
    check_tracker_signature(
        plain[n:end], _DOMAIN + bytes(private.public_key) + body, trackers, "sealed request"
    )
    now = time.time() if now is None else now
    if req.expires < now:
        raise CryptoError(f"sealed request expired {int(now - req.expires)} s ago")
    if req.expires > now + REQUEST_MAX_TTL:
        raise CryptoError("sealed request claims to stay valid for more than a day")
    return req


def tracker_signature(tracker_key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """``tracker key | signature`` (:data:`TRACKER_SIGNATURE_SIZE` bytes) over ``message``:
    what a peer needs to check that a tracker it pins said ``message``."""
    if not isinstance(tracker_key.curve, ec.SECP256R1):
        raise ValueError(f"tracker key is on {tracker_key.curve.name}, not P-256")
    r, s = decode_dss_signature(tracker_key.sign(message, _ECDSA))
    point = tracker_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    return point + r.to_bytes(32, "big") + s.to_bytes(32, "big")


def check_tracker_signature(
    signed: bytes, message: bytes, trackers: Collection[str], what: str
) -> None:
    """``CryptoError`` naming ``what`` unless ``signed`` (from :func:`tracker_signature`)
    is a good signature of ``message`` by one of ``trackers`` (pinned fingerprints)."""
    if len(signed) != TRACKER_SIGNATURE_SIZE:
        raise CryptoError(f"{what} carries a tracker signature of {len(signed)} bytes")
    point, signature = signed[:TRACKER_KEY_SIZE], signed[TRACKER_KEY_SIZE:]
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise CryptoError(f"{what} carries a malformed tracker key") from None
    fingerprint = tracker_fingerprint(key)
    if fingerprint not in trackers:
        raise CryptoError(f"{what} is signed by an untrusted tracker {fingerprint[:16]}")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, _ECDSA)
    except (InvalidSignature, ValueError):
        raise CryptoError(f"{what} has a bad tracker signature") from None


@attrs.define(eq=False)
class SeenRequests:
    """Bounded memory of opened requests, so a captured HELLO cannot be replayed.

    Without it anyone who saw a sealed request could build their own circuit to
    a suspected source and learn from its answer that it holds the box key.
    Entries live until their request expires; when full, new requests are
    refused rather than old ones forgotten. With a ``replay_file`` every entry
    is also written to disk before the request is served and read back on
    start, so a restarted peer refuses what it served before (expiry is by
    this peer's clock, as when the request is opened).
    """

    limit: int = attrs.field(factory=lambda: REQUEST_REPLAY_LIMIT)
    replay_file: ReplayFile | None = attrs.field(default=None, kw_only=True)
    _seen: dict[bytes, int] = attrs.field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.replay_file is not None:
            now = time.time()
            entries = self.replay_file.load(lambda expires: expires >= now, limit=self.limit)
            self._seen = {digest: expires for expires, digest in entries}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, blob: bytes, req: SourceRequest, now: float | None = None) -> None:
        """Record ``blob``; ``CryptoError`` if it was seen before or memory is full."""
        now = time.time() if now is None else now
        digest = hashlib.sha256(blob).digest()
        if digest in self._seen:
            raise CryptoError("sealed request replayed")
        if len(self._seen) >= self.limit:
            self._seen = {d: exp for d, exp in self._seen.items() if exp >= now}
            if len(self._seen) >= self.limit:
                raise CryptoError("too many sealed requests in flight; refusing new ones")
        if self.replay_file is not None:
            self.replay_file.compact(
                len(self._seen), lambda: [(exp, d) for d, exp in self._seen.items() if exp >= now]
            )
            self.replay_file.append(req.expires, digest)  # on disk before it is served
        self._seen[digest] = req.expires
