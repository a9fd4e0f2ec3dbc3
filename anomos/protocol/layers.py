"""Per-hop onion layers on cell bodies: wide-block, chained, tagging-proof.

Each hop of a circuit holds one :class:`OnionLayer` per direction, keyed from
its tracking-code :class:`~anomos.protocol.onion.LayerKeys`. The sender of a
cell *adds* layers, each hop on the way *removes* (forward) or *adds*
(backward) its own, and the receiver removes the rest; every body keeps its
size at every hop. A layer works on a body of any length over 16 bytes (both
cell sizes, :data:`~anomos.protocol.e2e.SHORT_BODY` and
:data:`~anomos.protocol.e2e.CELL_BODY`, use the same layer and chain); the
GHASH covers the rest *and its length*, so a cell padded or cut on the way is
a changed cell like any other: noise from the next honest hop on.

A layer is the UIV construction of Degabriele and Karadzic ("Rugged
pseudorandom permutations", CRYPTO 2022) as Tor's Counter Galois Onion
(proposal 359) instantiates it, built only from AES and GHASH. A body is a
16-byte head ``L`` and the rest ``R``; with the layer's chain value ``T``::

    add:     h = GMAC(Kh, nonce=T, R)          GHASH of R, masked per T
             L' = AES(K1, L ^ h) ^ h           tweakable block cipher (LRW2)
             R' = R ^ AES-CTR(K2, iv=N(L'))    stream keyed by the new head
    remove:  R = R' ^ AES-CTR(K2, iv=N(L')); h = GMAC(Kh, T, R); L = AES^-1(K1, L' ^ h) ^ h
    then:    T = BLAKE2b(Kc, counter || L || L')   (both sides, after every cell)

The counter-mode stream is AES-GCM's (``AESGCM.encrypt_into`` with the 96-bit
nonce ``N(L') = BLAKE2b(Kn, L')[:12]``, tag discarded into the 16 spare bytes
of the output): a long-lived key schedule, where a new CTR context per cell
would cost more than the stream (and OpenSSL's fast GCM path wants 96-bit
nonces); ``N`` keeps every bit of ``L'`` in the nonce.

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
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anomos.protocol.onion import LayerKeys

#: Bytes of the head that goes through the tweakable block cipher.
HEAD = 16
_PERSON = b"anomos-layer-v1"  # BLAKE2b personalisation (16 bytes at most)


@attrs.define(eq=False)
class OnionLayer:
    """One direction of one hop's layer; cells must pass in order, one by one.

    ``key`` (32 bytes) yields the subkeys; ``start`` (16 bytes) is the first
    chain value. Both ends of a layer hold equal objects and stay in step as
    long as they see the same cells: any other cell desynchronises them for
    good, which is the point. The cipher contexts (about 6.4 KB: two AES-GCM
    keys with their GHASH tables, one AES block context) are made on the
    first cell, so a circuit that never carries one costs only its keys.
    """

    key: bytes = attrs.field(repr=False)
    start: bytes = attrs.field(repr=False)
    _subkeys: bytes = attrs.field(init=False, repr=False)
    _gcm: tuple[AESGCM, AESGCM] | None = attrs.field(default=None, init=False, repr=False)
    _tbc: Any = attrs.field(default=None, init=False, repr=False)
    _tbc_inverse: Any = attrs.field(default=None, init=False, repr=False)
    _chain: bytes = attrs.field(init=False, repr=False)
    _count: int = attrs.field(default=0, init=False, repr=False)
    #: Keyed BLAKE2b states for the nonce and the chain, copied per cell (no key set-up).
    _nonce_hash: Any = attrs.field(default=None, init=False, repr=False)
    _chain_hash: Any = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if len(self.key) != 32 or len(self.start) != HEAD:
            raise ValueError("a layer needs a 32-byte key and a 16-byte start value")
        # K1 (head) | K2 (stream) | Kh (GMAC) | Kc (chain) | Kn (nonce), 32 bytes each
        self._subkeys = b"".join(
            hashlib.blake2b(bytes([i]), key=self.key, person=_PERSON, digest_size=64).digest()
            for i in (1, 2, 3)
        )[:160]
        self._chain = self.start

    def _contexts(self) -> tuple[AESGCM, AESGCM]:
        """(stream, hash) AES-GCM contexts, made on first use."""
        if self._gcm is None:
            self._gcm = (AESGCM(self._subkeys[32:64]), AESGCM(self._subkeys[64:96]))
            self._nonce_hash = hashlib.blake2b(key=self._subkeys[128:160], digest_size=12)
            self._chain_hash = hashlib.blake2b(key=self._subkeys[96:128], digest_size=HEAD)
        return self._gcm

    def _block(self) -> Cipher[Any]:
        return Cipher(algorithms.AES(self._subkeys[:32]), modes.ECB())

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
        out = bytearray(len(body) + HEAD)
        self.add_into(body, out)
        body[:] = memoryview(out)[: len(body)]

    def remove(self, body: bytearray | memoryview) -> None:
        """Decrypt the next cell in place; a changed cell comes out as noise."""
        out = bytearray(len(body) + HEAD)
        self.remove_into(body, out)
        body[:] = memoryview(out)[: len(body)]

    def add_into(self, body: bytes | bytearray | memoryview, out: bytearray | memoryview) -> None:
        """Encrypt the next cell into ``out[:len(body)]``; ``out`` has at least 16 bytes
        more (scratch; a buffer of the biggest cell serves both sizes)."""
        src, dst = _views(body, out)
        tbc = self._tbc
        if tbc is None:
            self._contexts()
            tbc = self._tbc = self._block().encryptor()
        stream, hash_ = self._gcm  # type: ignore[misc]
        # (Once per cell per hop: written out, without helper calls, on purpose.)
        head = bytes(src[:HEAD])
        rest = src[HEAD:]
        mask = int.from_bytes(hash_.encrypt(self._chain, b"", rest))
        masked = (int.from_bytes(head) ^ mask).to_bytes(HEAD)
        new_head = (int.from_bytes(tbc.update(masked)) ^ mask).to_bytes(HEAD)
        nonce = self._nonce_hash.copy()
        nonce.update(new_head)
        stream.encrypt_into(nonce.digest(), rest, None, dst[HEAD:])
        dst[:HEAD] = new_head
        chain = self._chain_hash.copy()
        chain.update(self._count.to_bytes(8) + head + new_head)
        self._chain = chain.digest()
        self._count += 1

    def remove_into(
        self, body: bytes | bytearray | memoryview, out: bytearray | memoryview
    ) -> None:
        """Decrypt the next cell into ``out[:len(body)]``; ``out`` as for :meth:`add_into`."""
        src, dst = _views(body, out)
        tbc = self._tbc_inverse
        if tbc is None:
            self._contexts()
            tbc = self._tbc_inverse = self._block().decryptor()
        stream, hash_ = self._gcm  # type: ignore[misc]
        new_head = bytes(src[:HEAD])
        nonce = self._nonce_hash.copy()
        nonce.update(new_head)
        stream.encrypt_into(nonce.digest(), src[HEAD:], None, dst[HEAD:])
        mask = int.from_bytes(hash_.encrypt(self._chain, b"", dst[HEAD : len(src)]))
        masked = (int.from_bytes(new_head) ^ mask).to_bytes(HEAD)
        head = (int.from_bytes(tbc.update(masked)) ^ mask).to_bytes(HEAD)
        dst[:HEAD] = head
        chain = self._chain_hash.copy()
        chain.update(self._count.to_bytes(8) + head + new_head)
        self._chain = chain.digest()
        self._count += 1


def _views(
    body: bytes | bytearray | memoryview, out: bytearray | memoryview
) -> tuple[memoryview, memoryview]:
    src = memoryview(body).cast("B")
    n = len(src)
    if n <= HEAD:
        raise ValueError(f"a cell body must be longer than {HEAD} bytes")
    if len(out) < n + HEAD:
        raise ValueError("the output of a layer must be at least 16 bytes longer than the cell")
    return src, memoryview(out)[: n + HEAD]


def add_layers(layers: Iterable[OnionLayer], body: bytes | bytearray | memoryview) -> memoryview:
    """``body`` with several layers added in the order given (last hop first), anew."""
    return _through(layers, body, OnionLayer.add_into)


def remove_layers(layers: Iterable[OnionLayer], body: bytes | bytearray | memoryview) -> memoryview:
    """``body`` with several layers removed in the order given (first hop first), anew."""
    return _through(layers, body, OnionLayer.remove_into)


def _through(
    layers: Iterable[OnionLayer],
    body: bytes | bytearray | memoryview,
    step: Callable[[OnionLayer, memoryview, bytearray | memoryview], None],
) -> memoryview:
    view = memoryview(body).cast("B")
    n = len(view)
    for layer in layers:
        out = bytearray(n + HEAD)  # one fresh buffer per layer: no copy back, nothing shared
        step(layer, view, out)
        view = memoryview(out)[:n]
    return view


def add_all(layers: Iterable[OnionLayer], data: bytes | bytearray | memoryview) -> bytes:
    """A copy of ``data`` with several layers added in the order given (last hop first)."""
    return bytes(add_layers(layers, data))


def remove_all(layers: Iterable[OnionLayer], data: bytes | bytearray | memoryview) -> bytes:
    """A copy of ``data`` with several layers removed in the order given (first hop first)."""
    return bytes(remove_layers(layers, data))
