"""Cell crypto benchmarks, in this process on one core: what one hop spends per cell.

* the per-hop onion layer (:class:`~anomos.protocol.layers.OnionLayer`),
  adding and removing, against plain AES-256-CTR over the same cell (the
  malleable layer anomos used before, one long-lived stream: the floor any
  per-hop layer is compared with);
* the end-to-end AEAD sealing one record, for scale.

Each figure is the best of ``repeats`` timings of ``cells`` cells: many
timings shorter than a scheduler time slice, so that some run undisturbed by
other programs, as a per-core cost should be measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from anomos.interfaces import SessionKeys
from anomos.protocol import e2e
from anomos.protocol.layers import OnionLayer, add_layers, remove_layers


def _seconds_per_call(fn: Callable[[], object], cells: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(cells):
            fn()
        best = min(best, (time.perf_counter() - t0) / cells)
    return best


def cells_section(*, cells: int = 10, repeats: int = 300) -> dict[str, Any]:
    """Section ``cells`` of the result: seconds per cell and bytes per second per core."""
    body = bytearray(os.urandom(e2e.CELL_BODY))
    key, start = os.urandom(32), os.urandom(16)
    ctr = Cipher(algorithms.AES(key), modes.CTR(start)).encryptor()
    layer = OnionLayer(key, start)
    channel = e2e.E2EChannel(SessionKeys(send=os.urandom(32), recv=os.urandom(32)))
    data = bytes(e2e.MAX_RECORD_DATA)
    timings = {
        # What a relay did per cell before issue 11: one long-lived CTR stream, new bytes.
        "aes_ctr": lambda: ctr.update(body),
        # What a relay does per cell: its layer into a fresh buffer (the link sends it later).
        "layer_add": lambda: add_layers((layer,), body),
        "layer_remove": lambda: remove_layers((layer,), body),
        "e2e_seal": lambda: channel.seal_mutable(e2e.DATA, data),
    }
    out: dict[str, Any] = {"cell": e2e.CELL_BODY}
    for name, fn in timings.items():
        seconds = _seconds_per_call(fn, cells, repeats)
        out[name] = {"seconds": seconds, "rate": e2e.CELL_BODY / seconds}
    return out
