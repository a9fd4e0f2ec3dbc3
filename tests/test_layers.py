"""The per-hop onion layer: round trips, constant sizes, and no tag survives an honest hop.

The tagging attack: a relay XORs a mark into a cell, the honest relays after
it carry the mark, a colluding relay further on XORs it away, and the circuit
goes on exactly when the two are on the same circuit. Here each test changes
one byte (or a cell's size, short to full or back) at one hop, lets a colluder
two hops on try to undo the change, and checks that the changed cell and every
cell after it are lost for good. Cells of both sizes share one chain.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import pytest

from anomos.protocol.e2e import BODY_SIZES, CELL_BODY, SHORT_BODY
from anomos.protocol.layers import HEAD, OnionLayer, add_all, remove_all
from anomos.protocol.onion import LayerKeys

HOPS = 5  # four relays and the source
CELLS = 6
TAGGED = 2  # index of the cell that gets the mark
MARK = 0x5A
#: Byte positions to mark: the head (first, last byte), the rest (first, middle, last).
POSITIONS = [0, HEAD - 1, HEAD, -2, -1]  # -2: the middle of the cell


def at(pos: int, size: int) -> int:
    """A position of POSITIONS in a cell of ``size`` bytes."""
    return {-2: size // 2, -1: size - 1}.get(pos, pos)


def mixed_cells(tagged_size: int) -> list[bytes]:
    """CELLS random bodies of both sizes, as a circuit carries them (full and short
    in turn), the TAGGED one of ``tagged_size``."""
    sizes = [BODY_SIZES[n % 2] for n in range(CELLS)]
    sizes[TAGGED] = tagged_size
    return [os.urandom(size) for size in sizes]


def random_keys() -> list[LayerKeys]:
    return [
        LayerKeys(os.urandom(32), os.urandom(16), os.urandom(32), os.urandom(16))
        for _ in range(HOPS)
    ]


def agreement(a: bytes, b: bytes) -> float:
    """Share of equal bytes: about 1/256 for unrelated cells."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def forward(
    keys: list[LayerKeys], cells: list[bytes], tamper: int | None, pos: int, colluder: int | None
) -> list[bytes]:
    """Downloader -> hops 0..HOPS-1; hop ``tamper`` marks cell TAGGED after removing its
    layer, hop ``colluder`` XORs the mark again after removing its own. What the
    source (the last hop) gets, cell by cell."""
    sender = [OnionLayer.forward(k) for k in reversed(keys)]
    hops = [OnionLayer.forward(k) for k in keys]
    out = []
    for n, cell in enumerate(cells):
        body = bytearray(add_all(sender, cell))
        for i, layer in enumerate(hops):
            assert len(body) == len(cell)
            layer.remove(body)
            if n == TAGGED and i in (tamper, colluder):
                body[at(pos, len(body))] ^= MARK
        out.append(bytes(body))
    return out


def backward(
    keys: list[LayerKeys], cells: list[bytes], tamper: int | None, pos: int, colluder: int | None
) -> list[bytes]:
    """Source (hop HOPS-1) -> relays HOPS-2..0 -> downloader; hop ``tamper`` marks cell
    TAGGED after adding its layer, hop ``colluder`` XORs the mark after adding its own.
    What the downloader gets once it removed every layer."""
    hops = [OnionLayer.backward(k) for k in keys]
    receiver = [OnionLayer.backward(k) for k in keys]
    out = []
    for n, cell in enumerate(cells):
        body = bytearray(cell)
        for i in reversed(range(HOPS)):
            hops[i].add(body)
            assert len(body) == len(cell)
            if n == TAGGED and i in (tamper, colluder):
                body[at(pos, len(body))] ^= MARK
        out.append(remove_all(receiver, body))
    return out


def assert_lost_from_the_tag(cells: list[bytes], got: list[bytes], *, noise: bool) -> None:
    assert got[:TAGGED] == cells[:TAGGED], "cells before the mark must arrive intact"
    for n in range(TAGGED, CELLS):
        assert got[n] != cells[n], f"cell {n} survived the mark"
        if noise:
            assert agreement(got[n], cells[n]) < 0.02, f"cell {n} is not noise"


def test_layers_round_trip_with_constant_sizes_both_ways() -> None:
    keys = random_keys()
    for cells in (
        [os.urandom(CELL_BODY) for _ in range(CELLS)],
        [os.urandom(SHORT_BODY) for _ in range(CELLS)],
        mixed_cells(SHORT_BODY),  # one chain across both sizes
    ):
        assert forward(keys, cells, None, 0, None) == cells
        assert backward(keys, cells, None, 0, None) == cells
    # A zero cell looks random after one layer, and differently every time.
    layer = OnionLayer.forward(keys[0])
    first, second = add_all([layer], bytes(CELL_BODY)), add_all([layer], bytes(CELL_BODY))
    assert first != second and agreement(first, bytes(CELL_BODY)) < 0.02
    with pytest.raises(ValueError):
        OnionLayer(os.urandom(16), os.urandom(16))
    with pytest.raises(ValueError):
        layer.add(bytearray(HEAD))


@pytest.mark.parametrize("size", BODY_SIZES)
@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("tamper", range(HOPS - 1))
def test_a_mark_at_any_hop_forward_loses_the_rest_of_the_circuit(
    tamper: int, pos: int, size: int
) -> None:
    keys = random_keys()
    cells = mixed_cells(size)
    colluder = tamper + 2 if tamper + 2 < HOPS else None
    got = forward(keys, cells, tamper, pos, colluder)
    # With two hops or more after the mark (the honest one and another) everything from
    # the marked cell on is noise; with only the source after it, the source's end-to-end
    # AEAD refuses those cells (their heads are random).
    assert_lost_from_the_tag(cells, got, noise=tamper + 2 < HOPS)
    for n in range(TAGGED, CELLS):
        assert got[n][:HEAD] != cells[n][:HEAD]


@pytest.mark.parametrize("size", BODY_SIZES)
@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("tamper", range(HOPS - 1))
def test_a_mark_at_any_hop_backward_loses_the_rest_of_the_circuit(
    tamper: int, pos: int, size: int
) -> None:
    keys = random_keys()
    cells = mixed_cells(size)
    colluder = tamper - 2 if tamper >= 2 else None
    got = backward(keys, cells, tamper, pos, colluder)
    # The downloader removes the marked hop's layer and then the source's, at least.
    assert_lost_from_the_tag(cells, got, noise=True)


@pytest.mark.parametrize("size", BODY_SIZES)
@pytest.mark.parametrize("pos", POSITIONS)
def test_the_hop_after_the_mark_outputs_a_random_head_from_the_marked_cell_on(
    pos: int, size: int
) -> None:
    """Right after one honest hop, no cell from the marked one on can be recovered."""

    def mark(body: bytearray) -> None:
        body[at(pos, len(body))] ^= MARK

    assert_random_heads_after(mark, mixed_cells(size))


def assert_random_heads_after(tamper: Callable[[bytearray], None], cells: list[bytes]) -> None:
    """A first hop applies ``tamper`` to cell TAGGED, an honest hop removes its layer:
    from that cell on, every head it outputs differs from the untampered one's."""
    keys = random_keys()[:2]
    sender = [OnionLayer.forward(k) for k in reversed(keys)]
    first, honest = OnionLayer.forward(keys[0]), OnionLayer.forward(keys[1])
    reference = OnionLayer.forward(keys[1])
    for n, cell in enumerate(cells):
        body = bytearray(add_all(sender, cell))
        first.remove(body)
        clean = bytearray(body)
        if n == TAGGED:
            tamper(body)
        honest.remove(body)
        reference.remove(clean)
        if n < TAGGED:
            assert body == clean
        else:
            # The head keys the next hop's stream: a random head makes the cell noise there.
            assert body[:HEAD] != clean[:HEAD]


# ----------------------------------------------------------------------------- cell sizes


def resize(body: bytearray, cut: dict[str, bytes]) -> None:
    """What a hostile relay does to a cell's size: a short body padded to a full one
    (random bytes), a full one cut to a short one (what it cut is kept in ``cut``,
    for its colluder)."""
    if len(body) == SHORT_BODY:
        body.extend(os.urandom(CELL_BODY - SHORT_BODY))
    else:
        cut["tail"] = bytes(body[SHORT_BODY:])
        del body[SHORT_BODY:]


def restore(body: bytearray, cut: dict[str, bytes]) -> None:
    """The colluder puts the size back: the best it can do, with what relay 1 cut."""
    if len(body) == CELL_BODY:
        del body[SHORT_BODY:]
    else:
        body.extend(cut["tail"])


def sized_forward(keys: list[LayerKeys], cells: list[bytes], tamper: int) -> list[bytes]:
    """As :func:`forward`, hop ``tamper`` changing cell TAGGED's size, hop ``tamper + 2``
    changing it back, as two relays around an honest one would to link a circuit."""
    sender = [OnionLayer.forward(k) for k in reversed(keys)]
    hops = [OnionLayer.forward(k) for k in keys]
    out, cut = [], {}
    for n, cell in enumerate(cells):
        body = bytearray(add_all(sender, cell))
        for i, layer in enumerate(hops):
            layer.remove(body)
            if n == TAGGED and i == tamper:
                resize(body, cut)
            elif n == TAGGED and i == tamper + 2:
                restore(body, cut)
        out.append(bytes(body))
    return out


def sized_backward(keys: list[LayerKeys], cells: list[bytes], tamper: int) -> list[bytes]:
    """As :func:`backward`, hop ``tamper`` resizing cell TAGGED, hop ``tamper - 2`` undoing it."""
    hops = [OnionLayer.backward(k) for k in keys]
    receiver = [OnionLayer.backward(k) for k in keys]
    out, cut = [], {}
    for n, cell in enumerate(cells):
        body = bytearray(cell)
        for i in reversed(range(HOPS)):
            hops[i].add(body)
            if n == TAGGED and i == tamper:
                resize(body, cut)
            elif n == TAGGED and i == tamper - 2:
                restore(body, cut)
        out.append(remove_all(receiver, body))
    return out


@pytest.mark.parametrize("size", BODY_SIZES)
@pytest.mark.parametrize("tamper", range(HOPS - 2))
def test_a_cell_padded_or_cut_and_restored_across_an_honest_hop_loses_the_circuit(
    tamper: int, size: int
) -> None:
    """The size class as a tag: relay ``tamper`` pads a short cell to full (or cuts a full
    one short), its colluder two hops on puts the size back. The GHASH of the honest
    hop between covers the rest's length: from that cell on, everything is noise."""
    keys = random_keys()
    cells = mixed_cells(size)
    got = sized_forward(keys, cells, tamper)
    assert [len(c) for c in got] == [len(c) for c in cells]
    assert_lost_from_the_tag(cells, got, noise=True)
    # The other way: relays 3 and 2 resize, relays 1 and 0 restore.
    back = sized_backward(keys, cells, HOPS - 2 - tamper % 2)
    assert [len(c) for c in back] == [len(c) for c in cells]
    assert_lost_from_the_tag(cells, back, noise=True)


@pytest.mark.parametrize("size", BODY_SIZES)
def test_the_hop_after_a_resized_cell_outputs_a_random_head(size: int) -> None:
    """Even padding with the very bytes a cut removed (or cutting padding off) at the next
    hop cannot repair what one honest hop did with the resized cell."""
    cut: dict[str, bytes] = {}
    assert_random_heads_after(lambda body: resize(body, cut), mixed_cells(size))


def test_dropped_or_reordered_cells_desynchronise_the_layers_for_good() -> None:
    """A relay dropping or swapping cells loses every later cell, at the hop after next."""
    keys = random_keys()[:2]
    cells = [os.urandom(CELL_BODY) for _ in range(CELLS)]
    sender = [OnionLayer.forward(k) for k in reversed(keys)]
    sent = [add_all(sender, c) for c in cells]

    def receive(order: list[int]) -> list[bytes]:
        hops = [OnionLayer.forward(k) for k in keys]
        return [remove_all(hops, sent[i]) for i in order]

    assert receive(list(range(CELLS))) == cells
    kept = [n for n in range(CELLS) if n != TAGGED]
    got = receive(kept)
    assert got[:TAGGED] == cells[:TAGGED]
    assert all(
        agreement(g, cells[n]) < 0.02 for g, n in zip(got[TAGGED:], kept[TAGGED:], strict=True)
    )
    swapped = [0, 1, 3, 2, 4, 5]
    got = receive(swapped)
    assert got[:2] == cells[:2]
    assert all(agreement(g, cells[n]) < 0.02 for g, n in zip(got[2:], swapped[2:], strict=True))


#: docs/protocol.md, "Cell layers": (first 16 bytes, SHA-256) of three cells added in a row.
VECTORS = [
    (
        "83141f25c432cb28f4a950fbb514f1fc",
        "4b15d3665c322cce2d7b97922fc802ef7c0685b2047d001d8dc6fa63ae3ff710",
    ),
    (
        "afb4e259e6a6a08e972cb0e82bf31a35",
        "d10f58e559afdba573f3283ea825a2325b2da8ca2c7876646028a3bd1e776a22",
    ),
    (
        "0d90bd9ac886f30f8d0d5f696d51b36d",
        "2ff6321ad4ed695ce20c3782d04278f13aa338b1dfe80e4c077db9c35cf88365",
    ),
]


def test_layer_matches_the_documented_vectors() -> None:
    adder = OnionLayer(bytes(range(32)), bytes(range(16)))
    remover = OnionLayer(bytes(range(32)), bytes(range(16)))
    for n, (head, digest) in enumerate(VECTORS):
        cell = bytes((n + i) % 256 for i in range(CELL_BODY))
        out = add_all([adder], cell)
        assert (out[:HEAD].hex(), hashlib.sha256(out).hexdigest()) == (head, digest)
        assert remove_all([remover], out) == cell
