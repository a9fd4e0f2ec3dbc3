"""Hypothesis strategies and the settings profile of the fuzz property tests.

``ANOMOS_FUZZ_EXAMPLES`` (default 200) is the number of examples of an
ordinary fuzz test; each test scales it by its cost, so the whole suite
(tests/test_fuzz_*.py) runs several thousand cases in well under a minute.
Raise it for a longer local run: ``ANOMOS_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_*``.
No deadline: a slow example is not a failure; a hung one is caught by
:func:`fuzzlib.no_hang`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("ANOMOS_FUZZ_EXAMPLES", "200"))

settings.register_profile(
    "anomos-fuzz",
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
#: The profile as an object: used as a decorator it never changes the global profile.
PROFILE = settings.get_profile("anomos-fuzz")


def fuzz_settings(scale: float = 1.0) -> settings:
    """The fuzz profile with ``scale * ANOMOS_FUZZ_EXAMPLES`` examples (at least 5)."""
    return settings(PROFILE, max_examples=max(5, int(EXAMPLES * scale)))


MUTATIONS = ("flip", "byte", "cut", "truncate", "insert", "extend", "duplicate", "splice")


@st.composite
def mutated(draw: Any, seeds: Sequence[bytes], max_ops: int = 4) -> bytes:
    """A seed with 1..``max_ops`` mutations: bit flips, byte sets, cuts,
    truncations, inserts, extensions, duplicated ranges and splices with another seed."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(MUTATIONS))
        n = len(data)
        pos = draw(st.integers(0, max(0, n - 1)))
        if op == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "duplicate" and n:
            end = draw(st.integers(pos, n))
            data[pos:pos] = data[pos:end]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            cut = draw(st.integers(0, len(other)))
            data = data[:pos] + bytearray(other[cut:])
    return bytes(data)


def hostile(seeds: Sequence[bytes], max_size: int = 512) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or mutated valid encodings (the more useful half)."""
    return st.one_of(st.binary(max_size=max_size), mutated(seeds), mutated(seeds, max_ops=12))


#: Values that break naive validators: wrong types, limits, path tricks, bad UTF-8.
EDGE_VALUES: list[Any] = [
    0,
    -1,
    1,
    2**31,
    2**32,
    2**63,
    2**64,
    -(2**63),
    b"",
    b".",
    b"..",
    b"/",
    b"a/b",
    b"\\",
    b"\xff\xfe",
    b"\x00",
    b"a\nb",
    b"x" * 300,
    b"nan",
    b"inf",
    [],
    [b""],
    {},
    {b"": b""},
]

leaves = st.one_of(
    st.sampled_from(EDGE_VALUES), st.integers(-(2**70), 2**70), st.binary(max_size=40)
)
#: Arbitrary bencodable values.
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.binary(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (keys and indexes) to every node of a decoded bencode tree."""
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _nodes(item, (*path, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``value`` with the node at ``path`` set to ``new`` (or deleted)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    if rest:
        copy[head] = _replace(value[head], rest, new)
    elif new is _DELETE:
        del copy[head]
    else:
        copy[head] = new
    return copy


_DELETE = object()


@st.composite
def mutated_tree(draw: Any, trees: Sequence[Any], max_ops: int = 3) -> Any:
    """A decoded bencode tree with 1..``max_ops`` nodes replaced, deleted or added."""
    tree = draw(st.sampled_from(trees))
    for _ in range(draw(st.integers(1, max_ops))):
        path = draw(st.sampled_from(_nodes(tree)))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "delete" and path:
            tree = _replace(tree, path, _DELETE)
        elif op == "add":
            parent = path[:-1]
            node = tree
            for step in parent:
                node = node[step]
            if isinstance(node, dict):
                key = draw(st.one_of(st.binary(max_size=8), st.sampled_from(list(node) or [b"k"])))
                tree = _replace(tree, (*parent, key), draw(values))
            elif isinstance(node, list):
                tree = _replace(tree, parent, [*node, draw(values)])
        else:
            tree = _replace(tree, path, draw(values))
    return tree
