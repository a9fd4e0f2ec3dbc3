"""The tracker's durable state in SQLite, so a restart loses nothing.

The tracker serves from memory (the graph, the swarms) and never waits for
this module: :meth:`Store.submit` turns the changes accumulated since the last
flush into plain rows on the event loop (a few microseconds each) and one
writer thread applies them in one transaction, WAL checkpoints included. A
crash (even ``kill -9``) loses the last transaction at most, a second or two
of announces, which peers simply repeat. On start it reads everything back and
rebuilds the graph with the same NIDs, so the peers' existing links stay valid:
from the last packed images of the graph and of the other tables plus the
links and rows changed after them (see below and :mod:`anomos.tracker.images`),
so that a million peers' rows and three million links are not read one by one.

Only what changed is written: a peer row when a peer joins or changes its keys
or address (not on every announce: when it was last seen is not stored, a
restart gives every peer a new expiry window), an account or a report when its
counters moved. Peers are keyed by an integer id (their join sequence number)
in ``peers``, ``links`` and ``swarm``; the tables are ``WITHOUT ROWID`` where
the primary key is the natural one, so each change is one B-tree update.

Tables: ``peers`` (live peers: id, keys, contact address), ``accounts``
(lifetime transfer totals: relayed bytes as claimed by the peer, as confirmed
by its neighbours' receipts, and the credited lesser of the two; the session
and ``relayed`` last reported; kept after a peer leaves so neither its ratio
nor its baselines are lost), ``reports`` (per identity and torrent, the
cumulative counters last reported in the current session), ``links`` (the
neighbour graph: the two peer ids, the NID, the id of the end that dials, or 0
when that is not fixed yet, and ``gen``, the number of the batch that wrote
it), ``links_gone`` (links removed, with the batch that removed them, since
the image), ``graph_image`` (one row: the packed graph's arrays as of batch
``gen``, written every few minutes and on close), ``tables_image`` (one row:
the other tables packed as of the same batch), ``peers_log`` and
``accounts_log`` (the keys of the rows each batch changed: peer ids for a
peer's row or swarm rows, identities for an account or its reports; a
restore re-reads those after the images' batch), ``swarm``
(torrent membership and bytes left), ``torrents`` (the largest
``left`` seen: the torrent's size as far as the tracker can tell) and ``meta``
(counters). The view ``edges`` gives the links by identity, for people and
tools reading the file. Schema 1 (keyed by identity, one row per announce),
schema 2 (no ``gen``, no image) and schema 3 (no tables image, no logs) are
converted in place on first open.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import operator
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from itertools import starmap
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from anomos.errors import ConfigError
from anomos.fsutil import private_file
from anomos.tracker.graph import GraphImage, Link
from anomos.tracker.images import (
    ACCOUNT_COUNTERS,
    REPORT_FIELDS,
    SWARM_FIELDS,
    PeerColumns,
    TablesImage,
    int_columns,
    unpack_strings,
)
from anomos.tracker.tables import ADDRESS_BYTES, KEY_BYTES, Reports

log = logging.getLogger(__name__)

DB_FILE = "tracker.sqlite3"
SCHEMA_VERSION = 4
#: SQLite page cache (KiB): the hot part of the B-trees (recent peers, their links).
CACHE_KIB = 65536

#: Schema 2 -> 3: links written since the graph image are found by their batch number
#: (``gen``), links removed since then in ``links_gone``; the image itself.
_LINKS_V3 = """
CREATE INDEX IF NOT EXISTS links_by_gen ON links (gen);
CREATE TABLE IF NOT EXISTS links_gone (
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    PRIMARY KEY (a, b)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS graph_image (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    gen INTEGER NOT NULL,
    width INTEGER NOT NULL,
    ids BLOB NOT NULL,
    nbr BLOB NOT NULL,
    nid BLOB NOT NULL,
    flags BLOB NOT NULL,
    deg BLOB NOT NULL
);
"""

#: Schema 3 -> 4: the image of the other tables (:mod:`anomos.tracker.images`), and the
#: keys of the rows each batch changed (peers by id: their row or swarm rows; accounts by
#: identity: the account or its reports), so a restore re-reads only those after it.
_TABLES_V4 = """
CREATE TABLE IF NOT EXISTS peers_log (
    gen INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (gen, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts_log (
    gen INTEGER NOT NULL,
    identity BLOB NOT NULL,
    PRIMARY KEY (gen, identity)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tables_image (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    gen INTEGER NOT NULL,
    identities BLOB NOT NULL,
    keys BLOB NOT NULL,
    alen BLOB NOT NULL,
    abuf BLOB NOT NULL,
    long_slots BLOB NOT NULL,
    long_addresses BLOB NOT NULL,
    account_slots BLOB NOT NULL,
    accounts BLOB NOT NULL,
    counters BLOB NOT NULL,
    sessions BLOB NOT NULL,
    infohashes BLOB NOT NULL,
    reports BLOB NOT NULL,
    swarm BLOB NOT NULL
);
"""

_SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    id INTEGER PRIMARY KEY,
    identity BLOB NOT NULL,
    onion BLOB NOT NULL,
    box BLOB NOT NULL,
    address TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    identity BLOB PRIMARY KEY,
    uploaded INTEGER NOT NULL,
    downloaded INTEGER NOT NULL,
    relayed INTEGER NOT NULL,
    session BLOB NOT NULL,
    relayed_reported INTEGER NOT NULL,
    relayed_claimed INTEGER NOT NULL DEFAULT 0,
    relayed_confirmed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    identity BLOB NOT NULL,
    infohash BLOB NOT NULL,
    uploaded INTEGER NOT NULL,
    downloaded INTEGER NOT NULL,
    PRIMARY KEY (identity, infohash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS links (
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    nid INTEGER NOT NULL,
    dialer INTEGER NOT NULL,
    gen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (a, b)
) WITHOUT ROWID;
{links_v3}
{tables_v4}
CREATE TABLE IF NOT EXISTS swarm (
    peer INTEGER NOT NULL,
    infohash BLOB NOT NULL,
    left INTEGER NOT NULL,
    PRIMARY KEY (peer, infohash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS torrents (infohash BLOB PRIMARY KEY, size INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS edges AS
    SELECT pa.identity AS a, pb.identity AS b, links.nid AS nid, pd.identity AS dialer
    FROM links JOIN peers pa ON pa.id = links.a JOIN peers pb ON pb.id = links.b
    LEFT JOIN peers pd ON pd.id = links.dialer;
"""

_SCHEMA = _SCHEMA_TEMPLATE.replace("{links_v3}", _LINKS_V3).replace("{tables_v4}", _TABLES_V4)

#: Schema 1, keyed by identity: the tables an old database may lack are made before converting.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS peers (identity BLOB PRIMARY KEY, onion BLOB NOT NULL,
    box BLOB NOT NULL, address TEXT NOT NULL, last_seen REAL NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (identity BLOB PRIMARY KEY, uploaded INTEGER NOT NULL,
    downloaded INTEGER NOT NULL, relayed INTEGER NOT NULL, session BLOB NOT NULL,
    relayed_reported INTEGER NOT NULL, relayed_claimed INTEGER NOT NULL DEFAULT 0,
    relayed_confirmed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reports (identity BLOB NOT NULL, infohash BLOB NOT NULL,
    uploaded INTEGER NOT NULL, downloaded INTEGER NOT NULL, PRIMARY KEY (identity, infohash));
CREATE TABLE IF NOT EXISTS edges (a BLOB NOT NULL, b BLOB NOT NULL, nid INTEGER NOT NULL,
    PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS dialers (a BLOB NOT NULL, b BLOB NOT NULL, dialer BLOB NOT NULL,
    PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS swarm (infohash BLOB NOT NULL, peer BLOB NOT NULL,
    left INTEGER NOT NULL, uploaded INTEGER NOT NULL, downloaded INTEGER NOT NULL,
    PRIMARY KEY (infohash, peer));
CREATE TABLE IF NOT EXISTS torrents (infohash BLOB PRIMARY KEY, size INTEGER NOT NULL);
"""

#: Schema 1 -> 2, in one transaction: the identity-keyed tables become id-keyed ones.
_MIGRATE_V1 = """
ALTER TABLE peers RENAME TO peers_v1;
ALTER TABLE accounts RENAME TO accounts_v1;
ALTER TABLE reports RENAME TO reports_v1;
ALTER TABLE edges RENAME TO edges_v1;
ALTER TABLE swarm RENAME TO swarm_v1;
ALTER TABLE torrents RENAME TO torrents_v1;
{schema}
INSERT INTO peers SELECT seq, identity, onion, box, address FROM peers_v1;
INSERT INTO accounts SELECT identity, uploaded, downloaded, relayed, session, relayed_reported,
    relayed_claimed, relayed_confirmed FROM accounts_v1;
INSERT INTO reports SELECT * FROM reports_v1;
INSERT OR REPLACE INTO links (a, b, nid, dialer)
    SELECT min(pa.seq, pb.seq), max(pa.seq, pb.seq), e.nid, coalesce(pd.seq, 0)
    FROM edges_v1 e JOIN peers_v1 pa ON pa.identity = e.a JOIN peers_v1 pb ON pb.identity = e.b
    LEFT JOIN dialers d ON d.a = e.a AND d.b = e.b
    LEFT JOIN peers_v1 pd ON pd.identity = d.dialer;
INSERT OR REPLACE INTO swarm
    SELECT p.seq, s.infohash, s.left FROM swarm_v1 s JOIN peers_v1 p ON p.identity = s.peer;
INSERT INTO torrents SELECT * FROM torrents_v1;
DROP TABLE peers_v1;
DROP TABLE accounts_v1;
DROP TABLE reports_v1;
DROP TABLE edges_v1;
DROP TABLE dialers;
DROP TABLE swarm_v1;
DROP TABLE torrents_v1;
UPDATE meta SET value = {version} WHERE key = 'schema_version';
"""


@attrs.define
class PeerRow:
    """A live peer: its keys and contact address (stored), when it was last seen
    (memory only) and its id, the join sequence number (the key of its stored rows)."""

    identity: bytes
    onion: bytes
    box: bytes
    address: str
    last_seen: float
    seq: int


@attrs.define
class Account:
    """Lifetime totals of one identity, and what it last reported in its current session.

    Peers report cumulative counters per session; the tracker credits the
    increase over the last report, so the baselines must outlive the peer's
    expiry (a peer back after a network blip keeps its session).
    """

    uploaded: int = 0
    downloaded: int = 0
    #: relayed bytes the peer says it relayed (the increases of its own reports)
    relayed_claimed: int = 0
    #: link bytes its neighbours' receipts say they received from it
    relayed_confirmed: int = 0
    session: bytes = b""
    relayed_reported: int = 0
    #: infohash -> (uploaded, downloaded) last reported in ``session`` (a compact mapping)
    reports: Reports = attrs.field(factory=Reports, eq=False)

    @property
    def relayed(self) -> int:
        """Relayed bytes credited: a claim counts only as far as neighbours confirm it."""
        return min(self.relayed_claimed, self.relayed_confirmed)


@attrs.define
class SwarmRow:
    """One peer in one torrent: what it has left and the counters it last reported."""

    left: int
    uploaded: int = 0
    downloaded: int = 0


_first = operator.itemgetter(0)
_rest = operator.itemgetter(slice(1, None))


#: infohash -> live peer -> bytes left
Swarm = dict[bytes, dict[bytes, int]]
#: The tables image's columns, in its class's order.
_TABLES_COLUMNS = ", ".join(f.name for f in attrs.fields(TablesImage))


def _within(column: np.ndarray, lo: int, hi: int) -> bool:
    """Whether every value of ``column`` is in [lo, hi)."""
    return not len(column) or bool(lo <= column.min() and column.max() < hi)


def _group(rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Swarm rows (account, infohash, left) grouped by infohash index."""
    if not len(rows):
        return
    order = np.argsort(rows[:, 1], kind="stable")
    rows = rows[order]
    bounds = np.flatnonzero(np.diff(rows[:, 1])) + 1
    for part in np.split(rows, bounds):
        yield int(part[0, 1]), part


def _link_key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


@attrs.define
class Batch:
    """What changed since the last flush, coalesced per row, written in one transaction.

    Peers are referred to by their integer id (``PeerRow.seq``); accounts and
    reports, which outlive a peer's stay, by identity.
    """

    #: id -> the row of a peer that joined or changed its keys or address
    peers: dict[int, PeerRow] = attrs.field(factory=dict)
    removed_peers: set[int] = attrs.field(factory=set)
    accounts: dict[bytes, Account] = attrs.field(factory=dict)
    #: identities whose per-torrent reports are all dropped (a new session)
    cleared_reports: set[bytes] = attrs.field(factory=set)
    #: identity -> infohash -> counters (indexed by identity: clearing one is O(its torrents))
    reports: dict[bytes, dict[bytes, tuple[int, int]]] = attrs.field(factory=dict)
    removed_reports: dict[bytes, set[bytes]] = attrs.field(factory=dict)
    #: identities whose account moved between a graph slot and the loose dict (a join or
    #: a leave; only logged: see anomos.tracker.images.build_tables_image)
    moved_accounts: set[bytes] = attrs.field(factory=set)
    #: (a, b), a < b -> (nid, id of the dialer or 0)
    added_edges: dict[tuple[int, int], tuple[int, int]] = attrs.field(factory=dict)
    removed_edges: set[tuple[int, int]] = attrs.field(factory=set)
    #: (peer id, infohash) -> bytes left
    swarm: dict[tuple[int, bytes], int] = attrs.field(factory=dict)
    removed_swarm: set[tuple[int, bytes]] = attrs.field(factory=set)
    torrents: dict[bytes, int] = attrs.field(factory=dict)
    meta: dict[str, int] = attrs.field(factory=dict)
    #: this batch's number: the links it writes or removes are marked with it
    gen: int = 0
    #: the graph as it is with this batch applied, when one is due (written with it)
    image: GraphImage | None = None
    #: with ``image``: packs the image of the other tables (run by the writer)
    tables: Callable[[], TablesImage] | None = None

    def add_edge(self, a: int, b: int, nid: int, dialer: int = 0) -> None:
        key = _link_key(a, b)
        self.removed_edges.discard(key)
        self.added_edges[key] = (nid, dialer)

    def remove_edge(self, a: int, b: int) -> None:
        key = _link_key(a, b)
        self.added_edges.pop(key, None)
        self.removed_edges.add(key)

    def remove_peer(self, peer: int) -> None:
        self.peers.pop(peer, None)
        self.removed_peers.add(peer)

    def clear_reports(self, identity: bytes) -> None:
        self.cleared_reports.add(identity)
        self.reports.pop(identity, None)
        self.removed_reports.pop(identity, None)

    def set_report(self, identity: bytes, infohash: bytes, counters: tuple[int, int]) -> None:
        removed = self.removed_reports.get(identity)
        if removed:
            removed.discard(infohash)
        self.reports.setdefault(identity, {})[infohash] = counters

    def remove_report(self, identity: bytes, infohash: bytes) -> None:
        self.reports.get(identity, {}).pop(infohash, None)
        self.removed_reports.setdefault(identity, set()).add(infohash)

    def set_swarm(self, infohash: bytes, peer: int, left: int) -> None:
        self.removed_swarm.discard((peer, infohash))
        self.swarm[(peer, infohash)] = left

    def remove_swarm(self, infohash: bytes, peer: int) -> None:
        self.swarm.pop((peer, infohash), None)
        self.removed_swarm.add((peer, infohash))

    def __bool__(self) -> bool:
        changes = attrs.astuple(self, recurse=False)[:-3]  # (not gen, image, tables)
        return any(changes) or self.image is not None or self.tables is not None


@attrs.frozen
class Snapshot:
    """The whole stored state, as read at start-up."""

    #: every live peer's identity and id (its join sequence number)
    identities: list[bytes]
    seqs: list[int]
    #: the live peers' rows to load: all of them, or with ``columns`` those changed
    #: after the image (the others are in the columns)
    peers: list[PeerRow]
    accounts: dict[bytes, Account]
    #: the neighbour graph's links by peer id (a, b, NID, dialer or 0), read from the
    #: database as they are consumed (by :meth:`~anomos.tracker.graph.PeerGraph.restore`):
    #: all of them, or with an ``image`` those written after it
    links: Iterable[Link]
    #: infohash -> live peer -> bytes left (its counters are in the peer's account)
    swarm: Swarm
    torrents: dict[bytes, int]
    meta: dict[str, int]
    #: the packed graph as of batch ``image.gen``, if one was written
    image: GraphImage | None = None
    #: links (a, b) removed after the image
    gone: list[tuple[int, int]] = attrs.field(factory=list)
    #: the peer table's columns by the image's graph slots (:meth:`PeerTable.load_image`),
    #: when the tables were restored from their image too; and the slots to clear in
    #: them (peers changed or gone after it)
    columns: PeerColumns | None = None
    stale_slots: list[int] = attrs.field(factory=list)


#: A transaction's work: (SQL, rows) run with executemany, in order.
Statements = list[tuple[str, list[tuple[Any, ...]]]]


def statements(batch: Batch) -> Statements:
    """``batch`` as plain rows: a copy the writer thread may use while serving goes on."""
    accounts = [
        (
            k,
            a.uploaded,
            a.downloaded,
            a.relayed,
            a.session,
            a.relayed_reported,
            a.relayed_claimed,
            a.relayed_confirmed,
        )
        for k, a in batch.accounts.items()
    ]
    gen = batch.gen
    # The keys of what this batch changes, so a restore from an older image re-reads them.
    touched_peers = {*batch.peers, *batch.removed_peers}
    touched_peers.update(p for p, _ in batch.swarm)
    touched_peers.update(p for p, _ in batch.removed_swarm)
    touched_accounts = {*batch.accounts, *batch.cleared_reports, *batch.reports}
    touched_accounts.update(batch.removed_reports)
    touched_accounts.update(batch.moved_accounts)
    out: Statements = [
        ("INSERT OR IGNORE INTO peers_log VALUES (?, ?)", [(gen, p) for p in touched_peers]),
        (
            "INSERT OR IGNORE INTO accounts_log VALUES (?, ?)",
            [(gen, k) for k in touched_accounts],
        ),
        ("DELETE FROM links WHERE a = ? AND b = ?", list(batch.removed_edges)),
        (
            "INSERT OR REPLACE INTO links_gone VALUES (?, ?, ?)",
            [(a, b, gen) for a, b in batch.removed_edges],
        ),
        ("DELETE FROM swarm WHERE peer = ? AND infohash = ?", list(batch.removed_swarm)),
        ("DELETE FROM peers WHERE id = ?", [(p,) for p in batch.removed_peers]),
        ("DELETE FROM swarm WHERE peer = ?", [(p,) for p in batch.removed_peers]),
        ("DELETE FROM reports WHERE identity = ?", [(k,) for k in batch.cleared_reports]),
        (
            "DELETE FROM reports WHERE identity = ? AND infohash = ?",
            [(k, ih) for k, ihs in batch.removed_reports.items() for ih in ihs],
        ),
        (
            "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?)",
            [(i, p.identity, p.onion, p.box, p.address) for i, p in batch.peers.items()],
        ),
        (
            "INSERT OR REPLACE INTO accounts (identity, uploaded, downloaded, relayed,"
            " session, relayed_reported, relayed_claimed, relayed_confirmed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            accounts,
        ),
        (
            "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?)",
            [
                (k, ih, up, down)
                for k, counters in batch.reports.items()
                for ih, (up, down) in counters.items()
            ],
        ),
        (
            "INSERT OR REPLACE INTO links VALUES (?, ?, ?, ?, ?)",
            [(a, b, nid, d, gen) for (a, b), (nid, d) in batch.added_edges.items()],
        ),
        (
            "INSERT OR REPLACE INTO swarm VALUES (?, ?, ?)",
            [(p, ih, left) for (p, ih), left in batch.swarm.items()],
        ),
        ("INSERT OR REPLACE INTO torrents VALUES (?, ?)", list(batch.torrents.items())),
        ("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(batch.meta.items())),
    ]
    return [(sql, rows) for sql, rows in out if rows]


def image_statements(image: GraphImage | None, tables: TablesImage | None) -> Statements:
    """Writing the images (each as of its batch ``gen``): the marks of what changed up
    to that batch are no longer needed."""
    out: Statements = []
    if image is not None:
        row = (image.gen, image.width, image.ids, image.nbr, image.nid, image.flags, image.deg)
        out += [
            ("INSERT OR REPLACE INTO graph_image VALUES (1, ?, ?, ?, ?, ?, ?, ?)", [row]),
            ("DELETE FROM links_gone WHERE gen <= ?", [(image.gen,)]),
        ]
    if tables is not None:
        marks = ", ".join("?" * len(tables.row()))
        out += [
            (f"INSERT OR REPLACE INTO tables_image VALUES (1, {marks})", [tables.row()]),
            ("DELETE FROM peers_log WHERE gen <= ?", [(tables.gen,)]),
            ("DELETE FROM accounts_log WHERE gen <= ?", [(tables.gen,)]),
        ]
    return out


#: glibc's mallopt parameter: the most malloc arenas a process makes (malloc.h).
_M_ARENA_MAX = -8


def share_malloc_arena() -> None:
    """Have threads started from now on allocate from the arenas already there (glibc;
    elsewhere nothing), as ``MALLOC_ARENA_MAX=1`` would. In an arena of its own, the
    writer thread's transient buffers (the images' copies, SQLite's) stayed resident
    once freed: 230-300 B a peer of the RSS at 10^6 against 17 with one arena, where
    the event loop reuses them (docs/performance.md). Process-wide: the tracker's
    threads contend for one arena lock, rarely (they mostly allocate holding the GIL)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


class Store:
    """One SQLite database in the state directory (WAL, one writer thread).

    :meth:`write` applies a batch at once; :meth:`submit` hands it to the
    writer thread and returns. One write is under way at a time (:attr:`busy`):
    meanwhile the caller keeps accumulating changes in its next batch, so a slow
    disk makes transactions bigger, never the event loop slower.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / DB_FILE
        private_file(self.path)  # owner only; SQLite gives -wal and -shm the database's mode
        for older in (self.path.with_name(DB_FILE + "-wal"), self.path.with_name(DB_FILE + "-shm")):
            if older.exists():
                private_file(older)  # left by an older anomos, maybe 0644
        self._pool: Any = None
        self._inflight: Any = None
        #: a transaction that failed, retried ahead of the next (replaying it is harmless)
        self._failed: Statements = []
        #: images packed by the writer after their batch, written with the next one
        self._built: Statements = []
        try:
            # No statement cache: a cached statement keeps its last bound values, and
            # SQLite holds its own copy of a bound BLOB, so the images written (~310 MB
            # at 10^6) stayed resident until the next image. A batch prepares ~17
            # statements: a few tens of microseconds a second.
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, cached_statements=0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
            )
            version = self._get_meta("schema_version")
            if version == 1:
                self._migrate_v1()
            elif version == 2:
                self._migrate_v2()
                self._migrate_v3()
            elif version == 3:
                self._migrate_v3()
            elif version is None:
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                raise ConfigError(
                    f"tracker database {self.path} has schema {version}, expected {SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open tracker database {self.path}: {exc}") from None

    def _migrate_v1(self) -> None:
        """Convert a schema 1 database (identity keys) in place, in one transaction."""
        db = self._db
        db.executescript(_SCHEMA_V1)
        self._add_relay_columns()
        self._convert(_MIGRATE_V1.format(schema=_SCHEMA, version=SCHEMA_VERSION))

    def _migrate_v2(self) -> None:
        """Schema 2 -> 3, in one transaction: the links' batch numbers, the removed
        links, the graph image (none yet: the first restore reads every link)."""
        self._convert(
            "ALTER TABLE links ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;"
            + _LINKS_V3
            + "UPDATE meta SET value = 3 WHERE key = 'schema_version';"
        )

    def _migrate_v3(self) -> None:
        """Schema 3 -> 4, in one transaction: the logs of changed keys and the tables'
        image (none yet: the first restore reads every row of the tables)."""
        self._convert(
            _TABLES_V4 + f"UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';"
        )

    def _convert(self, script: str) -> None:
        """Run a schema conversion ``script`` as one transaction: whole or not at all."""
        db = self._db
        try:
            db.executescript("BEGIN;" + script + "COMMIT;")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        version = self._get_meta("schema_version")
        log.info("tracker database %s converted to schema %s", self.path, version)

    def _add_relay_columns(self) -> None:
        """Give an older ``accounts`` table the claimed and confirmed relay totals.

        Its ``relayed`` was self-reported: it becomes the claim, and nothing of it
        is confirmed, so no relay credit survives that no neighbour vouched for.
        """
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(accounts)")}
        if "relayed_claimed" in columns:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            for name in ("relayed_claimed", "relayed_confirmed"):
                db.execute(f"ALTER TABLE accounts ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE accounts SET relayed_claimed = relayed, relayed = 0")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _get_meta(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def load(self, now: float = 0.0, images: bool = True) -> Snapshot:
        """Everything stored (peers seen ``now``): from the images and the rows changed
        after them, or (``images`` False, none stored, or a bad one) from the rows."""
        self.wait()
        db = self._db
        image = None
        row = db.execute(
            "SELECT gen, width, ids, nbr, nid, flags, deg FROM graph_image WHERE id = 1"
        ).fetchone()
        if row is not None and images:
            image = GraphImage(*row)
            tables_row = db.execute(f"SELECT {_TABLES_COLUMNS} FROM tables_image").fetchone()
            if tables_row is not None and tables_row[0] == image.gen:
                try:
                    return self._load_images(image, TablesImage(*tables_row), now)
                except ValueError as exc:
                    log.error("tracker database %s: %s; reading every row", self.path, exc)
                    image = None
        return self._load_rows(image, now)

    def _load_rows(self, image: GraphImage | None, now: float) -> Snapshot:
        """Everything stored, each table read in one pass, its rows turned into objects
        by C-level iteration (``starmap``), the joins between tables done by SQLite (at
        10^6 peers the per-row Python is the cost); the graph from ``image`` if given."""
        db = self._db
        peers = list(
            starmap(
                PeerRow,
                db.execute(
                    "SELECT identity, onion, box, address, ?, id FROM peers ORDER BY id", (now,)
                ),
            )
        )
        identities = [p.identity for p in peers]
        seqs = [p.seq for p in peers]
        accounts = self._accounts(dict(zip(identities, identities, strict=True)).setdefault, "")
        # A swarm keeps each member's ``left`` only: its counters are in its account.
        swarm = self._swarm(dict(zip(seqs, identities, strict=True)), "")
        torrents, meta = self._small_tables()
        if image is None:
            return Snapshot(identities, seqs, peers, accounts, self.links(), swarm, torrents, meta)
        links, gone = self._links_after(image.gen)
        return Snapshot(
            identities, seqs, peers, accounts, links, swarm, torrents, meta, image, gone
        )

    def _accounts(
        self, same: Callable[[bytes, bytes], bytes] | None, where: str, *args: Any
    ) -> dict[bytes, Account]:
        """The accounts (``where``: a condition on their identity) with their reports;
        their keys are the live peers' identity objects (``same``, a ``setdefault``:
        one object per identity, shared by every table as after joins, not ~65 bytes
        per copy) or, without it, the objects read."""
        db = self._db
        rows = db.execute(
            "SELECT identity, uploaded, downloaded, relayed_claimed, relayed_confirmed,"
            " session, relayed_reported FROM accounts" + where,
            args,
        ).fetchall()
        keys = list(map(_first, rows))
        shared = keys if same is None else map(same, keys, keys)
        accounts = dict(zip(shared, starmap(Account, map(_rest, rows)), strict=True))
        del rows, keys
        ihs: dict[bytes, bytes] = {}
        for identity, ih, up, down in db.execute("SELECT * FROM reports" + where, args):
            account = accounts.get(identity)
            if account is not None:
                account.reports[ihs.setdefault(ih, ih)] = (up, down)
        return accounts

    def _swarm(self, by_id: dict[int, bytes], where: str, *args: Any) -> Swarm:
        """infohash -> live peer -> left, of the swarm rows (``where``: on their peer)."""
        swarm: Swarm = {}
        for ih, peer, left in self._db.execute(
            "SELECT s.infohash, s.peer, s.left FROM swarm s JOIN peers p ON p.id = s.peer" + where,
            args,
        ):
            members = swarm.get(ih)
            if members is None:
                members = swarm[ih] = {}
            members[by_id[peer]] = left
        return swarm

    def _small_tables(self) -> tuple[dict[bytes, int], dict[str, int]]:
        db = self._db
        torrents = {ih: size for ih, size in db.execute("SELECT * FROM torrents")}
        meta = {k: v for k, v in db.execute("SELECT key, value FROM meta")}
        return torrents, meta

    def _links_after(self, gen: int) -> tuple[Iterable[Link], list[tuple[int, int]]]:
        db = self._db
        links = db.execute("SELECT a, b, nid, dialer FROM links WHERE gen > ?", (gen,))
        gone = db.execute("SELECT a, b FROM links_gone WHERE gen > ?", (gen,)).fetchall()
        return links, gone

    def _load_images(self, image: GraphImage, tables: TablesImage, now: float) -> Snapshot:
        """The state from the images (as of batch ``gen``) and the rows changed after:
        the peers, accounts and swarm rows whose keys the logs name since, re-read
        whole (a row gone since is a peer or report gone). ValueError: the images do
        not fit together (nothing is changed yet)."""
        db, gen = self._db, tables.gen
        # ---- peers: by graph slot in the image, then the ones changed since
        # (The tables' columns were read after the graph image's batch: a slot free in
        # the graph image may hold a peer that joined since, one taken there may have
        # emptied; both are peers logged since, re-read from their rows.)
        slot_peers = unpack_strings(tables.identities)
        ids = np.frombuffer(image.ids, np.int64)
        n, m = len(ids), len(slot_peers)  # (slots then, and when the columns were read)
        free = ids == 0
        if m < n or (len(tables.keys), len(tables.abuf), len(tables.alen)) != (
            m * 2 * KEY_BYTES,
            m * ADDRESS_BYTES,
            m,
        ):
            raise ValueError("the stored peer table image does not fit the graph image")
        long_slots = np.frombuffer(tables.long_slots, np.int64).tolist()
        long_addresses = unpack_strings(tables.long_addresses)
        if len(long_slots) != len(long_addresses) or not _within(np.array(long_slots), 0, m):
            raise ValueError("the stored tables image does not fit together")
        changed = {
            i for (i,) in db.execute("SELECT DISTINCT id FROM peers_log WHERE gen > ?", (gen,))
        }
        peers = list(
            starmap(
                PeerRow,
                db.execute(
                    "SELECT identity, onion, box, address, ?, id FROM peers"
                    " WHERE id IN (SELECT id FROM peers_log WHERE gen > ?) ORDER BY id",
                    (now, gen),
                ),
            )
        )
        live = ~free
        if changed:
            stale = np.isin(ids, np.fromiter(changed, np.int64, count=len(changed)))
            stale_slots = np.flatnonzero(stale).tolist()
            live &= ~stale
        else:
            stale_slots = []
        kept = np.flatnonzero(live).tolist()
        identities = list(map(slot_peers.__getitem__, kept))
        if not all(identities):
            raise ValueError("the stored tables image lacks a peer the graph image has")
        seqs = ids[kept].tolist()
        identities += [p.identity for p in peers]
        seqs += [p.seq for p in peers]
        # The columns were read after the image's batch: a slot free then may hold a
        # peer that joined since (it is in the rows changed since, in its own slot).
        alen = np.frombuffer(tables.alen, np.uint8, count=n).copy()
        alen[free] = 0
        columns = PeerColumns(
            slot_peers[:n],
            tables.keys[: n * 2 * KEY_BYTES],
            alen.tobytes(),
            tables.abuf[: n * ADDRESS_BYTES],
            {
                s: a
                for s, a in zip(long_slots, long_addresses, strict=True)
                if s < n and not free[s]
            },
        )
        # ---- accounts: the image's, then the ones changed since
        account_slots = np.frombuffer(tables.account_slots, np.int64)
        names = unpack_strings(tables.accounts)
        counters = int_columns(tables.counters, ACCOUNT_COUNTERS)
        sessions = unpack_strings(tables.sessions)
        of_peer = account_slots >= 0
        if not len(account_slots) == len(counters) == len(sessions) or len(names) != int(
            np.count_nonzero(~of_peer)
        ):
            raise ValueError("the stored accounts image does not fit together")
        ihs = unpack_strings(tables.infohashes)
        reports = int_columns(tables.reports, REPORT_FIELDS)
        swarm_rows = int_columns(tables.swarm, SWARM_FIELDS)
        fits = (
            _within(reports[:, 0], 0, len(account_slots))
            and _within(reports[:, 1], 0, len(ihs))
            and _within(swarm_rows[:, 0], 0, m)
            and _within(swarm_rows[:, 1], 0, len(ihs))
            and _within(account_slots, -1, m)
        )
        named = np.fromiter(map(len, slot_peers), np.int64, count=m) > 0
        if not fits or not named[account_slots[of_peer]].all():
            raise ValueError("the stored tables image names a row it does not have")
        # An account in a slot is taken only where the graph's image has a peer whose
        # stay (its id) is still live: that peer held the slot all along (see
        # anomos.tracker.images.build_tables_image); the others belong to logged keys.
        stayed = live.copy()
        if peers:
            stayed |= np.isin(ids, np.fromiter((p.seq for p in peers), np.int64, len(peers)))
        trusted = ~of_peer
        in_image = of_peer & (account_slots < n)
        trusted[in_image] = stayed[account_slots[in_image]]
        if not trusted.all():
            account_slots, counters = account_slots[trusted], counters[trusted]
            sessions = list(itertools.compress(sessions, trusted.tolist()))
            renumber = np.cumsum(trusted) - 1
            reports = reports[trusted[reports[:, 0]]]
            reports[:, 0] = renumber[reports[:, 0]]
            of_peer = account_slots >= 0
        # An account of a live peer is keyed by the object of its slot (one object per
        # identity, shared by every table as after joins: not ~65 bytes per copy).
        by_slot = np.array(slot_peers, dtype=object)
        keys = np.empty(len(account_slots), dtype=object)
        keys[of_peer] = by_slot[account_slots[of_peer]]
        others = np.empty(len(names), dtype=object)
        others[:] = names
        keys[~of_peer] = others
        up, down, claimed, confirmed, reported = counters.T.tolist()
        owners = list(
            starmap(Account, zip(up, down, claimed, confirmed, sessions, reported, strict=True))
        )
        # (Checked: from here on the image is taken as it is.)
        for o, h, u, d in reports.tolist():
            owners[o].reports[ihs[h]] = (u, d)
        accounts = dict(zip(keys.tolist(), owners, strict=True))
        del keys, names, others, owners
        # Each identity logged since is exactly as its rows say (maybe no account at all).
        for (identity,) in db.execute(
            "SELECT DISTINCT identity FROM accounts_log WHERE gen > ?", (gen,)
        ):
            accounts.pop(identity, None)
        # (A key already there keeps its object: dict.update replaces only the value.)
        accounts.update(
            self._accounts(
                None, " WHERE identity IN (SELECT identity FROM accounts_log WHERE gen > ?)", gen
            )
        )
        # ---- swarms: the image's rows of peers live and unchanged, then the changed ones'
        swarm: Swarm = {}
        if len(swarm_rows):  # (rows of peers that joined since are re-read below)
            then = swarm_rows[swarm_rows[:, 0] < n]
            swarm_rows = then[live[then[:, 0]]]
        for h, rows in _group(swarm_rows):
            members = by_slot[rows[:, 0]].tolist()
            swarm[ihs[h]] = dict(zip(members, rows[:, 2].tolist(), strict=True))
        del by_slot
        changed_by_id = {p.seq: p.identity for p in peers}  # (the live ones of ``changed``)
        for ih, members in self._swarm(
            changed_by_id, " WHERE s.peer IN (SELECT id FROM peers_log WHERE gen > ?)", gen
        ).items():
            swarm.setdefault(ih, {}).update(members)
        torrents, meta = self._small_tables()
        links, gone = self._links_after(image.gen)
        return Snapshot(
            identities,
            seqs,
            peers,
            accounts,
            links,
            swarm,
            torrents,
            meta,
            image,
            gone,
            columns,
            stale_slots,
        )

    def links(self) -> Iterator[Link]:
        """Every stored link (a, b, NID, dialer or 0), read as it is consumed."""
        return self._db.execute("SELECT a, b, nid, dialer FROM links")

    def write(self, batch: Batch) -> None:
        """Apply ``batch`` atomically, now (after any write under way), with its images:
        nothing changes meanwhile, so they are exact and go in the same transaction."""
        self.wait()
        work = statements(batch)
        if batch.image is not None or batch.tables is not None:
            work += image_statements(batch.image, batch.tables() if batch.tables else None)
        self._execute(work)

    def submit(self, batch: Batch) -> bool:
        """Hand ``batch`` to the writer thread and return; False, taking nothing, while
        the previous write is still under way (keep accumulating and try again)."""
        if self.busy:
            return False
        self._collect()
        work = statements(batch)
        if work or self._failed or self._built:
            if self._pool is None:
                from gevent.threadpool import ThreadPool  # a real OS thread, patched or not

                share_malloc_arena()
                self._pool = ThreadPool(1)
            self._inflight = self._pool.spawn(self._write_behind, work, batch.image, batch.tables)
        return True

    @property
    def holds_images(self) -> bool:
        """Whether images packed after their batch wait for the next batch to be written."""
        return not self.busy and bool(self._built)

    def _write_behind(
        self, work: Statements, image: GraphImage | None, tables: Callable[[], TablesImage] | None
    ) -> None:
        """The writer thread's job: the batch; then, if it carries them, its images,
        packed now (the tables' while serving goes on, so they may hold later changes)
        and written with the next batch, which logs every key changed meanwhile."""
        self._execute(work)
        if image is not None or tables is not None:
            try:
                self._built = image_statements(image, tables() if tables else None)
            except Exception:
                log.exception("tracker database %s: packing the tables image failed", self.path)
                self._built = image_statements(image, None)

    @property
    def busy(self) -> bool:
        """Whether a write is under way in the writer thread."""
        return self._inflight is not None and not self._inflight.ready()

    def wait(self) -> None:
        """Wait (cooperatively) for the write under way, if any."""
        if self._inflight is not None:
            self._inflight.wait()
            self._collect()

    def _collect(self) -> None:
        """Take note of the finished write: a failure is logged and retried with the next."""
        done, self._inflight = self._inflight, None
        if done is not None and not done.successful():
            log.error("tracker database %s: write failed, retrying: %s", self.path, done.exception)

    def _execute(self, work: Statements) -> None:
        db = self._db
        work = self._failed + self._built + work
        self._failed, self._built = work, []  # until committed
        db.execute("BEGIN")
        try:
            for sql, rows in work:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._failed = []

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.kill()
            self._pool = None
        self._db.close()
