"""The tracker's durable state in SQLite, so a restart loses nothing.

The tracker serves from memory (the graph, the swarms) and writes here in
batches, one transaction a second: never on the path of a circuit request.
On start it reads everything back and rebuilds the graph with the same NIDs,
so the peers' existing links stay valid.

Tables: ``peers`` (live peers: keys, contact address, join order),
``accounts`` (lifetime transfer totals: relayed bytes as claimed by the peer,
as confirmed by its neighbours' receipts, and the credited lesser of the two;
the session and ``relayed`` last reported; kept after a peer leaves so neither
its ratio nor its baselines are lost; the claimed and confirmed columns are
added in place to older databases), ``reports`` (per identity and torrent,
the cumulative counters last reported in the current session), ``edges``
(the neighbour graph with NIDs), ``dialers`` (for edges whose dial direction
was fixed when an end was told of it: that end; added in place, old databases
simply lack it), ``swarm`` (torrent membership), ``torrents`` (the largest
``left`` seen: the torrent's size as far as the tracker can tell) and
``meta`` (counters).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

import attrs

from anomos.errors import ConfigError
from anomos.fsutil import private_file

DB_FILE = "tracker.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    identity BLOB PRIMARY KEY,
    onion BLOB NOT NULL,
    box BLOB NOT NULL,
    address TEXT NOT NULL,
    last_seen REAL NOT NULL,
    seq INTEGER NOT NULL
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
);
CREATE TABLE IF NOT EXISTS reports (
    identity BLOB NOT NULL,
    infohash BLOB NOT NULL,
    uploaded INTEGER NOT NULL,
    downloaded INTEGER NOT NULL,
    PRIMARY KEY (identity, infohash)
);
CREATE TABLE IF NOT EXISTS edges (
    a BLOB NOT NULL,
    b BLOB NOT NULL,
    nid INTEGER NOT NULL,
    PRIMARY KEY (a, b)
);
CREATE TABLE IF NOT EXISTS dialers (
    a BLOB NOT NULL,
    b BLOB NOT NULL,
    dialer BLOB NOT NULL,
    PRIMARY KEY (a, b)
);
CREATE TABLE IF NOT EXISTS swarm (
    infohash BLOB NOT NULL,
    peer BLOB NOT NULL,
    left INTEGER NOT NULL,
    uploaded INTEGER NOT NULL,
    downloaded INTEGER NOT NULL,
    PRIMARY KEY (infohash, peer)
);
CREATE TABLE IF NOT EXISTS torrents (infohash BLOB PRIMARY KEY, size INTEGER NOT NULL);
"""


@attrs.define
class PeerRow:
    """A live peer as stored."""

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
    #: infohash -> (uploaded, downloaded) last reported in ``session``
    reports: dict[bytes, tuple[int, int]] = attrs.field(factory=dict, eq=False)

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


def _edge_key(a: bytes, b: bytes) -> tuple[bytes, bytes]:
    return (a, b) if a < b else (b, a)


@attrs.define
class Batch:
    """Everything one announce (or expiry round) changes, written in one transaction."""

    peers: dict[bytes, PeerRow] = attrs.field(factory=dict)
    removed_peers: set[bytes] = attrs.field(factory=set)
    accounts: dict[bytes, Account] = attrs.field(factory=dict)
    #: identities whose per-torrent reports are all dropped (a new session)
    cleared_reports: set[bytes] = attrs.field(factory=set)
    reports: dict[tuple[bytes, bytes], tuple[int, int]] = attrs.field(factory=dict)
    removed_reports: set[tuple[bytes, bytes]] = attrs.field(factory=set)
    #: (a, b) -> (nid, dialer or None)
    added_edges: dict[tuple[bytes, bytes], tuple[int, bytes | None]] = attrs.field(factory=dict)
    removed_edges: set[tuple[bytes, bytes]] = attrs.field(factory=set)
    swarm: dict[tuple[bytes, bytes], SwarmRow] = attrs.field(factory=dict)
    removed_swarm: set[tuple[bytes, bytes]] = attrs.field(factory=set)
    torrents: dict[bytes, int] = attrs.field(factory=dict)
    meta: dict[str, int] = attrs.field(factory=dict)

    def add_edge(self, a: bytes, b: bytes, nid: int, dialer: bytes | None = None) -> None:
        key = _edge_key(a, b)
        self.removed_edges.discard(key)
        self.added_edges[key] = (nid, dialer)

    def remove_edge(self, a: bytes, b: bytes) -> None:
        key = _edge_key(a, b)
        self.added_edges.pop(key, None)
        self.removed_edges.add(key)

    def clear_reports(self, identity: bytes) -> None:
        self.cleared_reports.add(identity)
        for key in [k for k in self.reports if k[0] == identity]:
            del self.reports[key]
        self.removed_reports = {k for k in self.removed_reports if k[0] != identity}

    def set_report(self, identity: bytes, infohash: bytes, counters: tuple[int, int]) -> None:
        self.removed_reports.discard((identity, infohash))
        self.reports[(identity, infohash)] = counters

    def remove_report(self, identity: bytes, infohash: bytes) -> None:
        self.reports.pop((identity, infohash), None)
        self.removed_reports.add((identity, infohash))

    def set_swarm(self, infohash: bytes, peer: bytes, row: SwarmRow) -> None:
        self.removed_swarm.discard((infohash, peer))
        self.swarm[(infohash, peer)] = attrs.evolve(row)

    def remove_swarm(self, infohash: bytes, peer: bytes) -> None:
        self.swarm.pop((infohash, peer), None)
        self.removed_swarm.add((infohash, peer))

    def __bool__(self) -> bool:
        return any(attrs.astuple(self, recurse=False))


@attrs.frozen
class Snapshot:
    """The whole stored state, as read at start-up."""

    peers: list[PeerRow]
    accounts: dict[bytes, Account]
    edges: list[tuple[bytes, bytes, int]]
    swarm: list[tuple[bytes, bytes, SwarmRow]]
    torrents: dict[bytes, int]
    meta: dict[str, int]
    #: (a, b) -> the end that dials, for edges where that was fixed
    dialers: dict[tuple[bytes, bytes], bytes] = attrs.field(factory=dict)


class Store:
    """One SQLite database in the state directory (WAL, one writer: the tracker)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / DB_FILE
        private_file(self.path)  # owner only; SQLite gives -wal and -shm the database's mode
        for older in (self.path.with_name(DB_FILE + "-wal"), self.path.with_name(DB_FILE + "-shm")):
            if older.exists():
                private_file(older)  # left by an older anomos, maybe 0644
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._add_relay_columns()
            version = self._get_meta("schema_version")
            if version is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                raise ConfigError(
                    f"tracker database {self.path} has schema {version}, expected {SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open tracker database {self.path}: {exc}") from None

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

    def load(self) -> Snapshot:
        db = self._db
        peers = [PeerRow(*row) for row in db.execute("SELECT * FROM peers ORDER BY seq")]
        accounts = {
            row[0]: Account(*row[1:])
            for row in db.execute(
                "SELECT identity, uploaded, downloaded, relayed_claimed, relayed_confirmed,"
                " session, relayed_reported FROM accounts"
            )
        }
        for identity, ih, up, down in db.execute("SELECT * FROM reports"):
            if identity in accounts:
                accounts[identity].reports[ih] = (up, down)
        edges = [(a, b, nid) for a, b, nid in db.execute("SELECT a, b, nid FROM edges")]
        dialers = {(a, b): d for a, b, d in db.execute("SELECT a, b, dialer FROM dialers")}
        swarm = [
            (ih, peer, SwarmRow(left, up, down))
            for ih, peer, left, up, down in db.execute("SELECT * FROM swarm")
        ]
        torrents = {ih: size for ih, size in db.execute("SELECT * FROM torrents")}
        meta = {k: v for k, v in db.execute("SELECT key, value FROM meta")}
        return Snapshot(peers, accounts, edges, swarm, torrents, meta, dialers)

    def write(self, batch: Batch) -> None:
        """Apply ``batch`` atomically."""
        if not batch:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            _delete(db, "DELETE FROM edges WHERE a = ? AND b = ?", batch.removed_edges)
            _delete(db, "DELETE FROM dialers WHERE a = ? AND b = ?", batch.removed_edges)
            _delete(db, "DELETE FROM swarm WHERE infohash = ? AND peer = ?", batch.removed_swarm)
            for peer in batch.removed_peers:
                db.execute("DELETE FROM peers WHERE identity = ?", (peer,))
                db.execute("DELETE FROM edges WHERE a = ? OR b = ?", (peer, peer))
                db.execute("DELETE FROM dialers WHERE a = ? OR b = ?", (peer, peer))
                db.execute("DELETE FROM swarm WHERE peer = ?", (peer,))
            db.executemany(
                "DELETE FROM reports WHERE identity = ?", [(k,) for k in batch.cleared_reports]
            )
            _delete(
                db, "DELETE FROM reports WHERE identity = ? AND infohash = ?", batch.removed_reports
            )
            db.executemany(
                "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?, ?)",
                [attrs.astuple(p) for p in batch.peers.values()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO accounts (identity, uploaded, downloaded, relayed,"
                " session, relayed_reported, relayed_claimed, relayed_confirmed)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
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
                ],
            )
            db.executemany(
                "INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?)",
                [(k, ih, up, down) for (k, ih), (up, down) in batch.reports.items()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO edges VALUES (?, ?, ?)",
                [(a, b, nid) for (a, b), (nid, _) in batch.added_edges.items()],
            )
            _delete(  # a re-made edge has no dial direction until an end is told of it
                db,
                "DELETE FROM dialers WHERE a = ? AND b = ?",
                [key for key, (_, d) in batch.added_edges.items() if d is None],
            )
            db.executemany(
                "INSERT OR REPLACE INTO dialers VALUES (?, ?, ?)",
                [(a, b, d) for (a, b), (_, d) in batch.added_edges.items() if d is not None],
            )
            db.executemany(
                "INSERT OR REPLACE INTO swarm VALUES (?, ?, ?, ?, ?)",
                [(ih, p, r.left, r.uploaded, r.downloaded) for (ih, p), r in batch.swarm.items()],
            )
            db.executemany("INSERT OR REPLACE INTO torrents VALUES (?, ?)", batch.torrents.items())
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", batch.meta.items())
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


def _delete(db: sqlite3.Connection, sql: str, keys: Iterable[tuple[bytes, bytes]]) -> None:
    db.executemany(sql, list(keys))
