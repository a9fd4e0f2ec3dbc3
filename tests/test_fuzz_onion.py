"""Fuzzing OnionReader.peel: hostile codes, codes behind a valid MAC, round trips.

A code either peels to the next hop's NID and a same-size forward code, or to
the terminal, or is refused with one CryptoError line. Any change to a valid
code is refused; the slot parsing behind the MAC is fuzzed by building codes
with a correct MAC around arbitrary routing blocks (what the tracker, which
knows every hop's secret, could send).
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile

from anomos.errors import CryptoError
from anomos.protocol import onion

TARGET = fuzzlib.TARGETS["onion"]
SEEDS = TARGET.seeds()
CODES = [seed[1:] for seed in SEEDS if seed[0] == 0]
SIZE = onion.TRACKING_CODE_SIZE


def reader(private: bytes = fuzzlib.ONION_PRIVATE) -> onion.OnionReader:
    return onion.OnionReader(private, clock=lambda: fuzzlib.NOW)


@fuzz_settings(2)
@given(hostile(SEEDS, max_size=SIZE + 8))
def test_hostile_codes(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@fuzz_settings(2)
@given(st.sampled_from(CODES), st.data())
def test_any_change_to_a_valid_code_is_refused(code: bytes, data: st.DataObject) -> None:
    changed = bytearray(code)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, SIZE - 1))
        changed[at] ^= data.draw(st.integers(1, 255))
    if bytes(changed) == code:
        return
    with pytest.raises(CryptoError) as err:
        reader().peel(bytes(changed))
    fuzzlib.check_message(err.value)


@fuzz_settings(2)
@given(st.binary(max_size=onion.ROUTING_SIZE), st.binary(min_size=32, max_size=32))
def test_routing_blocks_behind_a_valid_mac(beta: bytes, alpha: bytes) -> None:
    code = fuzzlib.onion_with_mac(beta, alpha)
    try:
        peeled = reader().peel(code)
    except CryptoError as exc:
        fuzzlib.check_message(exc)
        return
    if peeled.next_nid is None:
        assert peeled.forward_code is None
    else:
        assert peeled.forward_code is not None and len(peeled.forward_code) == SIZE
        assert 0 <= peeled.next_nid < 2**32


@fuzz_settings(0.5)
@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=onion.MAX_HOPS - 1),
    st.binary(min_size=32, max_size=32),
)
def test_round_trip_along_the_path(nids: list[int], session_key: bytes) -> None:
    code = fuzzlib.onion_code([*nids, None], key=session_key)
    for i, nid in enumerate([*nids, None]):
        private = fuzzlib.ONION_PRIVATE if i == 0 else fuzzlib._key(f"hop {i}")
        peeled = reader(private).peel(code)
        assert peeled.next_nid == nid
        if nid is None:
            assert peeled.forward_code is None
        else:
            assert peeled.forward_code is not None
            code = peeled.forward_code
            assert len(code) == SIZE


@fuzz_settings(1)
@given(st.integers(0, 2**32 - 1))
def test_only_the_current_and_previous_epoch_are_accepted(epoch: int) -> None:
    code = fuzzlib.onion_code([None], epoch=epoch)
    if epoch in (fuzzlib.EPOCH, fuzzlib.EPOCH - 1):
        assert reader().peel(code).next_nid is None
    else:
        with pytest.raises(CryptoError, match="epoch"):
            reader().peel(code)


@pytest.mark.parametrize("size", [0, SIZE - 1, SIZE + 1, 10 * 1024 * 1024])
def test_wrong_sizes_refused_without_copying(size: int) -> None:
    data = bytes(size)
    tracemalloc.start()
    try:
        with pytest.raises(CryptoError, match="bytes, expected") as err:
            reader().peel(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    fuzzlib.check_message(err.value)
    assert peak < 64 * 1024


def test_low_order_elements_refused() -> None:
    """X25519 points of small order (all-zero output) are refused, not crashed on."""
    for alpha in (
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes([0xE0, 0xEB, 0x7A, 0x7C]) + bytes(28),
    ):
        with pytest.raises(CryptoError) as err:
            reader().peel(fuzzlib.onion_code([None])[:5] + alpha + bytes(SIZE - 37))
        fuzzlib.check_message(err.value)
