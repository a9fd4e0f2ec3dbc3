"""Per-hop onion layers on cell bodies: wide-block, chained, tagging-proof.

Each hop of a circuit holds one :class:`OnionLayer` per direction, keyed from
its tracking-code :class:`~anomos.protocol.onion.LayerKeys`. The sender of a
cell *adds* layers, each hop on the way *removes* (forward) or *adds*
(backward) its own, and the receiver removes the rest; every body keeps its
size (:data:`~anomos.protocol.e2e.CELL_BODY`) at every hop.

A layer is the UIV construction of Degabriele and Karadzic ("Rugged
pseudorandom permutations", CRYPTO 2022) as Tor's Counter Galois Onion
(proposal 359) instantiates it, built only from AES and GHASH. A body is a
16-byte head ``L`` and the rest ``R``; with the layer's chain value ``T``::

    add:     h = GMAC(Kh, nonce=T, R)          GHASH of R, masked per T
             L' = AES(K1, L ^ h) ^ h           tweakable block cipher (LRW2)
             R' = R ^ AES-CTR(K2, iv=L')       stream keyed by the new head
    remove:  R = R' ^ AES-CTR(K2, iv=L'); h = GMAC(Kh, T, R); L = AES^-1(K1, L' ^ h) ^ h
    then:    T = BLAKE2b(Kc, counter || L || L')   (both sides, after every cell)

Why this stops tagging, where AES-CTR alone did not: with CTR a relay could
XOR a mark into a cell, honest relays carried it through (XOR commutes with
their layers) and a colluder further on XORed it away, so the circuit
survived exactly when the guess was right. Here a change anywhere in a cell
makes the next honest hop that removes (or adds) its layer produce a random
head: a change in ``L'`` keys the wrong stream, a change in ``R'`` changes
``h``; a random head keys a random stream at the hop after, so the whole cell
is noise from then on, and no later hop can restore it without the honest
hop's keys. Because ``T`` chains over the heads every hop saw, that hop's
chain diverges too, and every later cell of the circuit is noise as well:
the circuit can only fail (the end-to-end AEAD refuses it), never carry a
mark. What remains, a relay breaking a circuit and a colluder watching for
the break, is in docs/threat-model.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import attrs
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anomos.protocol.onion import LayerKeys

#: Bytes of the head that goes through the tweakable block cipher.
HEAD = 16
_PERSON = b"anomos-layer-v1"  # BLAKE2b personalisation (16 bytes at most)


def _xor16(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(HEAD)


@attrs.define(eq=False)
class OnionLayer:
    """One direction of one hop's layer; cells must pass in order, one by one.

    ``key`` (32 bytes) yields the four subkeys; ``start`` (16 bytes) is the
    first chain value. Both ends of a layer hold equal objects and stay in
    step as long as they see the same cells: any other cell desynchronises
    them for good, which is the point.
    """

    key: bytes = attrs.field(repr=False)
    start: bytes = attrs.field(repr=False)
    _tbc: Any = attrs.field(init=False, repr=False)
    _tbc_inverse: Any = attrs.field(init=False, repr=False)
    _stream: AESGCM = attrs.field(init=False, repr=False)
    _hash: AESGCM = attrs.field(init=False, repr=False)
    _chain_key: bytes = attrs.field(init=False, repr=False)
    _chain: bytes = attrs.field(init=False, repr=False)
    _count: int = attrs.field(default=0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if len(self.key) != 32 or len(self.start) != HEAD:
            raise ValueError("a layer needs a 32-byte key and a 16-byte start value")
        k = hashlib.blake2b(b"\x01", key=self.key, person=_PERSON, digest_size=64).digest()
        k2 = hashlib.blake2b(b"\x02", key=self.key, person=_PERSON, digest_size=64).digest()
        block = Cipher(algorithms.AES(k[:32]), modes.ECB())
        self._tbc = block.encryptor()
        self._tbc_inverse = block.decryptor()
        self._stream = AESGCM(k[32:])
        self._hash = AESGCM(k2[:32])
        self._chain_key = k2[32:]
        self._chain = self.start

    @classmethod
    def forward(cls, keys: LayerKeys) -> OnionLayer:
        """The layer on cells travelling from the downloader towards the source."""
        return cls(keys.forward_key, keys.forward_iv)

    @classmethod
    def backward(cls, keys: LayerKeys) -> OnionLayer:
        """The layer on cells travelling from the source back to the downloader."""
        return cls(keys.backward_key, keys.backward_iv)

    def add(self, body: bytearray | memoryview) -> None:
        """Encrypt the next cell in place (``body`` writable, more than 16 bytes)."""
        view = memoryview(body).cast("B")
        if len(view) <= HEAD:
            raise ValueError(f"a cell body must be longer than {HEAD} bytes")
        rest = view[HEAD:]
        head = bytes(view[:HEAD])
        mask = self._hash.encrypt(self._chain, b"", rest)
        out = _xor16(self._tbc.update(_xor16(head, mask)), mask)
        self._xor_stream(out, rest)
        view[:HEAD] = out
        self._advance(head, out)

    def remove(self, body: bytearray | memoryview) -> None:
        """Decrypt the next cell in place; a changed cell comes out as noise."""
        view = memoryview(body).cast("B")
        if len(view) <= HEAD:
            raise ValueError(f"a cell body must be longer than {HEAD} bytes")
        rest = view[HEAD:]
        out = bytes(view[:HEAD])
        self._xor_stream(out, rest)
        mask = self._hash.encrypt(self._chain, b"", rest)
        head = _xor16(self._tbc_inverse.update(_xor16(out, mask)), mask)
        view[:HEAD] = head
        self._advance(head, out)

    def _xor_stream(self, head: bytes, rest: memoryview) -> None:
        """``rest ^= AES-CTR(K2, iv from head)``, through AESGCM: GCM's counter mode with
        the head as nonce, tag discarded; unlike a CTR context it needs no new key
        schedule per cell (about 18 us each here)."""
        n = len(rest)
        scratch = bytearray(n + 16)
        self._stream.encrypt_into(head, rest, None, scratch)
        rest[:] = memoryview(scratch)[:n]

    def _advance(self, head: bytes, out: bytes) -> None:
        """Chain the next cell's tweak to this cell's heads, as this hop saw them."""
        data = self._count.to_bytes(8) + head + out
        self._chain = hashlib.blake2b(data, key=self._chain_key, digest_size=HEAD).digest()
        self._count += 1


def add_all(layers: Iterable[OnionLayer], data: bytes | bytearray | memoryview) -> bytes:
    """A copy of ``data`` with several layers added in the order given (last hop first)."""
    body = bytearray(data)
    for layer in layers:
        layer.add(body)
    return bytes(body)


def remove_all(layers: Iterable[OnionLayer], data: bytes | bytearray | memoryview) -> bytes:
    """A copy of ``data`` with several layers removed in the order given (first hop first)."""
    body = bytearray(data)
    for layer in layers:
        layer.remove(body)
    return bytes(body)
