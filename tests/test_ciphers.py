"""Cipher suites: both ends agree, the tracker cannot (x25519), tampering is refused."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from anomos.errors import CryptoError
from anomos.interfaces import CipherSuite, SessionKeys
from anomos.pluginmanager import DEFAULT_PLUGINS, Plugins
from anomos.protocol.e2e import (
    DATA,
    E2EChannel,
    decode_hello,
    decode_reply,
    encode_hello,
    encode_reply,
)

SUITES = ["x25519", "classic"]


def handshake(suite: CipherSuite, material: bytes) -> tuple[SessionKeys, SessionKeys, bytes, bytes]:
    state, hello = suite.initiator_hello(material)
    _, hello, _ = decode_hello(encode_hello(b"blob", hello))  # as it travels in the first cell
    src_keys, reply = suite.responder_accept(material, hello)
    reply = decode_reply(encode_reply(reply))
    return suite.initiator_finish(state, reply), src_keys, hello, reply


def test_both_suites_are_default_plugins(plugins: Plugins) -> None:
    assert "anomos.plugins.ciphers.x25519" in DEFAULT_PLUGINS
    assert "anomos.plugins.ciphers.classic" in DEFAULT_PLUGINS
    for name in SUITES:
        suite = plugins.cipher_suite(name)
        assert isinstance(suite, CipherSuite)
        assert suite.name == name


@pytest.mark.parametrize("name", SUITES)
def test_ends_derive_matching_keys(plugins: Plugins, name: str) -> None:
    suite = plugins.cipher_suite(name)
    material = suite.tracker_material()
    assert len(material) == 32
    down, src, _, _ = handshake(suite, material)
    assert down.send == src.recv and down.recv == src.send
    assert down.send != down.recv
    assert len(down.send) == len(down.recv) == 32
    a, b = E2EChannel(down), E2EChannel(src)
    assert b.open(a.seal(DATA, b"ping")) == (DATA, b"ping")
    assert a.open(b.seal(DATA, b"pong")) == (DATA, b"pong")
    # Every circuit gets fresh keys, even with the same material.
    again, _, _, _ = handshake(suite, material)
    assert again.send != down.send


def hkdf_guesses(material: bytes, hello: bytes, reply: bytes) -> set[bytes]:
    """Keys someone holding only the material (and the wire bytes) might derive."""
    guesses = {material, hashlib.sha256(material).digest()}
    salts = [None, material, hello, reply, hello + reply[:32], hello + reply]
    infos = [b"", b"anomos-x25519-v1 keys" + hello + reply[:32], b"anomos-classic-v1 keys"]
    for ikm in (material, hello, reply[:32]):
        for salt in salts:
            for info in infos:
                okm = HKDF(hashes.SHA256(), 96, salt, info).derive(ikm)
                guesses |= {okm[0:32], okm[32:64], okm[64:96]}
    guesses.add(hmac.new(material, hello + reply, "sha256").digest())
    return guesses


def test_x25519_keys_are_not_derivable_from_the_material(plugins: Plugins) -> None:
    suite = plugins.cipher_suite("x25519")
    material = suite.tracker_material()
    down, _, hello, reply = handshake(suite, material)
    guesses = hkdf_guesses(material, hello, reply)
    assert down.send not in guesses and down.recv not in guesses


def test_classic_keys_are_derivable_by_the_tracker(plugins: Plugins) -> None:
    """The documented weakness of ``classic``, shown so nobody mistakes it for x25519."""
    suite = plugins.cipher_suite("classic")
    material = suite.tracker_material()
    down, _, hello, reply = handshake(suite, material)
    assert down.send in hkdf_guesses(material, hello, reply)


@pytest.mark.parametrize("name", SUITES)
def test_tampered_hello_or_reply_refused(plugins: Plugins, name: str) -> None:
    suite = plugins.cipher_suite(name)
    material = suite.tracker_material()
    state, hello = suite.initiator_hello(material)
    # A relay changing the hello: the source answers, but the downloader refuses the reply.
    for pos in (0, 17, len(hello) - 1):
        bad = bytearray(hello)
        bad[pos] ^= 0x04
        try:
            _, reply = suite.responder_accept(material, bytes(bad))
        except CryptoError:
            continue  # refused at once (e.g. a low-order key): also fine
        with pytest.raises(CryptoError, match="MAC failed"):
            suite.initiator_finish(state, reply)
    _, reply = suite.responder_accept(material, hello)
    for pos in range(len(reply)):
        bad = bytearray(reply)
        bad[pos] ^= 0x01
        with pytest.raises(CryptoError):
            suite.initiator_finish(state, bytes(bad))
    assert suite.initiator_finish(state, reply).send  # the genuine reply still works


@pytest.mark.parametrize("name", SUITES)
def test_source_without_the_material_is_refused(plugins: Plugins, name: str) -> None:
    suite = plugins.cipher_suite(name)
    state, hello = suite.initiator_hello(suite.tracker_material())
    _, reply = suite.responder_accept(suite.tracker_material(), hello)
    with pytest.raises(CryptoError, match="lacks the material"):
        suite.initiator_finish(state, reply)


@pytest.mark.parametrize("name", SUITES)
def test_wrong_sizes_refused(plugins: Plugins, name: str) -> None:
    suite = plugins.cipher_suite(name)
    material = suite.tracker_material()
    state, hello = suite.initiator_hello(material)
    with pytest.raises(CryptoError, match="hello is"):
        suite.responder_accept(material, hello + b"x")
    with pytest.raises(CryptoError, match="reply is"):
        suite.initiator_finish(state, b"short")
    with pytest.raises(CryptoError, match="material is"):
        suite.initiator_hello(material[:16])
    with pytest.raises(CryptoError, match="material is"):
        suite.responder_accept(material + b"!", hello)


def test_x25519_low_order_keys_refused(plugins: Plugins) -> None:
    suite = plugins.cipher_suite("x25519")
    material = suite.tracker_material()
    state, _ = suite.initiator_hello(material)
    with pytest.raises(CryptoError, match="low-order"):
        suite.responder_accept(material, bytes(32))
    with pytest.raises(CryptoError, match="low-order"):
        suite.initiator_finish(state, bytes(64))
