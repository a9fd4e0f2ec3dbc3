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
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from anomos.tracker.tables import NO_REPORT, SESSION_BYTES, report_columns

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
    return _pack_lengths(lengths, b"".join(items))


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


#: A column's bytes: a copy the writer thread made (a bytearray), or read from the store.
Blob = bytes | bytearray


@attrs.frozen
class PeerColumns:
    """The live peers' rows by graph slot (:meth:`PeerTable.image`): each slot's peer
    (None: free) and the peer table's columns."""

    peers: list[Any]
    keys: Blob
    alen: Blob
    abuf: Blob
    #: slot -> address too long for the inline field
    other: dict[int, bytes]


@attrs.frozen
class AccountColumns:
    """Copies of an :class:`~anomos.tracker.tables.AccountTable`'s columns by graph slot
    (:meth:`AccountTable.image`) and of the dicts beside them."""

    has: Blob
    num: Blob
    slen: Blob
    sbuf: Blob
    ih: Blob
    rep: Blob
    #: slot -> session too long for the inline field; slot -> reports beyond the first
    long: dict[int, bytes]
    more: dict[int, dict[bytes, tuple[int, int]]]
    #: infohash index (``ih``) -> infohash (None: free)
    names: list[bytes | None]
    #: identity -> account, of the identities outside the graph
    loose: dict[bytes, Account]


@attrs.frozen
class TablesImage:
    """The stored image of the tables (one row of ``tables_image``), as of batch ``gen``."""

    gen: int
    #: per graph slot: the peer's identity (b"": a free slot), both keys, its address
    #: (a length byte and a fixed field; longer ones in ``long_slots``/``long_addresses``)
    identities: bytes
    keys: Blob
    alen: Blob
    abuf: Blob
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


def _interleave(columns: list[array[int]]) -> bytes:
    """int64 columns of one length as rows (one value of each in turn)."""
    return np.stack([np.frombuffer(c, np.int64) for c in columns], axis=1).tobytes()


def build_tables_image(
    gen: int,
    peer_columns: Callable[[], PeerColumns],
    account_columns: Callable[[int], AccountColumns],
    slot_of: Callable[[Any], int | None],
    swarms: Callable[[], Iterable[tuple[bytes, dict[Any, int]]]],
) -> TablesImage:
    """Pack the tables as of batch ``gen``, in the writer thread while the event loop
    serves (and changes them), by copies of their columns a few MB at a time and
    C-level copies of their dicts: nothing here walks a dict the loop resizes, so
    nothing fails half-way.

    ``peer_columns()`` gives each graph slot's peer and the peer table's columns;
    ``account_columns(slots)`` the account table's (:meth:`AccountTable.image`);
    ``slot_of`` is the graph's live slot lookup; ``swarms()`` gives copies of each
    torrent's members and what they have left. Each is read at its own moment, so
    the image may mix states from after batch ``gen``. Why the restore
    (:meth:`~anomos.tracker.store.Store.load`) is nonetheless exact for every account:
    the batches after ``gen`` log (``accounts_log``) every identity whose account they
    create or change, and every one whose account moved between its graph slot and
    the table's loose dict (a join or a leave, :meth:`Accounting.joined`); the image is
    committed with the next batch, which holds every change made while it was read,
    and the log keeps every entry after ``gen``. The restore drops every identity
    logged after ``gen`` from the image and reads it from its rows (maybe none). An
    identity X logged nowhere after ``gen`` kept its account (or its having none) and
    its account's place from ``gen`` until the image was committed, so:

    - X's account sat in slot s all along: X stayed in the graph (a leave moves the
      account), so s was X's throughout, only X's changes (none) write it, and any
      copy of s's columns is X's account; the slot's peer, read at any moment, is X.
    - X's account was loose all along: the one copy of the loose dict holds X's
      account object, unchanged (one changed is logged).
    - X had no account: none appears under its name loose; a slot's columns are put
      under X only if the slot's peer read was X, and the restore keeps a slot's
      account only if the graph's image (exact at ``gen``) has a peer in that slot whose
      stay (its join sequence number) is still live when the image is committed, so X
      stayed in that slot all along and its columns said "no account" all along.

    Peers' rows and swarm rows are the same: a peer's change, join or leave is logged
    (``peers_log``) and re-read; an unlogged peer kept its slot, row and swarm rows."""
    peers = peer_columns()
    n = len(peers.peers)
    identities = pack_strings([p or b"" for p in peers.peers])
    long_slots = np.array(sorted(peers.other), dtype=np.int64)
    long_addresses = pack_strings([peers.other[s] for s in long_slots.tolist()])
    named = np.zeros(n, dtype=bool)
    for first in range(0, n, CHUNK):
        some = peers.peers[first : first + CHUNK]
        named[first : first + len(some)] = np.fromiter(
            map(operator.is_not, some, itertools.repeat(None)), bool, len(some)
        )
    keys, alen, abuf = peers.keys, peers.alen, peers.abuf
    del peers
    columns = account_columns(n)
    ihs: dict[bytes, int] = {}
    # ---- accounts in a graph slot (that has a peer), straight from the columns
    slots = np.flatnonzero((np.frombuffer(columns.has, np.uint8) != 0) & named)
    counters = _gather(np.frombuffer(columns.num, np.int64).reshape(-1, ACCOUNT_COUNTERS), slots)
    lengths, sessions = _slot_sessions(columns, slots)
    reports = [_inline_reports(columns, slots, ihs)]
    more: list[tuple[int, int, int, int]] = []
    if columns.more:  # (rare: peers in more than one torrent)
        which = np.array(list(columns.more), dtype=np.int64)
        at = np.searchsorted(slots, which)
        for s, i in zip(which.tolist(), at.tolist(), strict=True):
            if i < len(slots) and slots[i] == s:
                for ih, (up, down) in list(columns.more[s].items()):
                    more.append((i, ihs.setdefault(ih, len(ihs)), up, down))
    # ---- accounts of identities outside the graph (a copy of the loose dict)
    loose = list(columns.loose.items())
    names = [k for k, _ in loose]
    owned = [a for _, a in loose]
    del loose
    loose_counters = np.array(list(map(_COUNTERS, owned)), dtype=np.int64).reshape(
        -1, ACCOUNT_COUNTERS
    )
    loose_sessions: list[bytes] = list(map(_SESSION, owned))
    inline_ih, inline_up, inline_down, others = report_columns(list(map(_REPORTS, owned)))
    base = len(slots)
    for i, ih in enumerate(inline_ih):
        if ih is not None:
            more.append((base + i, ihs.setdefault(ih, len(ihs)), inline_up[i], inline_down[i]))
        if others[i]:
            for ih2, (up, down) in list(others[i].items()):
                more.append((base + i, ihs.setdefault(ih2, len(ihs)), up, down))
    reports.append(np.array(more, dtype=np.int64).reshape(-1, REPORT_FIELDS))
    account_slots = np.concatenate([slots, np.full(len(names), -1, dtype=np.int64)])
    lengths = np.concatenate([lengths, np.fromiter(map(len, loose_sessions), np.int64)])
    sessions += b"".join(loose_sessions)
    # ---- swarm rows, by the slot of each member
    swarm_cols: list[array[int]] = [array("q") for _ in range(SWARM_FIELDS)]
    member_slots, member_ihs, lefts = swarm_cols
    for ih, members in swarms():  # (copies: two lists of one dict agree)
        h = ihs.setdefault(ih, len(ihs))
        peers_in, left_in = list(members), list(members.values())  # (no tuple per member)
        for first in range(0, len(peers_in), CHUNK):
            some = peers_in[first : first + CHUNK]
            member = np.fromiter(
                (-1 if s is None else s for s in map(slot_of, some)), np.int64, len(some)
            )
            left = np.array(left_in[first : first + CHUNK], dtype=np.int64)
            known = (member >= 0) & (member < n)  # (else it joined after batch ``gen``)
            member_slots.frombytes(member[known].tobytes())
            lefts.frombytes(left[known].tobytes())
            member_ihs.extend(itertools.repeat(h, int(known.sum())))
    return TablesImage(
        gen,
        identities,
        keys,
        alen,
        abuf,
        long_slots.tobytes(),
        long_addresses,
        account_slots.tobytes(),
        pack_strings(names),
        (np.concatenate([counters, loose_counters]) if len(loose_counters) else counters).tobytes(),
        _pack_lengths(lengths, sessions),
        pack_strings(list(ihs)),
        np.concatenate(reports).tobytes(),
        _interleave(swarm_cols),
    )


def _gather(column: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``column[rows]``, a chunk of rows at a time (a numpy gather holds the GIL: one of
    10^6 rows would stall the event loop for tens of ms)."""
    out = np.empty((len(rows), *column.shape[1:]), dtype=column.dtype)
    for first in range(0, len(rows), CHUNK):
        out[first : first + CHUNK] = column[rows[first : first + CHUNK]]
    return out


def _slot_sessions(columns: AccountColumns, slots: np.ndarray) -> tuple[np.ndarray, bytes]:
    """The sessions of the accounts in ``slots``: their lengths and their bytes end to
    end (those longer than the inline field from the dict beside)."""
    lengths = _gather(np.frombuffer(columns.slen, np.uint8), slots).astype(np.int64)
    rows = _gather(np.frombuffer(columns.sbuf, np.uint8).reshape(-1, SESSION_BYTES), slots)
    in_dict = np.flatnonzero(lengths > SESSION_BYTES)  # (IN_DICT)
    lengths[in_dict] = 0
    width = np.arange(SESSION_BYTES)
    parts = [
        rows[first : first + CHUNK][width < lengths[first : first + CHUNK, None]].tobytes()
        for first in range(0, len(slots), CHUNK)
    ]
    data = b"".join(parts)
    if len(in_dict):  # (rare: a session longer than the inline field)
        ends = np.cumsum(lengths)
        pieces, at = [], 0
        for r in in_dict.tolist():
            cut = int(ends[r])  # (where row r's bytes go: it has none inline)
            session = columns.long.get(int(slots[r]), b"")  # (b"": changed since, logged)
            pieces += [data[at:cut], session]
            lengths[r], at = len(session), cut
        pieces.append(data[at:])
        data = b"".join(pieces)
    return lengths, data


def _inline_reports(
    columns: AccountColumns, slots: np.ndarray, ihs: dict[bytes, int]
) -> np.ndarray:
    """(account, infohash, uploaded, downloaded) rows of the first report of each account
    in ``slots`` (its index in them), its infohash numbered in ``ihs``."""
    first = _gather(np.frombuffer(columns.ih, np.int32), slots).astype(np.int64)
    owners = np.flatnonzero(first != NO_REPORT)
    named = first[owners]
    used = np.unique(named)
    names = columns.names
    index = np.array(
        [
            -1 if i >= len(names) or names[i] is None else ihs.setdefault(names[i], len(ihs))  # type: ignore[arg-type]
            for i in used.tolist()
        ],
        dtype=np.int64,
    )
    which = index[np.searchsorted(used, named)] if len(used) else named
    counts = _gather(np.frombuffer(columns.rep, np.int64).reshape(-1, 2), slots[owners])
    keep = which >= 0  # (an index freed since: its account changed, logged)
    return np.column_stack([owners[keep], which[keep], counts[keep]])


def _pack_lengths(lengths: np.ndarray, data: bytes) -> bytes:
    """Byte strings given by their lengths and their bytes end to end, packed as
    :func:`pack_strings` does."""
    return np.int64(len(lengths)).tobytes() + np.cumsum(lengths, dtype=np.int64).tobytes() + data


_SESSION = operator.attrgetter("session")
_COUNTERS = operator.attrgetter(
    "uploaded", "downloaded", "relayed_claimed", "relayed_confirmed", "relayed_reported"
)

_REPORTS = operator.attrgetter("reports")
