"""Bounded bencode: the only codec anomos uses for bencoded data.

A thin wrapper over ``fastbencode`` (strict: sorted unique keys, no leading
zeros, no trailing junk), so that a value has exactly one encoding and
``encode(decode(data)) == data`` holds for every accepted input; that is what
lets the infohash be recomputed from a decoded ``info`` dict.

Everything decoded comes from outside, so :func:`decode` refuses inputs over a
size bound and nesting deeper than a depth bound, and reports every failure as
:class:`BencodeError` with one line. The decoder never recurses (any depth is
safe to decode), so for inputs up to ``_DECODE_FIRST`` the depth is bounded on
the decoded value, which costs a few container visits instead of a token scan
in Python; bigger inputs (torrent files) are scanned first, so that a deep one
is refused before it takes memory.
"""

from __future__ import annotations

from typing import Any

import fastbencode

from anomos.errors import ProtocolError

#: Largest input :func:`decode` accepts unless the caller says otherwise.
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
#: Deepest nesting of lists and dicts accepted (a .torrent needs 5).
DEFAULT_MAX_DEPTH = 32
#: Digits allowed in a string length prefix (a length over 10**12 is refused anyway).
_MAX_LENGTH_DIGITS = 12

_DIGITS = frozenset(b"0123456789")
#: Inputs up to this size are decoded before their depth is checked (a refused one
#: costs at most a few MiB of nested lists, briefly).
_DECODE_FIRST = 1 << 20


class BencodeError(ProtocolError):
    """Malformed or oversized bencoded data."""


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Decode one bencoded value filling all of ``data``.

    Strings come back as ``bytes`` (dict keys too), integers as ``int``,
    lists as ``list`` and dicts as ``dict``.
    """
    if not isinstance(data, bytes):
        if not isinstance(data, bytearray | memoryview):
            raise TypeError(f"bencode.decode needs bytes, not {type(data).__name__}")
        data = bytes(data)
    if len(data) > max_size:
        raise BencodeError(f"bencode: {len(data)} bytes is over the limit of {max_size}")
    if not data:
        raise BencodeError("bencode: empty input")
    small = len(data) <= _DECODE_FIRST
    if not small:
        _check_depth(data, max_depth)
    try:
        value = fastbencode.bdecode(data)
    except (ValueError, TypeError, IndexError, OverflowError, RecursionError) as exc:
        raise BencodeError(f"bencode: {_one_line(exc)}") from None
    if small:
        _bound_depth(value, max_depth)
    return value


def encode(obj: Any) -> bytes:
    """Bencode ``obj``: ``bytes``/``str`` (UTF-8), ``int``, ``list``/``tuple``, ``dict``.

    Dict keys may be ``bytes`` or ``str`` and are sorted as bytes. Other
    types raise ``TypeError`` (a programming error, not bad input).
    """
    try:
        return bytes(fastbencode.bencode_utf8(obj))
    except TypeError:
        pass  # str keys, bytearray, memoryview: normalise, then retry once
    try:
        return bytes(fastbencode.bencode_utf8(_normalise(obj, 0)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"bencode: cannot encode: {_one_line(exc)}") from None


def _normalise(obj: Any, depth: int) -> Any:
    if depth > 1000:
        raise ValueError("nesting too deep")
    if isinstance(obj, dict):
        out: dict[bytes, Any] = {}
        for key, value in obj.items():
            bkey = key.encode() if isinstance(key, str) else bytes(key)
            if bkey in out:
                raise ValueError(f"duplicate key {bkey!r}")
            out[bkey] = _normalise(value, depth + 1)
        return out
    if isinstance(obj, list | tuple):
        return [_normalise(v, depth + 1) for v in obj]
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    return obj


def _bound_depth(value: Any, max_depth: int) -> None:
    """Refuse a decoded value whose lists and dicts nest deeper than ``max_depth``
    (level by level, without recursion: a deep value cannot exhaust the stack)."""
    level = [value] if type(value) is list or type(value) is dict else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            raise BencodeError(f"bencode: nesting deeper than {max_depth}")
        deeper = []
        for container in level:
            for item in container.values() if type(container) is dict else container:
                if type(item) is list or type(item) is dict:
                    deeper.append(item)
        level = deeper


def _check_depth(data: bytes, max_depth: int) -> None:
    """Walk the token structure (skipping string bodies) and bound the nesting.

    Runs in one pass over the tokens, not the bytes, so a few-MiB torrent
    made mostly of its ``pieces`` string costs almost nothing. Malformed
    input is left for the decoder to name, except where the scan itself
    could not continue safely.
    """
    depth = 0
    i = 0
    n = len(data)
    find = data.find
    while i < n:
        c = data[i]
        if c == 0x6C or c == 0x64:  # 'l' or 'd'
            depth += 1
            if depth > max_depth:
                raise BencodeError(f"bencode: nesting deeper than {max_depth}")
            i += 1
        elif c == 0x65:  # 'e'
            depth -= 1
            i += 1
        elif c == 0x69:  # 'i'
            j = find(b"e", i + 1)
            if j < 0:
                return
            i = j + 1
        elif c in _DIGITS:
            j = find(b":", i, i + _MAX_LENGTH_DIGITS + 1)
            if j < 0:
                if find(b":", i) < 0:
                    return  # truncated: the decoder names it
                raise BencodeError("bencode: string length too large")
            try:
                length = int(data[i:j])
            except ValueError:
                return
            i = j + 1 + length
        else:
            return
        if depth <= 0:
            return  # end of the top-level value; junk after it is the decoder's


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
