"""Compact containers for the tracker's per-peer state (issue 15: at most 1 KB a peer).

A million peers each holding a ``set`` of its torrents and a ``dict`` of its
last reports cost ~500 bytes a peer in empty hash tables and small tuples,
though nearly every peer shares one or two torrents. These containers keep
the common case inline (one torrent: no container at all) and keep the
mapping interfaces the tracker uses, so its code reads the same.

The live peers' rows and receipt baselines are columns indexed by the peer's
slot in the graph (:meth:`PeerGraph.slot`), as the graph's own arrays are: the
graph maps each identity to an integer once, and every other table is flat
arrays with no Python object per peer (nothing for the garbage collector to
walk either).
"""

from __future__ import annotations

import collections
import itertools
import math
import operator
from array import array
from collections.abc import (
    Collection,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    from anomos.tracker.graph import PeerGraph
    from anomos.tracker.images import AccountColumns, PeerColumns
    from anomos.tracker.store import Account, PeerRow

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


_INLINE = [operator.attrgetter(name) for name in ("_ih", "_up", "_down", "_more")]


def report_columns(reports: Sequence[Reports]) -> list[list[Any]]:
    """Each one's inline entry (infohash or None, uploaded, downloaded) and its others
    (or None), as four lists, read at C level: the store's image packs 10^6 of them
    (and lists of atoms, unlike a tuple each, give the garbage collector nothing to walk)."""
    return [list(map(field, reports)) for field in _INLINE]


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

    def load(self, ih: bytes, peers: Collection[bytes]) -> None:
        """Restore: ``peers`` are in torrent ``ih``; the ones with no torrent yet (nearly
        all) are added in one C-level update."""
        new = set(peers) - self._of.keys() if self._of else set(peers)
        if len(new) < len(peers):
            for peer in [p for p in peers if p not in new]:
                self.add(peer, ih)
        if new:
            ih = self._intern(ih)
            self._names[ih][1] += len(new) - 1
            self._of.update(dict.fromkeys(new, ih))

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


#: Bytes of one peer's two public keys in the key arena: onion (X25519), then box.
KEY_BYTES = 32
_ROW_KEYS = 2 * KEY_BYTES
#: Address bytes kept inline per slot: "255.255.255.255:65535" and most IPv6 ones fit;
#: a longer address (an onion's is 62) is kept in a dict beside.
ADDRESS_BYTES = 23
#: Address length of a slot without a live peer, and of an address kept in the dict.
_NO_PEER = 0
IN_DICT = 255
#: Last seen of a free slot: never silent for the expiry scan.
_NEVER = array("d", [math.inf])


class PeerTable(Mapping[bytes, "PeerRow"]):
    """identity -> :class:`PeerRow` of every live peer, packed in columns by graph slot.

    A ``PeerRow`` object per peer cost ~300 B (the object, two key objects, the
    address string, a float); a row here costs 96 B: both public keys in one
    arena (64), when it was last seen (a double: the expiry order is a scan of
    this column, see :meth:`silent_since`) and its address, as bytes in a
    fixed-width field with a length byte (an address longer than
    ``ADDRESS_BYTES``, an onion's, is kept in a dict beside): read back as
    bytes, as replies carry it, in a slice. The join sequence number is the
    graph's. A peer must be in the graph before it gets a row, and lose its row
    before it leaves the graph.

    Reading hands out a new ``PeerRow`` (a copy): change a peer with :meth:`set`,
    :meth:`update` and :meth:`seen`.
    """

    __slots__ = ("_abuf", "_alen", "_count", "_graph", "_keys", "_other", "_seen", "_slot_of")

    def __init__(self, graph: PeerGraph) -> None:
        self._graph = graph
        self._slot_of = graph.slot
        #: slot -> onion key, box key (64 bytes a slot)
        self._keys = bytearray()
        #: slot -> when last seen (time.time() seconds; +inf for a free slot, which
        #: the expiry scan then never picks)
        self._seen = array("d")
        #: slot -> the address's length, IN_DICT (in _other) or _NO_PEER; its bytes
        self._alen = bytearray()
        self._abuf = bytearray()
        self._other: dict[int, bytes] = {}
        self._count = 0

    # ------------------------------------------------------------------ reading
    def _slot(self, peer: Any) -> int | None:
        s = self._slot_of(peer)
        if s is None or s >= len(self._alen) or self._alen[s] == _NO_PEER:
            return None
        return s

    def __getitem__(self, peer: bytes) -> PeerRow:
        s = self._slot(peer)
        if s is None:
            raise KeyError(peer)
        from anomos.tracker.store import PeerRow  # store.py imports this module

        onion, box = self._keys_at(s)
        return PeerRow(peer, onion, box, self._address_at(s), self._seen[s], self._graph.seq(peer))

    def __contains__(self, peer: object) -> bool:
        return self._slot(peer) is not None

    def own(self, peer: bytes) -> bytes | None:
        """The graph's own object for a live ``peer`` (None: not live), to key other
        tables with (:meth:`PeerGraph.own`)."""
        s = self._slot(peer)
        return None if s is None else self._graph.at(s)  # type: ignore[return-value]

    def own_all(self, peers: Iterable[bytes]) -> list[bytes]:
        """:meth:`own` of each of ``peers``, which must all be live (a restore's: KeyError
        otherwise), in one C-level pass."""
        return self._graph.own_all(peers)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[bytes]:
        alen, n = self._alen, len(self._alen)
        live: list[Any] = [p for p, s in self._graph.slots() if s < n and alen[s] != _NO_PEER]
        return iter(live)

    def __len__(self) -> int:
        return self._count

    def public_keys(self, peer: bytes) -> tuple[bytes, bytes] | None:
        """The peer's (onion, box) keys, or None when it is not live."""
        s = self._slot(peer)
        return None if s is None else self._keys_at(s)

    def known(self, peer: bytes) -> tuple[bytes, bytes, str] | None:
        """The peer's (onion, box, address) as last accepted, or None when it is not
        live: what its announce is checked against, in one lookup."""
        s = self._slot(peer)
        return None if s is None else (*self._keys_at(s), self._address_at(s))

    def address(self, peer: bytes) -> str:
        return self.address_bytes(peer).decode()

    def address_bytes(self, peer: bytes) -> bytes:
        """The address as a reply carries it (every announce asks for each neighbour's)."""
        s = self._slot_of(peer)
        n = self._alen[s] if s is not None and s < len(self._alen) else _NO_PEER
        if n == _NO_PEER:
            raise KeyError(peer)
        if n == IN_DICT:
            return self._other[s]  # type: ignore[index]
        at = s * ADDRESS_BYTES  # type: ignore[operator]
        return bytes(self._abuf[at : at + n])

    def last_seen(self, peer: bytes) -> float:
        s = self._slot(peer)
        if s is None:
            raise KeyError(peer)
        return self._seen[s]

    def _keys_at(self, s: int) -> tuple[bytes, bytes]:
        at = s * _ROW_KEYS
        return bytes(self._keys[at : at + KEY_BYTES]), bytes(
            self._keys[at + KEY_BYTES : at + _ROW_KEYS]
        )

    def _address_at(self, s: int) -> str:
        n, at = self._alen[s], s * ADDRESS_BYTES
        return (self._other[s] if n == IN_DICT else self._abuf[at : at + n]).decode()

    # ------------------------------------------------------------------ writing
    def set(self, peer: bytes, onion: bytes, box: bytes, address: str, last_seen: float) -> None:
        """Give ``peer`` (in the graph) this row, new or replacing its old one."""
        s = self._graph.slot(peer)
        if s is None:
            raise KeyError(f"peer {peer.hex()[:16]} is not in the graph")
        if len(onion) != KEY_BYTES or len(box) != KEY_BYTES:
            raise ValueError("public keys are 32 bytes")
        if s >= len(self._alen):
            grow = s + 1 - len(self._alen)
            self._keys.extend(bytes(grow * _ROW_KEYS))
            self._seen.extend(_NEVER * grow)
            self._alen.extend(bytes(grow))
            self._abuf.extend(bytes(grow * ADDRESS_BYTES))
        if self._alen[s] == _NO_PEER:
            self._count += 1
        self._keys[s * _ROW_KEYS : (s + 1) * _ROW_KEYS] = onion + box
        self._seen[s] = last_seen
        self._set_address(s, address)

    def __setitem__(self, peer: bytes, row: PeerRow) -> None:
        self.set(peer, row.onion, row.box, row.address, row.last_seen)

    def load(self, rows: Iterable[PeerRow], last_seen: float) -> None:
        """Restore: a row for each of ``rows`` (their peers already in the graph), all
        seen at ``last_seen`` (a full expiry window from the restart). The columns
        grow once and each row is written in place: a million calls of :meth:`set`
        were 5.6 s of a 35 s restart."""
        rows = list(rows)
        found = list(map(self._slot_of, (row.identity for row in rows)))
        if None in found:
            peer = rows[found.index(None)].identity
            raise KeyError(f"peer {peer.hex()[:16]} is not in the graph")
        slots = cast(list[int], found)
        grow = max(slots, default=-1) + 1 - len(self._alen)
        if grow > 0:
            self._keys.extend(bytes(grow * _ROW_KEYS))
            self._seen.extend(_NEVER * grow)
            self._alen.extend(bytes(grow))
            self._abuf.extend(bytes(grow * ADDRESS_BYTES))
        keys, seen, alen, abuf, other = self._keys, self._seen, self._alen, self._abuf, self._other
        for s, row in zip(slots, rows, strict=True):
            key = row.onion + row.box
            if len(key) != _ROW_KEYS or len(row.onion) != KEY_BYTES:
                raise ValueError("public keys are 32 bytes")
            self._count += alen[s] == _NO_PEER
            keys[s * _ROW_KEYS : (s + 1) * _ROW_KEYS] = key
            seen[s] = last_seen
            raw = row.address.encode()
            n = len(raw)
            if 0 < n <= ADDRESS_BYTES:
                other.pop(s, None)
                abuf[s * ADDRESS_BYTES : s * ADDRESS_BYTES + n] = raw
                alen[s] = n
            else:
                other[s] = raw
                alen[s] = IN_DICT

    def image(self) -> PeerColumns:
        """Each slot's peer and copies of the columns, read by the store's writer thread
        a few MB at a time while serving goes on: a row changed meanwhile belongs to a
        peer whose change is logged, and is read again from its row on restore (a copy
        of ~90 MB on the event loop was a 66 ms stall at 10^6)."""
        from anomos.tracker.images import PeerColumns

        peers = self._graph.slot_peers()
        n = len(peers)
        return PeerColumns(
            peers,
            _chunked_copy(self, "_keys", n * _ROW_KEYS),
            _chunked_copy(self, "_alen", n),
            _chunked_copy(self, "_abuf", n * ADDRESS_BYTES),
            {s: a for s, a in self._other.copy().items() if s < n},
        )

    def load_image(self, columns: PeerColumns, stale: Iterable[int], last_seen: float) -> None:
        """Restore an empty table from the image's ``columns`` (by the graph's slots as
        the graph image restored them), all seen at ``last_seen``; the ``stale`` slots
        (their peers changed or left after the image) are cleared, for :meth:`load` to
        fill with the rows changed since. ValueError: the columns do not fit together."""
        n = len(columns.alen)
        if (len(columns.keys), len(columns.abuf)) != (n * _ROW_KEYS, n * ADDRESS_BYTES):
            raise ValueError("the stored peer table image does not fit together")
        if self._count:
            raise ValueError("PeerTable.load_image needs an empty table")
        self._keys = bytearray(columns.keys)
        self._alen = bytearray(columns.alen)
        self._abuf = bytearray(columns.abuf)
        self._other = dict(columns.other)
        for s in stale:
            self._alen[s] = _NO_PEER
            self._other.pop(s, None)
            self._keys[s * _ROW_KEYS : (s + 1) * _ROW_KEYS] = bytes(_ROW_KEYS)
        alen = np.frombuffer(self._alen, np.uint8)
        live = alen != _NO_PEER
        self._seen = array("d", np.where(live, last_seen, math.inf).tobytes())
        self._count = int(np.count_nonzero(live))
        del alen  # (an exported buffer cannot grow)

    def update(self, peer: bytes, onion: bytes, box: bytes, address: str) -> bool:
        """Change a live peer's keys and address; whether anything changed (to be stored)."""
        s = self._slot(peer)
        if s is None:
            raise KeyError(peer)
        at = s * _ROW_KEYS
        if self._keys[at : at + _ROW_KEYS] == onion + box and address == self._address_at(s):
            return False
        self.set(peer, onion, box, address, self._seen[s])
        return True

    def seen(self, peer: bytes, now: float) -> None:
        """The live peer spoke at ``now``."""
        s = self._slot_of(peer)
        if s is None or s >= len(self._alen) or self._alen[s] == _NO_PEER:
            raise KeyError(peer)
        self._seen[s] = now

    def discard(self, peer: bytes) -> None:
        """Drop the peer's row (before the graph frees its slot); no-op when absent."""
        s = self._slot(peer)
        if s is None:
            return
        self._other.pop(s, None)
        self._alen[s] = _NO_PEER
        self._seen[s] = _NEVER[0]
        self._keys[s * _ROW_KEYS : (s + 1) * _ROW_KEYS] = bytes(_ROW_KEYS)
        self._count -= 1

    def _set_address(self, s: int, address: str) -> None:
        raw = address.encode()
        if 0 < len(raw) <= ADDRESS_BYTES:  # (length 0 marks a free slot)
            self._other.pop(s, None)
            at = s * ADDRESS_BYTES
            self._abuf[at : at + len(raw)] = raw
            self._alen[s] = len(raw)
        else:
            self._other[s] = raw
            self._alen[s] = IN_DICT

    # ------------------------------------------------------------------ expiry
    def silent_since(self, deadline: float) -> list[bytes]:
        """Live peers last seen before ``deadline``, longest silent first (ties in slot
        order): one vectorised pass over the column, ~3 ms of CPU at 10^6 peers, instead of an
        ordered dict of every peer (~160 B each) kept in last-seen order."""
        n = len(self._alen)
        if not n:
            return []
        seen = np.frombuffer(self._seen, dtype=np.float64, count=n)
        silent = np.flatnonzero(seen < deadline)  # free slots are +inf
        order = silent[np.argsort(seen[silent], kind="stable")].tolist()
        del seen  # release the column's buffer (an exported array cannot grow)
        peers: list[Any] = [p for p in map(self._graph.at, order) if p is not None]
        return peers


#: Bytes copied per step by :func:`_chunked_copy` (a few ms of holding the GIL).
_COPY_STEP = 1 << 23


def _chunked_copy(table: object, column: str, size: int, itemsize: int = 1) -> bytearray:
    """The first ``size`` items of ``table``'s ``column`` (a bytearray, or an array of
    ``itemsize``-byte items) as bytes, zeros past its end, a slice at a time: no buffer
    stays exported (the event loop may grow the column) and no step holds the GIL long.
    The slices go straight into one buffer: only one is alive at a time (the writer
    thread's transient buffers stay resident in its malloc arena once freed)."""
    out = bytearray(size * itemsize)
    step = _COPY_STEP // itemsize
    for at in range(0, size, step):
        part = memoryview(getattr(table, column)[at : min(size, at + step)]).cast("B")
        out[at * itemsize : at * itemsize + len(part)] = part
        if len(part) < step * itemsize:
            break  # (the column ends here: the rest stays zeros)
    return out


#: Receipt state of one reporter: none, baselines from its session's start, or picked
#: up mid-session (by a restarted tracker: its first receipts are baselines only).
_NO_RECEIPTS = 0
_FROM_START = 1
_MID_SESSION = 2


class ReceiptBaselines:
    """What each reporter's receipts said last in its current session (memory only),
    packed by graph slot.

    Per slot: a state byte (none, from the session's start, mid-session) and the
    baselines, one ``bytes`` of int64 triples (NID, the sender's join sequence
    number, bytes it was confirmed to have sent) or None. An object per reporter
    with a dict of tuples cost ~220 B even with no receipts at all. The sender is
    told apart by its join sequence number, unique per stay in the graph, not by
    its identity. A reporter outside the graph (its first announce comes before
    its join; after it left) keeps its state byte only, in a dict: it has no edges,
    so no baselines. The session itself is not kept: it is the account's, and a
    changed session is what ``fresh`` says.
    """

    __slots__ = ("_graph", "_last", "_loose", "_state")

    def __init__(self, graph: PeerGraph) -> None:
        self._graph = graph
        self._state = bytearray()
        self._last: list[bytes | None] = []
        #: identity -> state, for reporters outside the graph
        self._loose: dict[bytes, int] = {}

    def begin(self, reporter: bytes, fresh: bool) -> bool:
        """Start the reporter's baselines if it has none or ``fresh`` (its session is new
        to the tracker); whether they count from the session's start."""
        s = self._graph.slot(reporter)
        if s is None:
            state = self._loose.get(reporter, _NO_RECEIPTS)
            if state == _NO_RECEIPTS or fresh:
                state = self._loose[reporter] = _FROM_START if fresh else _MID_SESSION
            return state == _FROM_START
        self._grow(s)
        state = self._state[s] or self._loose.pop(reporter, _NO_RECEIPTS)
        if state == _NO_RECEIPTS or fresh:
            state = _FROM_START if fresh else _MID_SESSION
            self._last[s] = None
        self._state[s] = state
        return state == _FROM_START

    def last(self, reporter: bytes) -> dict[int, tuple[int, int]]:
        """NID -> (the sender's join sequence number, bytes confirmed) as last reported."""
        s = self._graph.slot(reporter)
        blob = self._last[s] if s is not None and s < len(self._last) else None
        if not blob:
            return {}
        flat = array("q", blob)
        return {flat[i]: (flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)}

    def set_last(self, reporter: bytes, entries: list[tuple[int, int, int]]) -> None:
        """Replace the reporter's baselines with ``entries`` (NID, sender's sequence number,
        bytes); a reporter outside the graph has none to keep."""
        s = self._graph.slot(reporter)
        if s is None:
            return
        self._grow(s)
        self._last[s] = array("q", [v for e in entries for v in e]).tobytes() if entries else None

    def forget(self, reporter: bytes) -> None:
        """The reporter's session ended (``stopped``): no state at all."""
        self._loose.pop(reporter, None)
        s = self._graph.slot(reporter)
        if s is not None and s < len(self._state):
            self._state[s] = _NO_RECEIPTS
            self._last[s] = None

    def joined(self, reporter: bytes) -> None:
        """The reporter entered the graph: the state kept by identity moves into its slot
        (a peer registered and never heard from again would otherwise keep a dict entry)."""
        s = self._graph.slot(reporter)
        state = self._loose.pop(reporter, _NO_RECEIPTS)
        if s is not None and state:
            self._grow(s)
            self._state[s], self._last[s] = state, None

    def leaving(self, reporter: bytes) -> None:
        """The reporter leaves the graph (call before it does): its slot is cleared for
        the next peer, and its state kept by identity (its edges, so its baselines, go)."""
        s = self._graph.slot(reporter)
        if s is None or s >= len(self._state):
            return
        if self._state[s]:
            self._loose[reporter] = self._state[s]
        self._state[s] = _NO_RECEIPTS
        self._last[s] = None

    def __contains__(self, reporter: object) -> bool:
        if reporter in self._loose:
            return True
        s = self._graph.slot(reporter) if isinstance(reporter, bytes) else None
        return s is not None and s < len(self._state) and self._state[s] != _NO_RECEIPTS

    def _grow(self, s: int) -> None:
        if s >= len(self._state):
            grow = s + 1 - len(self._state)
            self._state.extend(bytes(grow))
            self._last.extend([None] * grow)


#: Counters of an account, in their column order (8-byte integers each).
_COUNTERS = ("uploaded", "downloaded", "relayed_claimed", "relayed_confirmed", "relayed_reported")
_NCOUNT = len(_COUNTERS)
#: Counters saturate here instead of overflowing (SQLite's INTEGER is 8 bytes too).
COUNTER_MAX = 2**63 - 1
#: Session bytes kept inline per slot (a peer's is 8 random bytes; up to 32 are allowed:
#: a longer one is kept in a dict beside).
SESSION_BYTES = 16
#: First report's infohash of a slot without a report (an index into the interned names).
NO_REPORT = -1
_NONE = array("i", [NO_REPORT])
_ZEROS = array("q", [0])
_EMPTY: dict[bytes, Counters] = {}


class _Interned:
    """infohash <-> a small integer, counted: each distinct infohash is kept once, and
    dropped when nothing refers to it any more."""

    __slots__ = ("_free", "_index", "_names", "_refs")

    def __init__(self) -> None:
        self._index: dict[bytes, int] = {}
        self._names: list[bytes | None] = []
        self._refs = array("q")
        self._free: list[int] = []

    def take(self, name: bytes, refs: int = 1) -> int:
        i = self._index.get(name)
        if i is None:
            if self._free:
                i = self._free.pop()
                self._names[i] = name
            else:
                i = len(self._names)
                self._names.append(name)
                self._refs.append(0)
            self._index[name] = i
        self._refs[i] += refs
        return i

    def name(self, i: int) -> bytes:
        return self._names[i]  # type: ignore[return-value]

    def copy(self) -> list[bytes | None]:
        """index -> infohash (None: a free index), copied at C level."""
        return self._names.copy()

    def release(self, i: int) -> None:
        self._refs[i] -= 1
        if not self._refs[i]:
            del self._index[self._names[i]]  # type: ignore[arg-type]
            self._names[i] = None
            self._free.append(i)

    def __len__(self) -> int:
        return len(self._index)


class AccountTable(MutableMapping[bytes, "Account"]):
    """identity -> :class:`~anomos.tracker.store.Account`, packed by graph slot for the
    peers in the graph.

    An ``Account`` object per identity with its ``Reports`` and session cost ~250 B
    (two objects, the session's ``bytes``, the dict entry); a slot here costs 79 B:
    the five counters as 8-byte integers (saturating at ``COUNTER_MAX``), the
    session inline (``SESSION_BYTES``, a longer one in a dict beside), and the first
    report (an interned infohash's index and its two counters; further reports in a
    dict by slot). Accounts outlive a peer's stay: an identity outside the graph (it
    left, or its first announce comes before its join) keeps an ``Account`` object
    in a dict, moved into its slot when it joins (:meth:`joined`) and out of it when
    it leaves (:meth:`leaving`, before the graph frees the slot).

    Reading hands out a new ``Account`` (a copy): change one by storing it back
    (``table[identity] = account``); a copy is what a write-behind batch must hold
    anyway.
    """

    __slots__ = (
        "_count",
        "_graph",
        "_has",
        "_ih",
        "_long",
        "_loose",
        "_more",
        "_names",
        "_num",
        "_rep",
        "_sbuf",
        "_slen",
        "_slot_of",
    )

    def __init__(self, graph: PeerGraph) -> None:
        self._graph = graph
        self._slot_of = graph.slot
        #: slot -> 1 if it holds an account
        self._has = bytearray()
        #: slot * 5 + i -> counter i (_COUNTERS)
        self._num = array("q")
        #: slot -> session length (IN_DICT: in _long), and its bytes
        self._slen = bytearray()
        self._sbuf = bytearray()
        self._long: dict[int, bytes] = {}
        #: slot -> its first report's infohash (an index into _names, or NO_REPORT),
        #: and slot * 2 + i -> that report's uploaded, downloaded
        self._ih = array("i")
        self._rep = array("q")
        #: slot -> its reports beyond the first
        self._more: dict[int, dict[bytes, Counters]] = {}
        self._names = _Interned()
        #: identity -> account, for identities outside the graph
        self._loose: dict[bytes, Account] = {}
        self._count = 0

    # ------------------------------------------------------------------ reading
    def _slot(self, peer: Any) -> int | None:
        s = self._slot_of(peer)
        return s if s is not None and s < len(self._has) and self._has[s] else None

    def __getitem__(self, peer: bytes) -> Account:
        s = self._slot(peer)
        if s is None:
            return self._loose[peer]
        from anomos.tracker.store import Account  # store.py imports this module

        num = self._num[s * _NCOUNT : (s + 1) * _NCOUNT]
        account = Account(num[0], num[1], num[2], num[3], self._session_at(s), num[4])
        if self._ih[s] != NO_REPORT:
            reports = account.reports
            reports[self._names.name(self._ih[s])] = (self._rep[2 * s], self._rep[2 * s + 1])
            for ih, counters in self._more.get(s, _EMPTY).items():
                reports[ih] = counters
        return account

    def session(self, peer: bytes) -> bytes | None:
        """The account's session (None: no account), without copying the rest."""
        s = self._slot(peer)
        if s is None:
            account = self._loose.get(peer)
            return None if account is None else account.session
        return self._session_at(s)

    def _session_at(self, s: int) -> bytes:
        n = self._slen[s]
        if n == IN_DICT:
            return self._long[s]
        return bytes(self._sbuf[s * SESSION_BYTES : s * SESSION_BYTES + n])

    def __contains__(self, peer: object) -> bool:
        return peer in self._loose or self._slot(peer) is not None

    def __iter__(self) -> Iterator[bytes]:
        has, n = self._has, len(self._has)
        packed: list[Any] = [p for p, s in self._graph.slots() if s < n and has[s]]
        return itertools.chain(packed, list(self._loose))

    def __len__(self) -> int:
        return self._count + len(self._loose)

    # ------------------------------------------------------------------ writing
    def __setitem__(self, peer: bytes, account: Account) -> None:
        s = self._slot_of(peer)
        if s is None:
            self._loose[peer] = account
            return
        self._loose.pop(peer, None)
        self._grow(s + 1)
        if not self._has[s]:
            self._has[s] = 1
            self._count += 1
        else:
            self._drop_reports(s)
        self._num[s * _NCOUNT : (s + 1) * _NCOUNT] = array(
            "q", [min(getattr(account, c), COUNTER_MAX) for c in _COUNTERS]
        )
        self._set_session(s, account.session)
        if account.reports:
            self._store_reports(s, account.reports)

    def __delitem__(self, peer: bytes) -> None:
        s = self._slot(peer)
        if s is None:
            del self._loose[peer]
            return
        self._clear(s)

    def update(self, other: Any = (), /, **kwds: Any) -> None:
        """Many accounts at once (a restore): those of peers in the graph are written
        column by column, in C-level passes, not one ``__setitem__`` each (the same
        table either way)."""
        if not isinstance(other, Mapping) or kwds:
            super().update(other, **kwds)
            return
        items = list(other.items())
        found = list(map(self._slot_of, map(_first_of, items)))
        for (peer, account), s in zip(items, found, strict=True):
            if s is None:
                self._loose[peer] = account
        if self._loose:
            for (peer, _a), s in zip(items, found, strict=True):
                if s is not None:
                    self._loose.pop(peer, None)
        accounts = [a for (_k, a), s in zip(items, found, strict=True) if s is not None]
        slots = [s for s in found if s is not None]
        del items, found
        if not slots:
            return
        self._grow(max(slots) + 1)
        if self._count:
            for s in slots:
                if self._has[s]:
                    self._clear(s)
        try:
            self._pack(np.array(slots, dtype=np.int64), accounts)
        except OverflowError:  # a counter past 8 bytes: saturated one by one
            for s, account in zip(slots, accounts, strict=True):
                self[self._graph.at(s)] = account  # type: ignore[index]

    def _pack(self, slots: Any, accounts: list[Account]) -> None:
        """Write ``accounts`` into the empty ``slots`` (a numpy array) column by column."""
        n = len(accounts)
        counters = array(
            "q", itertools.chain.from_iterable(map(operator.attrgetter(*_COUNTERS), accounts))
        )
        reports: list[Reports] = list(map(operator.attrgetter("reports"), accounts))
        counts = array("q", itertools.chain.from_iterable(map(_inline_counters, reports)))
        if min(counters, default=0) < 0 or min(counts, default=0) < 0:
            raise OverflowError("account counters are never negative")
        sessions: list[bytes] = list(map(operator.attrgetter("session"), accounts))
        lengths = np.fromiter(map(len, sessions), dtype=np.int64, count=n)
        has = np.frombuffer(self._has, dtype=np.uint8)
        num = np.frombuffer(self._num, dtype=np.int64).reshape(-1, _NCOUNT)
        rep = np.frombuffer(self._rep, dtype=np.int64).reshape(-1, 2)
        ihs = np.frombuffer(self._ih, dtype=np.int32)
        slen = np.frombuffer(self._slen, dtype=np.uint8)
        sbuf = np.frombuffer(self._sbuf, dtype=np.uint8).reshape(-1, SESSION_BYTES)
        has[slots] = 1
        num[slots] = np.frombuffer(counters, dtype=np.int64).reshape(-1, _NCOUNT)
        rep[slots] = np.frombuffer(counts, dtype=np.int64).reshape(-1, 2)
        firsts = list(map(_first_report, reports))
        index: dict[bytes | None, int] = {None: NO_REPORT}
        for ih, refs in collections.Counter(firsts).items():
            if ih is not None:
                index[ih] = self._names.take(ih, refs)
        ihs[slots] = np.fromiter(map(index.__getitem__, firsts), dtype=np.int32, count=n)
        short = lengths <= SESSION_BYTES
        fit = [x for x, ok in zip(sessions, short.tolist(), strict=True) if ok]
        padded = b"".join(map(bytes.ljust, fit, itertools.repeat(SESSION_BYTES)))
        sbuf[slots[short]] = np.frombuffer(padded, dtype=np.uint8).reshape(-1, SESSION_BYTES)
        slen[slots[short]] = lengths[short]
        slen[slots[~short]] = IN_DICT
        del has, num, rep, ihs, slen, sbuf  # (an exported buffer cannot grow)
        for i in np.flatnonzero(~short).tolist():
            self._long[int(slots[i])] = sessions[i]
        for s, r in zip(slots.tolist(), reports, strict=True):
            if r._more:
                self._more[s] = dict(r._more)
        self._count += n

    def _store_reports(self, s: int, reports: Reports) -> None:
        items = iter(reports.items())
        ih, (up, down) = next(items)
        self._ih[s] = self._names.take(ih)
        self._rep[2 * s], self._rep[2 * s + 1] = min(up, COUNTER_MAX), min(down, COUNTER_MAX)
        more = dict(items)
        if more:
            self._more[s] = more

    def image(self, slots: int) -> AccountColumns:
        """Copies of the columns of the first ``slots`` graph slots and of the dicts beside,
        taken by the store's writer thread while serving goes on: each column a few MB
        at a time, each dict in one C-level copy (never a Python-level walk of a dict
        the event loop resizes). The columns may be read at different moments, and a
        slot reused meanwhile: :func:`~anomos.tracker.images.build_tables_image` says
        why what it keeps of them is exact."""
        from anomos.tracker.images import AccountColumns

        return AccountColumns(
            _chunked_copy(self, "_has", slots),
            _chunked_copy(self, "_num", slots * _NCOUNT, 8),
            _chunked_copy(self, "_slen", slots),
            _chunked_copy(self, "_sbuf", slots * SESSION_BYTES),
            _chunked_copy(self, "_ih", slots, 4),
            _chunked_copy(self, "_rep", slots * 2, 8),
            self._long.copy(),
            self._more.copy(),
            self._names.copy(),
            self._loose.copy(),
        )

    def joined(self, peer: bytes) -> bool:
        """``peer`` entered the graph: an account kept by identity moves into its slot.
        Whether one did."""
        account = self._loose.pop(peer, None)
        if account is not None:
            self[peer] = account
        return account is not None

    def leaving(self, peer: bytes) -> bool:
        """``peer`` leaves the graph (call before it does): its account moves out of its
        slot, to be kept by identity (accounts outlive a stay). Whether one did."""
        s = self._slot(peer)
        if s is not None:
            account = self[peer]
            self._clear(s)
            self._loose[peer] = account
        return s is not None

    def _clear(self, s: int) -> None:
        self._drop_reports(s)
        self._has[s] = 0
        self._count -= 1
        self._long.pop(s, None)
        self._slen[s] = 0

    def _drop_reports(self, s: int) -> None:
        if self._ih[s] != NO_REPORT:
            self._names.release(self._ih[s])
            self._ih[s] = NO_REPORT
        self._more.pop(s, None)

    def _set_session(self, s: int, session: bytes) -> None:
        n = len(session)
        if n <= SESSION_BYTES:
            self._long.pop(s, None)
            at = s * SESSION_BYTES
            self._sbuf[at : at + n] = session
            self._slen[s] = n
        else:
            self._long[s] = session
            self._slen[s] = IN_DICT

    def _grow(self, slots: int) -> None:
        grow = slots - len(self._has)
        if grow > 0:
            self._has.extend(bytes(grow))
            self._num.extend(_ZEROS * (grow * _NCOUNT))
            self._slen.extend(bytes(grow))
            self._sbuf.extend(bytes(grow * SESSION_BYTES))
            self._ih.extend(_NONE * grow)
            self._rep.extend(_ZEROS * (2 * grow))

    def infohashes(self) -> int:
        """Distinct infohashes the packed reports hold (for tests and stats)."""
        return len(self._names)


_first_of = operator.itemgetter(0)
_first_report = operator.attrgetter("_ih")
_inline_counters = operator.attrgetter("_up", "_down")
