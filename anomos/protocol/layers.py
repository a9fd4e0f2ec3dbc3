"""Per-hop AES-256-CTR layers on cell bodies (Tor-style layered encryption).

Each hop of a circuit holds one :class:`LayerStream` per direction, keyed from
its tracking-code :class:`~anomos.protocol.onion.LayerKeys`. CTR mode is its own
inverse, so the same ``apply`` adds a layer at one end and removes it at the
other, provided both sides have processed the same number of bytes: cells on a
circuit are delivered in order, and every cell body has the same size, so the
two key streams never drift. Because every hop changes every byte, two relays
of one circuit never see the same bytes of a cell.

The layers give confidentiality from relays only; integrity comes from the
end-to-end AEAD (:mod:`anomos.protocol.e2e`) inside them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from anomos.protocol.onion import LayerKeys


@attrs.define(eq=False)
class LayerStream:
    """One direction of one hop's layer; stateful across cells."""

    key: bytes = attrs.field(repr=False)
    iv: bytes = attrs.field(repr=False)
    _ctx: Any = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if len(self.key) != 32 or len(self.iv) != 16:
            raise ValueError("a layer needs a 32-byte key and a 16-byte IV")
        self._ctx = Cipher(algorithms.AES(self.key), modes.CTR(self.iv)).encryptor()

    @classmethod
    def forward(cls, keys: LayerKeys) -> LayerStream:
        """The layer on cells travelling from the downloader towards the source."""
        return cls(keys.forward_key, keys.forward_iv)

    @classmethod
    def backward(cls, keys: LayerKeys) -> LayerStream:
        """The layer on cells travelling from the source back to the downloader."""
        return cls(keys.backward_key, keys.backward_iv)

    def apply(self, data: bytes | bytearray | memoryview) -> bytes:
        """Add or remove this layer on the next ``len(data)`` bytes of the stream."""
        return self._ctx.update(data)  # type: ignore[no-any-return]

    def apply_in_place(self, buf: bytearray | memoryview) -> None:
        """Like :meth:`apply`, overwriting ``buf`` (writable): no new buffer per cell."""
        self._ctx.update_into(buf, buf)

    def apply_into(self, data: bytes | bytearray | memoryview, out: bytearray) -> None:
        """Like :meth:`apply`, writing into ``out`` (``len(data) + 15`` bytes) without a copy."""
        self._ctx.update_into(data, out)


def apply_all(streams: Iterable[LayerStream], data: bytes | bytearray | memoryview) -> bytes:
    """Apply several layers in the order given (e.g. last hop first, when sending)."""
    out = bytes(data)
    for stream in streams:
        out = stream.apply(out)
    return out
