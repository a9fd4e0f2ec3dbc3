"""Default cipher suite: endpoint X25519 exchange, authenticated by the tracker's material.

The tracker's material is a 32-byte per-circuit *authenticator*, not a key.
The downloader sends an ephemeral X25519 public key; the source answers with
its own and a MAC over the transcript under a key derived from both the DH
secret and the material. Keys are ``HKDF(DH, salt=material, info=transcript)``,
so the tracker (which knows only the material) and relays (which see only the
public halves) cannot derive them. A relay swapping the hello or reply is
caught by the MAC; knowledge of the material is what makes the source's reply
trustworthy, and the downloader proves it implicitly with its first record.

An actively interfering tracker *with* a relay on the path could still sit in
the middle, since the downloader cannot know the source's static key without
learning who the source is; that is the price of the source's anonymity.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any, ClassVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from anomos import hookimpl
from anomos.errors import CryptoError
from anomos.interfaces import SessionKeys

MATERIAL_SIZE = 32
HELLO_SIZE = 32
MAC_SIZE = 32
REPLY_SIZE = 32 + MAC_SIZE
_LABEL = b"anomos-x25519-v1"


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _keys(material: bytes, dh: bytes, hello: bytes, reply_public: bytes) -> tuple[bytes, ...]:
    """(initiator->responder key, responder->initiator key, confirmation key)."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=96,
        salt=material,
        info=_LABEL + b" keys" + hello + reply_public,
    ).derive(dh)
    return okm[0:32], okm[32:64], okm[64:96]


def _confirm(key: bytes, hello: bytes, reply_public: bytes) -> bytes:
    return hmac.new(key, _LABEL + b" reply" + hello + reply_public, "sha256").digest()


def _check_material(material: bytes) -> None:
    if len(material) != MATERIAL_SIZE:
        raise CryptoError(f"x25519 material is {len(material)} bytes, expected {MATERIAL_SIZE}")


def _exchange(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise CryptoError(f"x25519 {what} carries a low-order public key") from None


class X25519Suite:
    """Endpoints agree keys by X25519; the tracker only authenticates them."""

    name: ClassVar[str] = "x25519"

    def tracker_material(self) -> bytes:
        return secrets.token_bytes(MATERIAL_SIZE)

    def initiator_hello(self, material: bytes) -> tuple[Any, bytes]:
        _check_material(material)
        private = X25519PrivateKey.generate()
        hello = _public_bytes(private)
        return (material, private, hello), hello

    def responder_accept(self, material: bytes, hello: bytes) -> tuple[SessionKeys, bytes]:
        _check_material(material)
        if len(hello) != HELLO_SIZE:
            raise CryptoError(f"x25519 hello is {len(hello)} bytes, expected {HELLO_SIZE}")
        hello = bytes(hello)
        private = X25519PrivateKey.generate()
        public = _public_bytes(private)
        dh = _exchange(private, hello, "hello")
        to_responder, to_initiator, confirm = _keys(material, dh, hello, public)
        reply = public + _confirm(confirm, hello, public)
        return SessionKeys(send=to_initiator, recv=to_responder), reply

    def initiator_finish(self, state: Any, reply: bytes) -> SessionKeys:
        material, private, hello = state
        if len(reply) != REPLY_SIZE:
            raise CryptoError(f"x25519 reply is {len(reply)} bytes, expected {REPLY_SIZE}")
        reply = bytes(reply)
        public, mac = reply[:32], reply[32:]
        dh = _exchange(private, public, "reply")
        to_responder, to_initiator, confirm = _keys(material, dh, hello, public)
        if not hmac.compare_digest(mac, _confirm(confirm, hello, public)):
            raise CryptoError("x25519 reply MAC failed: tampered, or the source lacks the material")
        return SessionKeys(send=to_responder, recv=to_initiator)


@hookimpl
def anomos_register_cipher_suites(registry: Any) -> None:
    registry.add(X25519Suite.name, X25519Suite)
