"""Packed images of the tracker's tables, so a restart reads a few BLOBs, not 10^6 rows.

Beside the graph's image (:class:`~anomos.tracker.graph.GraphImage`) the store
keeps one :class:`TablesImage`: the live peers' rows by graph slot (keys,
addresses), every account with its reports, and every swarm row, as arrays of
fixed-width integers and packed byte strings. A restart unpacks it with C-level
passes and then re-reads from the tables only the rows changed after it (their
keys are logged per batch, see :mod:`anomos.tracker.store`).

The peers' part is copied on the event loop with the graph's image (a copy of
arrays: exact at that batch); the accounts and swarms are packed afterwards in
the store's writer thread, while serving goes on, so they may already hold
some later changes. That is safe because the image is labelled with the batch
it was started at and committed only with a later batch, which logs every key
changed meanwhile: a restore replays those keys from their rows, whatever the
image caught of them. A key the image holds is either unchanged since, or
replayed.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

if TYPE_CHECKING:
    from anomos.tracker.store import Account

#: Counters per account, in this order, as int64.
ACCOUNT_COUNTERS = 5
#: int64 fields of a report (account index, infohash index, uploaded, downloaded) and
#: of a swarm row (account index, infohash index, left).
REPORT_FIELDS = 4
SWARM_FIELDS = 3


def pack_strings(items: Sequence[bytes]) -> bytes:
    """Byte strings as one blob: their count, their end offsets (int64), their bytes."""
    ends = np.cumsum(np.fromiter(map(len, items), dtype=np.int64, count=len(items)))
    return np.int64(len(items)).tobytes() + ends.tobytes() + b"".join(items)


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
    """The live peers' rows by graph slot, copied on the event loop with the graph's
    image: each slot's peer (None: free) and :meth:`PeerTable.image`'s columns."""

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
    #: every account: its peer's graph slot (int64; -1: no live peer, then its identity
    #: is in ``accounts``, else b"" there: the object is the slot's, shared), its
    #: counters (int64, ACCOUNT_COUNTERS each), its session
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


def build_tables_image(
    gen: int,
    peers: PeerColumns,
    accounts: Mapping[bytes, Account],
    swarms: Callable[[], Iterable[tuple[bytes, dict[Any, int]]]],
) -> TablesImage:
    """Pack the tables (in the writer thread: serving goes on meanwhile).

    ``accounts`` and the swarms (``swarms()``: each torrent's members and what
    they have left) are read while the event loop may change them: an account
    or report that changes under the reading may be caught half-way or skipped;
    either way it was changed after batch ``gen``, so its key is logged and the
    restore replays it from its rows."""
    identities = pack_strings([p or b"" for p in peers.peers])
    long_slots = np.array(sorted(peers.other), dtype=np.int64)
    long_addresses = pack_strings([peers.other[s] for s in long_slots.tolist()])
    items = list(accounts.items())  # one C-level copy: the dict may grow meanwhile
    slot_of = {p: s for s, p in enumerate(peers.peers) if p is not None}
    account_slots = array("q", [slot_of.get(k, -1) for k, _ in items])
    names = [b"" if s >= 0 else k for s, (k, _) in zip(account_slots, items, strict=True)]
    # Filled a row at a time (Python steps: the event loop gets the GIL between them),
    # not converted from lists at the end (one C call of ~0.2 s at 10^6: a stall).
    counters = array("q")
    sessions: list[bytes] = []
    ihs: dict[bytes, int] = {}
    reports = array("q")
    for i, (_k, a) in enumerate(items):
        counters.extend(
            (
                a.uploaded,
                a.downloaded,
                a.relayed_claimed,
                a.relayed_confirmed,
                a.relayed_reported,
            )
        )
        sessions.append(a.session)
        try:
            for ih, (up, down) in list(a.reports.items()):
                reports.extend((i, ihs.setdefault(ih, len(ihs)), up, down))
        except (KeyError, RuntimeError, ValueError):
            continue  # changed under the reading: replayed from its rows
    swarm = array("q")
    for ih, members in swarms():
        h = ihs.setdefault(ih, len(ihs))
        for peer, left in members.items():
            s = slot_of.get(peer)
            if s is not None:  # (else it joined after batch ``gen``: replayed)
                swarm.extend((s, h, left))
    return TablesImage(
        gen,
        identities,
        peers.keys,
        peers.alen,
        peers.abuf,
        long_slots.tobytes(),
        long_addresses,
        account_slots.tobytes(),
        pack_strings(names),
        counters.tobytes(),
        pack_strings(sessions),
        pack_strings(list(ihs)),
        reports.tobytes(),
        swarm.tobytes(),
    )
