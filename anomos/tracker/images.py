"""Packed images of the tracker's tables, so a restart reads a few BLOBs, not 10^6 rows.

Beside the graph's image (:class:`~anomos.tracker.graph.GraphImage`) the store
keeps one :class:`TablesImage`: the live peers' rows by graph slot (keys,
addresses), every account with its reports, and every swarm row, as arrays of
fixed-width integers and packed byte strings. A restart unpacks it with C-level
passes and then re-reads from the tables only the rows changed after it (their
keys are logged per batch, see :mod:`anomos.tracker.store`).

Only the graph's image is copied on the event loop (exact at its batch); the
tables' are read afterwards in the store's writer thread, in short C-level
passes, while serving goes on, so they may already hold some later changes.
That is safe because the image is labelled with the batch it was started at
and committed only with a later batch, which logs every key changed
meanwhile: a restore replays those keys from their rows, whatever the image
caught of them, and takes the graph image's slots as the truth for which
slot held whom. A key the image holds is either unchanged since, or replayed.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from anomos.tracker.tables import report_columns

if TYPE_CHECKING:
    from anomos.tracker.store import Account

#: Counters per account, in this order, as int64.
ACCOUNT_COUNTERS = 5
#: int64 fields of a report (account index, infohash index, uploaded, downloaded) and
#: of a swarm row (account index, infohash index, left).
REPORT_FIELDS = 4
SWARM_FIELDS = 3
#: Items per C-level pass while packing in the writer thread: each pass holds the GIL
#: (a few ms), and the event loop gets it back between passes.
CHUNK = 50_000


def pack_strings(items: Sequence[bytes]) -> bytes:
    """Byte strings as one blob: their count, their end offsets (int64), their bytes
    (lengths taken a chunk at a time: the writer thread packs 10^6 of them)."""
    lengths = np.zeros(len(items), dtype=np.int64)
    for first in range(0, len(items), CHUNK):
        some = items[first : first + CHUNK]
        lengths[first : first + len(some)] = np.fromiter(map(len, some), np.int64, len(some))
    return np.int64(len(items)).tobytes() + np.cumsum(lengths).tobytes() + b"".join(items)


def unpack_strings(blob: bytes) -> list[bytes]:
    """:func:`pack_strings` undone; ValueError when the blob does not fit together."""
    if len(blob) < 8:
        raise ValueError("a packed string list is cut short")
    n = int(np.frombuffer(blob, np.int64, count=1)[0])
    if not 0 <= n <= (len(blob) - 8) // 8:
        raise ValueError("a packed string list is cut short")
    ends = np.frombuffer(blob, np.int64, count=n, offset=8)
    at = 8 + 8 * n
    lengths = np.diff(ends, prepend=0)
    if (ends[-1] if n else 0) != len(blob) - at or bool(np.any(lengths < 0)):
        raise ValueError("a packed string list does not fit together")
    widths = np.unique(lengths[lengths > 0])
    if len(widths) == 1:  # all of one width (identities, sessions): made at C level
        items = np.frombuffer(blob, f"V{int(widths[0])}", offset=at).tolist()
        if len(items) == n:
            return items  # type: ignore[no-any-return]
        rest = iter(items)
        return [next(rest) if k else b"" for k in (lengths > 0).tolist()]
    data = blob[at:]
    starts = [0, *ends[:-1].tolist()]
    return list(map(data.__getitem__, map(slice, starts, ends.tolist())))


def int_columns(blob: bytes, fields: int) -> np.ndarray:
    """An int64 blob of rows of ``fields`` values, as a (rows, fields) array."""
    if len(blob) % (8 * fields):
        raise ValueError("a packed table is cut short")
    return np.frombuffer(blob, np.int64).reshape(-1, fields)


@attrs.frozen
class PeerColumns:
    """The live peers' rows by graph slot (:meth:`PeerTable.image`): each slot's peer
    (None: free) and the peer table's columns."""

    peers: list[Any]
    keys: bytes
    alen: bytes
    abuf: bytes
    #: slot -> address too long for the inline field
    other: dict[int, bytes]


@attrs.frozen
class TablesImage:
    """The stored image of the tables (one row of ``tables_image``), as of batch ``gen``."""

    gen: int
    #: per graph slot: the peer's identity (b"": a free slot), both keys, its address
    #: (a length byte and a fixed field; longer ones in ``long_slots``/``long_addresses``)
    identities: bytes
    keys: bytes
    alen: bytes
    abuf: bytes
    long_slots: bytes
    long_addresses: bytes
    #: every account: its peer's graph slot (int64; -1: no live peer, and then its
    #: identity is the next one in ``accounts``; else the slot's identity object is its
    #: key, shared), its counters (int64, ACCOUNT_COUNTERS each), its session
    account_slots: bytes
    accounts: bytes
    counters: bytes
    sessions: bytes
    #: the infohashes the reports and swarm rows name by index
    infohashes: bytes
    #: int64 rows: (account, infohash, uploaded, downloaded) and (slot, infohash, left)
    reports: bytes
    swarm: bytes

    def row(self) -> tuple[Any, ...]:
        return attrs.astuple(self, recurse=False)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i : i + CHUNK]


def _interleave(columns: list[array[int]]) -> bytes:
    """int64 columns of one length as rows (one value of each in turn)."""
    return np.stack([np.frombuffer(c, np.int64) for c in columns], axis=1).tobytes()


def build_tables_image(
    gen: int,
    peer_columns: Callable[[], PeerColumns],
    accounts: Mapping[bytes, Account],
    swarms: Callable[[], Iterable[tuple[bytes, dict[Any, int]]]],
) -> TablesImage:
    """Pack the tables (in the writer thread: serving goes on meanwhile), a chunk of
    C-level passes at a time (a Python step per account was ~8 s of CPU at 10^6).

    ``accounts`` and the swarms (``swarms()``: each torrent's members and what
    they have left) are read while the event loop may change them: an account
    or report that changes under the reading may be caught half-way; either way
    it was changed after batch ``gen``, so its key is logged and the restore
    replays it from its rows; so does a peer's row (``peer_columns()``: each graph slot's
    peer and the peer table's columns, read now: a slot whose peer changed since the
    graph's image belongs to a logged peer, and one free in that image is cleared)."""
    peers = peer_columns()
    slot_of: dict[Any, int] = {}
    for first in range(0, len(peers.peers), CHUNK):
        some = peers.peers[first : first + CHUNK]
        slot_of.update(zip(some, range(first, first + len(some)), strict=True))
    slot_of.pop(None, None)
    identities = pack_strings([p or b"" for p in peers.peers])
    long_slots = np.array(sorted(peers.other), dtype=np.int64)
    long_addresses = pack_strings([peers.other[s] for s in long_slots.tolist()])
    keys = list(accounts)  # (accounts are never removed: each key's value is there)
    slots = array("q")
    names: list[bytes] = []
    counters: list[array[int]] = [array("q") for _ in range(ACCOUNT_COUNTERS)]
    fields = [
        operator.attrgetter(name)
        for name in (
            "uploaded",
            "downloaded",
            "relayed_claimed",
            "relayed_confirmed",
            "relayed_reported",
        )
    ]
    sessions: list[bytes] = []
    # Each account's inline report (infohash or None, uploaded, downloaded) and its others.
    inline_ih: list[bytes | None] = []
    inline_up: list[int] = []
    inline_down: list[int] = []
    more: list[dict[bytes, tuple[int, int]] | None] = []
    for chunk in _chunks(keys):
        owned = list(map(accounts.__getitem__, chunk))
        where = array("q", map(slot_of.get, chunk, itertools.repeat(-1)))
        slots.extend(where)
        names.extend(itertools.compress(chunk, map(operator.gt, itertools.repeat(0), where)))
        for column, field in zip(counters, fields, strict=True):
            column.extend(map(field, owned))
        sessions.extend(map(_SESSION, owned))
        ih_column, up_column, down_column, more_column = report_columns(list(map(_REPORTS, owned)))
        inline_ih += ih_column
        inline_up += up_column
        inline_down += down_column
        more += more_column
    ihs: dict[bytes, int] = {}
    report_cols: list[array[int]] = [array("q") for _ in range(REPORT_FIELDS)]
    owner, which, ups, downs = report_cols
    for first in range(0, len(inline_ih), CHUNK):
        some = inline_ih[first : first + CHUNK]
        inline = [i for i, ih in enumerate(some, first) if ih is not None]
        named = list(map(inline_ih.__getitem__, inline))
        for ih in dict.fromkeys(named):  # (few: the distinct infohashes)
            ihs.setdefault(ih, len(ihs))  # type: ignore[arg-type]
        owner.extend(inline)
        which.extend(map(ihs.__getitem__, named))  # type: ignore[arg-type]
        ups.extend(map(inline_up.__getitem__, inline))
        downs.extend(map(inline_down.__getitem__, inline))
    for i, others in enumerate(more):
        if others:  # (rare: a peer in more than one torrent)
            for ih, (up, down) in list(others.items()):
                owner.append(i)
                which.append(ihs.setdefault(ih, len(ihs)))
                ups.append(up)
                downs.append(down)
    swarm_cols: list[array[int]] = [array("q") for _ in range(SWARM_FIELDS)]
    member_slots, member_ihs, lefts = swarm_cols
    for ih, members in swarms():
        h = ihs.setdefault(ih, len(ihs))
        peers_in, left_in = list(members), list(members.values())
        for first in range(0, len(peers_in), CHUNK):
            member = np.fromiter(
                map(slot_of.get, peers_in[first : first + CHUNK], itertools.repeat(-1)), np.int64
            )
            left = np.array(left_in[first : first + CHUNK], dtype=np.int64)
            known = member >= 0  # (else it joined after batch ``gen``: replayed)
            member_slots.frombytes(member[known].tobytes())
            lefts.frombytes(left[known].tobytes())
            member_ihs.extend(itertools.repeat(h, int(known.sum())))
    return TablesImage(
        gen,
        identities,
        peers.keys,
        peers.alen,
        peers.abuf,
        long_slots.tobytes(),
        long_addresses,
        slots.tobytes(),
        pack_strings(names),
        _interleave(counters),
        pack_strings(sessions),
        pack_strings(list(ihs)),
        _interleave(report_cols),
        _interleave(swarm_cols),
    )


_SESSION = operator.attrgetter("session")
_REPORTS = operator.attrgetter("reports")
