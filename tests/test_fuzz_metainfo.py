"""Fuzzing Metainfo.from_bytes: hostile files, hostile fields, valid torrents.

Every input gives a Metainfo whose files are safe relative paths and which
survives to_bytes/from_bytes, or a MetainfoError with one line. Besides byte
mutations (fuzz/fuzzlib.py, shared with fuzz/fuzz_metainfo.py) the fields of
valid files are replaced by hostile values, which reaches the validators
behind the bencode layer far more often than flipped bytes do.
"""

from __future__ import annotations

import hashlib
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import fuzzlib
from fuzzprops import fuzz_settings, hostile, mutated_tree

from anomos import bencode
from anomos.errors import MetainfoError
from anomos.torrent.metainfo import BLOCK_SIZE, MAX_METAINFO_SIZE, Metainfo

TARGET = fuzzlib.TARGETS["metainfo"]
SEEDS = TARGET.seeds()
TREES = [bencode.decode(seed) for seed in SEEDS]

component = st.text(
    st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda c: c not in (".", ".."))


@fuzz_settings(3)
@given(hostile(SEEDS, max_size=1024))
def test_hostile_bytes(data: bytes) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, data)


@fuzz_settings(4)
@given(mutated_tree(TREES))
def test_hostile_fields(tree: Any) -> None:
    with fuzzlib.no_hang():
        fuzzlib.check(TARGET, bencode.encode(tree))


@fuzz_settings(1)
@given(
    st.lists(
        st.tuples(st.lists(component, min_size=1, max_size=3), st.integers(0, 100_000)),
        min_size=1,
        max_size=6,
        unique_by=lambda f: f[0][0],  # distinct top-level names: no file inside another
    ),
    st.integers(0, 3),
    st.booleans(),
)
def test_valid_torrents_are_read_exactly(
    files: list[tuple[list[str], int]], shift: int, single: bool
) -> None:
    piece_length = BLOCK_SIZE << shift
    total = sum(length for _path, length in files) or 1
    if single:
        shape: dict[bytes, Any] = {b"length": total}
    else:
        shape = {
            b"files": [
                {b"length": length, b"path": [c.encode() for c in path]} for path, length in files
            ]
        }
        if not any(length for _path, length in files):
            shape[b"files"][0][b"length"] = total
    count = -(-total // piece_length)
    info = {
        **shape,
        b"name": b"top",
        b"piece length": piece_length,
        b"pieces": bytes(range(20)) * count,
    }
    meta = Metainfo.from_bytes(bencode.encode({b"info": info}))
    assert meta.infohash == hashlib.sha1(bencode.encode(info)).digest()
    assert meta.total_length == total and meta.piece_count == count
    offset = 0
    for entry in meta.files:
        assert entry.offset == offset and entry.path[0] == "top"
        offset += entry.length
    assert offset == total
    assert sum(meta.piece_size(i) for i in range(count)) == total
    assert Metainfo.from_bytes(meta.to_bytes()) == meta


def test_oversized_file_refused_before_decoding() -> None:
    data = b"d4:info" + b"0:" * (MAX_METAINFO_SIZE // 2 + 1)
    tracemalloc.start()
    try:
        with pytest.raises(MetainfoError, match="over the limit"):
            Metainfo.from_bytes(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    "path",
    [[b"a\nb"], [b"x", b"line\rbreak"]],
    ids=["newline", "carriage-return"],
)
def test_refusals_naming_a_path_stay_on_one_line(path: list[bytes]) -> None:
    """File names may hold control characters; an error naming them must not break lines."""
    files = [{b"length": 1, b"path": path}, {b"length": 1, b"path": path}]
    info = {b"files": files, b"name": b"t", b"piece length": BLOCK_SIZE, b"pieces": b"p" * 20}
    with pytest.raises(MetainfoError) as err:
        Metainfo.from_bytes(bencode.encode({b"info": info}))
    fuzzlib.check_message(err.value)
