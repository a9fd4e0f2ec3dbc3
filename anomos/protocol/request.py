"""The request the tracker seals to a source: what to serve and how to key it.

The downloader carries the blob in its HELLO cell without being able to read
it (it does not know who the source is, only the tracker does). A SealedBox
(ephemeral X25519 + XSalsa20-Poly1305) to the source's box key keeps relays
and the downloader out, and refuses any modified blob. Every blob has the
same size, :data:`REQUEST_BLOB_SIZE`, so its length says nothing about the
torrent or the cipher suite.

Plaintext layout, zero padded to ``REQUEST_BLOB_SIZE - SEAL_OVERHEAD``::

    version u8 | len u8 | infohash | len u8 | suite (ASCII) | len u16 | material | expires u64
"""

from __future__ import annotations

import hashlib
import re
import struct
import time

import attrs
import nacl.bindings
import nacl.exceptions
import nacl.public

from anomos.errors import CryptoError

VERSION = 1
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
        """The zero-padded plaintext of exactly ``PLAINTEXT_SIZE`` bytes."""
        suite = self.suite.encode("ascii")
        body = b"".join(
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
        return body + bytes(PLAINTEXT_SIZE - len(body))

    @classmethod
    def decode(cls, plain: bytes) -> SourceRequest:
        """Strict inverse of :meth:`encode`; ``CryptoError`` naming the bad field."""
        if len(plain) != PLAINTEXT_SIZE:
            raise CryptoError(f"sealed request plaintext is {len(plain)} bytes")
        if plain[0] != VERSION:
            raise CryptoError(f"sealed request has unknown version {plain[0]}")
        pos = 1
        fields: list[bytes] = []
        for width in (1, 1, 2):
            n = int.from_bytes(plain[pos : pos + width], "big")
            pos += width
            if pos + n > len(plain):
                raise CryptoError("sealed request has a field longer than the blob")
            fields.append(plain[pos : pos + n])
            pos += n
        if pos + _EXPIRES.size > len(plain):
            raise CryptoError("sealed request is truncated")
        (expires,) = _EXPIRES.unpack_from(plain, pos)
        if any(plain[pos + _EXPIRES.size :]):
            raise CryptoError("sealed request has non-zero padding")
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


def seal_request(req: SourceRequest, box_public: bytes | nacl.public.PublicKey) -> bytes:
    """Seal ``req`` to a source's box key: exactly :data:`REQUEST_BLOB_SIZE` bytes."""
    blob = nacl.public.SealedBox(_public(box_public)).encrypt(req.encode())
    assert len(blob) == REQUEST_BLOB_SIZE
    return bytes(blob)


def open_request(
    blob: bytes, box_private: bytes | nacl.public.PrivateKey, now: float | None = None
) -> SourceRequest:
    """Open a sealed request; ``CryptoError`` if it is malformed, foreign or expired."""
    if len(blob) != REQUEST_BLOB_SIZE:
        raise CryptoError(f"sealed request is {len(blob)} bytes, expected {REQUEST_BLOB_SIZE}")
    try:
        plain = nacl.public.SealedBox(_private(box_private)).decrypt(bytes(blob))
    except nacl.exceptions.CryptoError:
        raise CryptoError("sealed request does not open: tampered or not for this key") from None
    req = SourceRequest.decode(plain)
    now = time.time() if now is None else now
    if req.expires < now:
        raise CryptoError(f"sealed request expired {int(now - req.expires)} s ago")
    if req.expires > now + REQUEST_MAX_TTL:
        raise CryptoError("sealed request claims to stay valid for more than a day")
    return req


@attrs.define(eq=False)
class SeenRequests:
    """Bounded memory of opened requests, so a captured HELLO cannot be replayed.

    Without it anyone who saw a sealed request could build their own circuit to
    a suspected source and learn from its answer that it holds the box key.
    Entries live until their request expires; when full, new requests are
    refused rather than old ones forgotten.
    """

    limit: int = attrs.field(factory=lambda: REQUEST_REPLAY_LIMIT)
    _seen: dict[bytes, int] = attrs.field(factory=dict, init=False, repr=False)

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
        self._seen[digest] = req.expires
