"""Compact containers for the tracker's per-peer state (issue 15: at most 1 KB a peer).

A million peers each holding a ``set`` of its torrents and a ``dict`` of its
last reports cost ~500 bytes a peer in empty hash tables and small tuples,
though nearly every peer shares one or two torrents. These containers keep
the common case inline (one torrent: no container at all) and keep the
mapping interfaces the tracker uses, so its code reads the same.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

Counters = tuple[int, int]


class Reports(MutableMapping[bytes, Counters]):
    """infohash -> (uploaded, downloaded) last reported: one entry inline, more in a dict.

    An account holds one of these; most peers report one torrent, which then
    costs one small object instead of a hash table and a tuple.
    """

    __slots__ = ("_down", "_ih", "_more", "_up")

    def __init__(self) -> None:
        self._ih: bytes | None = None
        self._up = 0
        self._down = 0
        #: entries beyond the first (None until a second torrent is reported)
        self._more: dict[bytes, Counters] | None = None

    def __getitem__(self, ih: bytes) -> Counters:
        if ih == self._ih:
            return (self._up, self._down)
        if self._more is not None:
            return self._more[ih]
        raise KeyError(ih)

    def __setitem__(self, ih: bytes, counters: Counters) -> None:
        if self._ih is None or ih == self._ih:
            self._ih = ih
            self._up, self._down = counters
        else:
            if self._more is None:
                self._more = {}
            self._more[ih] = counters

    def __delitem__(self, ih: bytes) -> None:
        if ih == self._ih:
            if self._more:
                # The first of the others moves inline.
                self._ih, (self._up, self._down) = self._more.popitem()
                if not self._more:
                    self._more = None
            else:
                self._ih, self._up, self._down = None, 0, 0
        elif self._more is not None:
            del self._more[ih]
            if not self._more:
                self._more = None
        else:
            raise KeyError(ih)

    def __iter__(self) -> Iterator[bytes]:
        if self._ih is not None:
            yield self._ih
        if self._more is not None:
            yield from list(self._more)

    def __len__(self) -> int:
        return (self._ih is not None) + (len(self._more) if self._more else 0)

    def __contains__(self, ih: object) -> bool:
        return ih == self._ih or (self._more is not None and ih in self._more)

    def clear(self) -> None:
        self._ih, self._up, self._down, self._more = None, 0, 0, None

    def __repr__(self) -> str:
        return f"Reports({dict(self.items())!r})"


class TorrentsByPeer:
    """peer -> the torrents it is in: the value is the infohash itself while there is
    one (the usual case), a tuple when more; infohashes are interned, so each
    distinct one is stored once however many peers share it.

    ``setdefault`` and ``get`` hand out a live set-like view of one peer's
    torrents (``add``, ``discard``, iteration), as a ``dict`` of ``set`` would.
    """

    __slots__ = ("_names", "_of")

    def __init__(self) -> None:
        self._of: dict[bytes, bytes | tuple[bytes, ...]] = {}
        #: infohash -> the one object kept for it, and how many peers hold it
        self._names: dict[bytes, list[Any]] = {}

    def setdefault(self, peer: bytes, _default: object = None) -> PeerTorrents:
        return PeerTorrents(self, peer)

    def get(self, peer: bytes, default: Any = None) -> Any:
        return PeerTorrents(self, peer) if peer in self._of else default

    def pop(self, peer: bytes, default: Any = None) -> Any:
        if peer not in self._of:
            return default
        torrents = self.of(peer)
        for ih in torrents:
            self._release(ih)
        del self._of[peer]
        return set(torrents)

    def __contains__(self, peer: object) -> bool:
        return peer in self._of

    def __len__(self) -> int:
        return len(self._of)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._of)

    def of(self, peer: bytes) -> tuple[bytes, ...]:
        """The torrents of ``peer`` (empty when none)."""
        value = self._of.get(peer)
        if value is None:
            return ()
        return value if isinstance(value, tuple) else (value,)

    def add(self, peer: bytes, ih: bytes) -> None:
        torrents = self.of(peer)
        if ih in torrents:
            return
        ih = self._intern(ih)
        self._of[peer] = (*torrents, ih) if torrents else ih

    def discard(self, peer: bytes, ih: bytes) -> None:
        torrents = self.of(peer)
        if ih not in torrents:
            return
        rest = tuple(t for t in torrents if t != ih)
        self._release(ih)
        if not rest:
            del self._of[peer]
        else:
            self._of[peer] = rest if len(rest) > 1 else rest[0]

    def infohashes(self) -> int:
        """Distinct infohashes held (for tests and stats)."""
        return len(self._names)

    def _intern(self, ih: bytes) -> bytes:
        entry = self._names.get(ih)
        if entry is None:
            entry = self._names[ih] = [ih, 0]
        entry[1] += 1
        return entry[0]  # type: ignore[no-any-return]

    def _release(self, ih: bytes) -> None:
        entry = self._names[ih]
        entry[1] -= 1
        if not entry[1]:
            del self._names[ih]


class PeerTorrents:
    """A live view of one peer's torrents in a :class:`TorrentsByPeer`."""

    __slots__ = ("_peer", "_table")

    def __init__(self, table: TorrentsByPeer, peer: bytes) -> None:
        self._table = table
        self._peer = peer

    def add(self, ih: bytes) -> None:
        self._table.add(self._peer, ih)

    def discard(self, ih: bytes) -> None:
        self._table.discard(self._peer, ih)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._table.of(self._peer))

    def __contains__(self, ih: object) -> bool:
        return ih in self._table.of(self._peer)

    def __len__(self) -> int:
        return len(self._table.of(self._peer))
