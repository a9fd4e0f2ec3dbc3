"""The tracker's durable state in SQLite, so a restart loses nothing.

The tracker serves from memory (the graph, the swarms) and never waits for
this module: :meth:`Store.submit` turns the changes accumulated since the last
flush into plain rows on the event loop (a few microseconds each) and one
writer thread applies them in one transaction, WAL checkpoints included. A
crash (even ``kill -9``) loses the last transaction at most, a second or two
of announces, which peers simply repeat. On start it reads everything back and
rebuilds the graph with the same NIDs, so the peers' existing links stay valid:
from the last packed image of the graph plus the links changed after it (see
below), so that a million peers' three million links are not rebuilt one by one.

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
``gen``, written with that batch every few minutes and on close), ``swarm``
(torrent membership and bytes left), ``torrents`` (the largest
``left`` seen: the torrent's size as far as the tracker can tell) and ``meta``
(counters). The view ``edges`` gives the links by identity, for people and
tools reading the file. Schema 1 (keyed by identity, one row per announce) and
schema 2 (no ``gen``, no image) are converted in place on first open.
"""

from __future__ import annotations

import logging
import operator
import sqlite3
from collections.abc import Iterable, Iterator
from itertools import starmap
from pathlib import Path
from typing import Any

import attrs

from anomos.errors import ConfigError
from anomos.fsutil import private_file
from anomos.tracker.graph import GraphImage, Link
from anomos.tracker.tables import Reports

log = logging.getLogger(__name__)

DB_FILE = "tracker.sqlite3"
SCHEMA_VERSION = 3
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

_SCHEMA = _SCHEMA_TEMPLATE.replace("{links_v3}", _LINKS_V3)

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
        return any(attrs.astuple(self, recurse=False)[:-2]) or self.image is not None


@attrs.frozen
class Snapshot:
    """The whole stored state, as read at start-up."""

    #: live peers, in id order
    peers: list[PeerRow]
    accounts: dict[bytes, Account]
    #: the neighbour graph's links by peer id (a, b, NID, dialer or 0), read from the
    #: database as they are consumed (by :meth:`~anomos.tracker.graph.PeerGraph.restore`):
    #: all of them, or with an ``image`` those written after it
    links: Iterable[Link]
    #: (infohash, peer, row): the row's ``left`` (its counters are in the peer's account)
    swarm: list[tuple[bytes, bytes, SwarmRow]]
    torrents: dict[bytes, int]
    meta: dict[str, int]
    #: the packed graph as of batch ``image.gen``, if one was written
    image: GraphImage | None = None
    #: links (a, b) removed after the image
    gone: list[tuple[int, int]] = attrs.field(factory=list)


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
    out: Statements = [
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
    image = batch.image
    if image is not None:
        out += [
            (
                "INSERT OR REPLACE INTO graph_image VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        image.gen,
                        image.width,
                        image.ids,
                        image.nbr,
                        image.nid,
                        image.flags,
                        image.deg,
                    )
                ],
            ),
            # The image holds every link removed so far: their marks are no longer needed.
            ("DELETE FROM links_gone WHERE gen <= ?", [(image.gen,)]),
        ]
    return [(sql, rows) for sql, rows in out if rows]


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
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
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
            + f"UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';"
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
        log.info("tracker database %s converted to schema %d", self.path, SCHEMA_VERSION)

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

    def load(self, now: float = 0.0) -> Snapshot:
        """Everything stored (peers seen ``now``). Each table is read in one pass, its
        rows turned into objects by C-level iteration (``starmap``), the joins
        between tables done by SQLite: at 10^6 peers the per-row Python is the cost."""
        self.wait()
        db = self._db
        peers = list(
            starmap(
                PeerRow,
                db.execute(
                    "SELECT identity, onion, box, address, ?, id FROM peers ORDER BY id", (now,)
                ),
            )
        )
        # One object per identity and per infohash, shared by every table (as after
        # joins): not a copy per table and row (~65 and ~53 bytes each).
        same = {p.identity: p.identity for p in peers}.setdefault
        by_id = {p.seq: p.identity for p in peers}
        ihs: dict[bytes, bytes] = {}
        rows = db.execute(
            "SELECT identity, uploaded, downloaded, relayed_claimed, relayed_confirmed,"
            " session, relayed_reported FROM accounts"
        ).fetchall()
        keys = list(map(_first, rows))
        accounts = dict(zip(map(same, keys, keys), starmap(Account, map(_rest, rows)), strict=True))
        del rows, keys
        for identity, ih, up, down in db.execute("SELECT * FROM reports"):
            account = accounts.get(identity)
            if account is not None:
                account.reports[ihs.setdefault(ih, ih)] = (up, down)
        # A swarm keeps each member's ``left`` only: its counters are in its account.
        swarm = [
            (ihs.setdefault(ih, ih), by_id[peer], SwarmRow(left))
            for ih, peer, left in db.execute(
                "SELECT s.infohash, s.peer, s.left FROM swarm s JOIN peers p ON p.id = s.peer"
            )
        ]
        del same, by_id
        torrents = {ih: size for ih, size in db.execute("SELECT * FROM torrents")}
        meta = {k: v for k, v in db.execute("SELECT key, value FROM meta")}
        row = db.execute(
            "SELECT gen, width, ids, nbr, nid, flags, deg FROM graph_image WHERE id = 1"
        ).fetchone()
        if row is None:
            return Snapshot(peers, accounts, self.links(), swarm, torrents, meta)
        image = GraphImage(*row)
        links = db.execute("SELECT a, b, nid, dialer FROM links WHERE gen > ?", (image.gen,))
        gone = db.execute("SELECT a, b FROM links_gone WHERE gen > ?", (image.gen,)).fetchall()
        return Snapshot(peers, accounts, links, swarm, torrents, meta, image, gone)

    def links(self) -> Iterator[Link]:
        """Every stored link (a, b, NID, dialer or 0), read as it is consumed."""
        return self._db.execute("SELECT a, b, nid, dialer FROM links")

    def write(self, batch: Batch) -> None:
        """Apply ``batch`` atomically, now (after any write under way)."""
        self.wait()
        self._execute(statements(batch))

    def submit(self, batch: Batch) -> bool:
        """Hand ``batch`` to the writer thread and return; False, taking nothing, while
        the previous write is still under way (keep accumulating and try again)."""
        if self.busy:
            return False
        self._collect()
        work = statements(batch)
        if work or self._failed:
            if self._pool is None:
                from gevent.threadpool import ThreadPool  # a real OS thread, patched or not

                self._pool = ThreadPool(1)
            self._inflight = self._pool.spawn(self._execute, work)
        return True

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
        work = self._failed + work
        self._failed = work  # until committed
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
