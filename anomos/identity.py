"""A peer's long-term keys: Ed25519 identity, X25519 onion key, X25519 box key.

Three separate keys because they serve separate purposes and must never be
confused: the identity key *signs* (announces, link authentication, the TLS
certificate it pins), the onion key *peels* tracking codes (many per second, so
it is a raw X25519 scalar for ``cryptography``), the box key *opens* the sealed
requests a source receives. Losing ``identity.json`` means becoming a new peer,
so an existing file is never overwritten: a corrupt one is refused loudly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import attrs
import nacl.public
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from anomos.errors import ConfigError, StorageError
from anomos.fsutil import atomic_write, private_dir

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
#: Format version written in ``identity.json``.
IDENTITY_VERSION = 1
#: A real identity file is ~300 bytes; anything much bigger is not ours.
MAX_IDENTITY_FILE = 16 * 1024


def fingerprint(public: bytes) -> str:
    """Hex SHA-256 of a public key, for display and pinning."""
    return hashlib.sha256(public).hexdigest()


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private scalar."""
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def _check_onion_private(_inst: Any, _attr: Any, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("onion_private must be 32 bytes")


@attrs.frozen
class PeerIdentity:
    """The private keys of one peer; public halves are derived once at creation."""

    signing: nacl.signing.SigningKey = attrs.field(
        repr=False, validator=attrs.validators.instance_of(nacl.signing.SigningKey)
    )
    onion_private: bytes = attrs.field(repr=False, validator=_check_onion_private)
    box: nacl.public.PrivateKey = attrs.field(
        repr=False, validator=attrs.validators.instance_of(nacl.public.PrivateKey)
    )
    identity_public: bytes = attrs.field(init=False, eq=False)
    onion_public: bytes = attrs.field(init=False, eq=False)
    box_public: bytes = attrs.field(init=False, eq=False)

    @identity_public.default
    def _identity_public(self) -> bytes:
        return bytes(self.signing.verify_key)

    @onion_public.default
    def _onion_public(self) -> bytes:
        return x25519_public(self.onion_private)

    @box_public.default
    def _box_public(self) -> bytes:
        return bytes(self.box.public_key)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the identity (signing) key."""
        return fingerprint(self.identity_public)

    # ------------------------------------------------------------------ creation
    @classmethod
    def generate(cls) -> PeerIdentity:
        """Fresh random keys (not saved)."""
        return cls(
            signing=nacl.signing.SigningKey.generate(),
            onion_private=secrets.token_bytes(32),
            box=nacl.public.PrivateKey.generate(),
        )

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> PeerIdentity:
        """The identity kept in ``state_dir/identity.json``, created on first use.

        Raises :class:`ConfigError` when the file exists but cannot be used; it
        is never replaced, since that would silently change who this peer is.
        """
        directory = Path(state_dir)
        path = directory / IDENTITY_FILE
        if path.exists():
            return cls._load(path)
        try:
            private_dir(directory)
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
        identity = cls.generate()
        if not identity._write_new(path):
            # Another process created it between our check and our link: use theirs.
            return cls._load(path)
        log.info("created a new peer identity %s in %s", identity.fingerprint[:16], path)
        return identity

    # ------------------------------------------------------------------ file format
    def to_json(self) -> bytes:
        doc = {
            "version": IDENTITY_VERSION,
            "signing": bytes(self.signing).hex(),
            "onion": self.onion_private.hex(),
            "box": bytes(self.box).hex(),
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> PeerIdentity:
        """Parse ``identity.json`` contents; ``ValueError`` naming the problem."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("not JSON") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("version") != IDENTITY_VERSION:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        keys: dict[str, bytes] = {}
        for name in ("signing", "onion", "box"):
            text = doc.get(name)
            try:
                raw = bytes.fromhex(text) if isinstance(text, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"key {name!r} is missing or not 32 hex-encoded bytes")
            keys[name] = raw
        return cls(
            signing=nacl.signing.SigningKey(keys["signing"]),
            onion_private=keys["onion"],
            box=nacl.public.PrivateKey(keys["box"]),
        )

    @classmethod
    def _load(cls, path: Path) -> PeerIdentity:
        try:
            with path.open("rb") as fh:
                mode = os.fstat(fh.fileno()).st_mode
                data = fh.read(MAX_IDENTITY_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read identity file {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_IDENTITY_FILE:
            raise ConfigError(f"identity file {path} is corrupt (too large); move it away")
        try:
            identity = cls.from_json(data)
        except ValueError as exc:
            raise ConfigError(
                f"identity file {path} is corrupt ({exc}); move it away to create a new identity"
            ) from None
        if mode & 0o077:
            log.warning("identity file %s is readable by others (mode %o)", path, mode & 0o777)
        return identity

    def _write_new(self, path: Path) -> bool:
        """Write atomically with mode 0600; False if ``path`` appeared meanwhile."""
        try:
            return atomic_write(path, self.to_json(), mode=0o600, replace=False)
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
