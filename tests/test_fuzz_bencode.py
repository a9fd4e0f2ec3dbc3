"""Fuzzing anomos.bencode.decode: hostile bytes, round trips, bounded work.

The decoder may only accept (and then the input is the canonical encoding of
what it returned) or raise BencodeError with one line. Shared targets and
seeds live in fuzz/fuzzlib.py, which the atheris harness fuzz/fuzz_bencode.py
runs too; see docs/fuzzing.md.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile

from anomos import bencode
from anomos.bencode import BencodeError

TARGET = fuzzlib.TARGETS["bencode"]
SEEDS = TARGET.seeds()

leaves = st.one_of(st.integers(-(2**100), 2**100), st.binary(max_size=40))
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.binary(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


@fuzz_settings(4)
@given(hostile(SEEDS))
def test_hostile_bytes_decode_canonically_or_refuse(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@fuzz_settings(1)
@given(values)
def test_round_trip(value: Any) -> None:
    data = bencode.encode(value)
    assert bencode.decode(data) == value
    assert bencode.encode(bencode.decode(data)) == data


@fuzz_settings(1)
@given(values, st.data())
def test_every_strict_prefix_is_refused(value: Any, data: st.DataObject) -> None:
    """A truncated value never decodes to something else: one value, one encoding."""
    encoded = bencode.encode(value)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(BencodeError) as err:
        bencode.decode(encoded[:cut])
    fuzzlib.check_message(err.value)


@fuzz_settings(1)
@given(values, st.binary(min_size=1, max_size=8))
def test_trailing_junk_is_refused(value: Any, junk: bytes) -> None:
    with pytest.raises(BencodeError):
        bencode.decode(bencode.encode(value) + junk)


@pytest.mark.parametrize(
    "data",
    [
        b"999999999999:x",
        b"99999999999:x",
        b"l4294967295:xe",
        b"d3:key2147483648:",
        b"i" + b"9" * 100_000 + b"e",
        b"l" * 100_000,
        b"d" * 100_000,
        b"1" * 100_000,
    ],
    ids=lambda d: d[:16].decode(),
)
def test_huge_declared_sizes_are_refused_without_allocating_them(data: bytes) -> None:
    tracemalloc.start()
    try:
        with fuzzlib.no_hang(), pytest.raises(BencodeError) as err:
            bencode.decode(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    fuzzlib.check_message(err.value)
    assert peak < 2 * len(data) + 64 * 1024


def test_depth_bound_is_exact() -> None:
    depth = bencode.DEFAULT_MAX_DEPTH
    assert bencode.decode(b"l" * depth + b"e" * depth) is not None
    with pytest.raises(BencodeError, match="deeper"):
        bencode.decode(b"l" * (depth + 1) + b"e" * (depth + 1))


def test_memory_is_a_bounded_multiple_of_the_input() -> None:
    """The worst case found: a list of empty lists, ~32 bytes of objects per input byte.

    Bounded by ``max_size``; a caller taking bodies from the network should
    pass a ``max_size`` that keeps 32x affordable.
    """
    data = b"l" + b"le" * (1 << 17) + b"e"
    tracemalloc.start()
    try:
        value = bencode.decode(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(value) == 1 << 17
    assert peak < 48 * len(data)


def test_the_hang_guard_interrupts_pure_python_loops() -> None:
    """no_hang must fire inside code that never yields to the gevent hub."""
    with pytest.raises(fuzzlib.Hang), fuzzlib.no_hang(0.2, "a busy loop"):
        while True:
            pass
