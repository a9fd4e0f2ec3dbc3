"""Cipher suite ``classic``: the tracker's material is the session key, as in Anomos.

Kept for comparison and for networks that trust their tracker. Unlike the
original (one AES key and IV for both directions, no MAC), each circuit still
gets fresh per-direction keys, ``HKDF(material, salt=nonces)``, from nonces the
endpoints exchange, and the source's reply carries a MAC proving it knows the
material. The tracker, knowing the material, can derive every key: choose
``x25519`` unless that is acceptable.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any, ClassVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from anomos import hookimpl
from anomos.errors import CryptoError
from anomos.interfaces import SessionKeys

MATERIAL_SIZE = 32
NONCE_SIZE = 32
MAC_SIZE = 32
REPLY_SIZE = NONCE_SIZE + MAC_SIZE
_LABEL = b"anomos-classic-v1"


def _keys(material: bytes, hello: bytes, nonce: bytes) -> tuple[bytes, ...]:
    """(initiator->responder key, responder->initiator key, confirmation key)."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=96, salt=hello + nonce, info=_LABEL + b" keys"
    ).derive(material)
    return okm[0:32], okm[32:64], okm[64:96]


def _confirm(key: bytes, hello: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, _LABEL + b" reply" + hello + nonce, "sha256").digest()


def _check_material(material: bytes) -> None:
    if len(material) != MATERIAL_SIZE:
        raise CryptoError(f"classic material is {len(material)} bytes, expected {MATERIAL_SIZE}")


class ClassicSuite:
    """The tracker chooses the key; endpoints only add fresh nonces."""

    name: ClassVar[str] = "classic"

    def tracker_material(self) -> bytes:
        return secrets.token_bytes(MATERIAL_SIZE)

    def initiator_hello(self, material: bytes) -> tuple[Any, bytes]:
        _check_material(material)
        hello = secrets.token_bytes(NONCE_SIZE)
        return (material, hello), hello

    def responder_accept(self, material: bytes, hello: bytes) -> tuple[SessionKeys, bytes]:
        _check_material(material)
        if len(hello) != NONCE_SIZE:
            raise CryptoError(f"classic hello is {len(hello)} bytes, expected {NONCE_SIZE}")
        hello = bytes(hello)
        nonce = secrets.token_bytes(NONCE_SIZE)
        to_responder, to_initiator, confirm = _keys(material, hello, nonce)
        reply = nonce + _confirm(confirm, hello, nonce)
        return SessionKeys(send=to_initiator, recv=to_responder), reply

    def initiator_finish(self, state: Any, reply: bytes) -> SessionKeys:
        material, hello = state
        if len(reply) != REPLY_SIZE:
            raise CryptoError(f"classic reply is {len(reply)} bytes, expected {REPLY_SIZE}")
        reply = bytes(reply)
        nonce, mac = reply[:NONCE_SIZE], reply[NONCE_SIZE:]
        to_responder, to_initiator, confirm = _keys(material, hello, nonce)
        if not hmac.compare_digest(mac, _confirm(confirm, hello, nonce)):
            raise CryptoError(
                "classic reply MAC failed: tampered, or the source lacks the material"
            )
        return SessionKeys(send=to_responder, recv=to_initiator)


@hookimpl
def anomos_register_cipher_suites(registry: Any) -> None:
    registry.add(ClassicSuite.name, ClassicSuite)
