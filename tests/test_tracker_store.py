"""Persistence: a restarted tracker keeps its identity, peers, edges, NIDs, swarms and ratios."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import gevent
import pytest
from gevent.pool import Pool
from test_tracker_server import IH, SIZE, Peer

from anomos.errors import ConfigError
from anomos.identity import PeerIdentity
from anomos.localnet import LocalNetwork
from anomos.testing import loopback_host
from anomos.tracker.client import TorrentStatus, TrackerClient
from anomos.tracker.server import FLUSH_INTERVAL, Tracker
from anomos.tracker.settings import TrackerSettings
from anomos.tracker.store import DB_FILE, Account, Batch, PeerRow, Store


def snapshot(t: Tracker):
    return {
        "edges": sorted((e.a, e.b, e.nid, e.dialer) for e in t.graph.edges()),
        "peers": {k: (r.onion, r.box, r.address, r.seq) for k, r in t.peers.items()},
        "accounts": {
            k: (a.uploaded, a.downloaded, a.relayed_claimed, a.relayed_confirmed, dict(a.reports))
            for k, a in t.accounts.items()
        },
        "swarms": {ih: {p: r.left for p, r in s.rows.items()} for ih, s in t.swarms.items()},
        "sizes": dict(t.sizes),
    }


def test_restart_keeps_everything(tmp_path, plugins):
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0))
    t.start()
    peers = [Peer(t) for _ in range(10)]
    replies = {}
    for i, p in enumerate(peers):
        replies[p.pub] = p.announce(
            left=0 if i < 3 else SIZE, uploaded=10 * i, downloaded=5, relayed=100 * i
        )
    for i, p in enumerate(peers):  # a second round: splits and repairs are persisted too
        # Each peer confirms 50 bytes from every neighbour it knew of at its last announce.
        receipts = {n.nid: 50 for n in replies[p.pub].neighbours}
        p.announce(
            left=0 if i < 3 else SIZE,
            uploaded=10 * i,
            downloaded=5,
            relayed=100 * i,
            receipts=receipts,
        )
    assert any(a.relayed_confirmed for a in t.accounts.values())
    planned = len(peers[9].client.request_circuits(IH, 2))
    assert planned >= 1
    before = snapshot(t)
    fingerprint = t.fingerprint
    t.dropped = 3  # as if three peers had been reported lost and dropped
    t.stop()

    t2 = Tracker(state, "127.0.0.1:0", plugins)
    t2.start()
    try:
        assert t2.fingerprint == fingerprint
        assert snapshot(t2) == before
        assert t2.stats()["circuits_planned"] == planned
        assert t2.stats()["dropped"] == 3
        # Peers are live again without announcing: circuits can be planned at once.
        for p in peers:
            p.client = TrackerClient(
                t2.url, fingerprint, p.identity, source_host=p.host, timeout=10
            )
            p.client.session = t2.accounts[p.pub].session  # same process, same session
        assert peers[9].client.request_circuits(IH, 1)
        # Re-announcing the same cumulative counters credits nothing twice.
        reply = peers[4].announce(left=SIZE, uploaded=40, downloaded=5, relayed=400)
        assert (reply.uploaded_claimed, reply.downloaded, reply.relayed_claimed) == (40, 5, 400)
        account = t2.accounts[peers[4].pub]
        assert reply.relayed == min(400, account.relayed_confirmed)
        assert {(n.identity, n.nid) for n in reply.neighbours} == {
            (b, nid) for a, b, nid, _ in before["edges"] if a == peers[4].pub
        } | {(a, nid) for a, b, nid, _ in before["edges"] if b == peers[4].pub}
    finally:
        t2.stop()


def test_ratio_survives_leaving_and_restart(tmp_path, plugins):
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins)
    t.start()
    p, n = Peer(t), Peer(t)
    p.announce(left=SIZE, downloaded=1000, relayed=3000)
    n.announce()
    n.announce(receipts={t.graph.nid(n.pub, p.pub): 3500})
    p.announce(stopped=True, left=SIZE, downloaded=1000, relayed=3000)
    assert p.pub not in t.peers
    t.stop()
    t2 = Tracker(state, "127.0.0.1:0", plugins)
    t2.start()
    try:
        p.client = TrackerClient(t2.url, t2.fingerprint, p.identity, source_host=p.host)
        reply = p.client.announce(p.address, [TorrentStatus(IH, 0, 0, SIZE)], 0)
        assert (reply.downloaded, reply.relayed, reply.relayed_claimed) == (1000, 3000, 3000)
        assert reply.ratio == pytest.approx(3.0)
    finally:
        t2.stop()


def test_confirmed_relaying_survives_a_restart_and_is_never_credited_twice(tmp_path, plugins):
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins)
    t.start()
    p, n = Peer(t), Peer(t)
    p.announce(relayed=10_000)
    n.announce()
    nid = t.graph.nid(n.pub, p.pub)
    n.announce(receipts={nid: 800})
    t.stop()
    db = sqlite3.connect(state / DB_FILE)
    row = db.execute(
        "SELECT relayed, relayed_claimed, relayed_confirmed FROM accounts WHERE identity = ?",
        (p.pub,),
    ).fetchone()
    db.close()
    assert row == (800, 10_000, 800)

    t2 = Tracker(state, "127.0.0.1:0", plugins)
    t2.start()
    try:
        for who in (p, n):  # same processes, same sessions, a tracker that forgot the baselines
            session = who.client.session
            who.client = TrackerClient(t2.url, t2.fingerprint, who.identity, source_host=who.host)
            who.client.session = session
        # The first receipt after the restart is a baseline only: 800 may be credited already.
        n.announce(receipts={nid: 1000})
        assert t2.accounts[p.pub].relayed_confirmed == 800
        n.announce(receipts={nid: 1300})
        assert t2.accounts[p.pub].relayed_confirmed == 1100
        # A new session of n counts from zero again.
        n.client = TrackerClient(t2.url, t2.fingerprint, n.identity, source_host=n.host)
        n.announce(receipts={nid: 100})
        reply = p.announce(relayed=10_000)
        assert (reply.relayed, reply.relayed_claimed) == (1200, 10_000)
    finally:
        t2.stop()


def test_an_older_database_gets_the_relay_columns_and_no_unconfirmed_credit(tmp_path):
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('schema_version', 1);
        CREATE TABLE accounts (
            identity BLOB PRIMARY KEY,
            uploaded INTEGER NOT NULL,
            downloaded INTEGER NOT NULL,
            relayed INTEGER NOT NULL,
            session BLOB NOT NULL,
            relayed_reported INTEGER NOT NULL
        );
        """
    )
    db.execute("INSERT INTO accounts VALUES (?, 1, 2, 3000, ?, 3000)", (b"a" * 32, b"s"))
    db.commit()
    db.close()
    store = Store(tmp_path)
    account = store.load().accounts[b"a" * 32]
    assert (account.relayed_claimed, account.relayed_confirmed, account.relayed) == (3000, 0, 0)
    assert (account.uploaded, account.downloaded, account.relayed_reported) == (1, 2, 3000)
    store.close()
    Store(tmp_path).close()  # opening it again changes nothing
    assert Store(tmp_path).load().accounts[b"a" * 32] == account


def test_store_round_trip_and_peer_removal(tmp_path):
    store = Store(tmp_path)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    batch = Batch()
    for i, k in enumerate((a, b, c)):
        batch.peers[i + 1] = PeerRow(k, b"o" * 32, b"x" * 32, f"10.0.0.{i}:1", 5.0, i + 1)
        batch.accounts[k] = Account(1, 2, 30, 3, b"s", 7)
        batch.set_report(k, IH, (i, 2 * i))
    batch.add_edge(2, 1, 11)
    batch.add_edge(2, 3, 12, dialer=3)
    batch.set_swarm(IH, 1, 0)
    batch.set_swarm(IH, 3, 9)
    batch.torrents[IH] = 9
    batch.meta["circuits_planned"] = 4
    store.write(batch)
    snap = store.load()
    assert [(p.identity, p.seq) for p in snap.peers] == [(a, 1), (b, 2), (c, 3)]
    assert sorted(snap.links) == [(1, 2, 11, 0), (2, 3, 12, 3)]  # by peer id
    assert snap.accounts[b] == Account(1, 2, 30, 3, b"s", 7)
    assert snap.accounts[b].relayed == 3
    assert snap.accounts[b].reports == {IH: (1, 2)}
    # A swarm row's counters are in the account's reports (above), its ``left`` here.
    assert snap.swarm == {IH: {a: 0, c: 9}}
    assert snap.torrents == {IH: 9} and snap.meta["circuits_planned"] == 4

    gone = Batch()
    gone.remove_edge(1, 2)
    gone.remove_swarm(IH, 1)
    gone.remove_peer(1)
    assert store.submit(gone)  # through the writer thread
    snap = store.load()  # waits for it
    assert [p.identity for p in snap.peers] == [b, c]
    assert list(snap.links) == [(2, 3, 12, 3)]
    assert snap.swarm == {IH: {c: 9}}
    assert snap.accounts[a].reports == {IH: (0, 0)}  # the account outlives the peer
    cleared = Batch()
    cleared.set_report(c, b"x" * 20, (1, 1))
    cleared.clear_reports(c)  # drops the pending report too
    store.write(cleared)
    assert store.load().accounts[c].reports == {}
    store.close()


def test_a_schema_1_database_is_converted_in_place(tmp_path):
    """The identity-keyed tables of schema 1 become id-keyed ones, nothing lost."""
    from anomos.tracker.store import _SCHEMA_V1

    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', 1), ('announces', 77);" + _SCHEMA_V1
    )
    for seq, k in enumerate((a, b, c), 1):
        db.execute("INSERT INTO peers VALUES (?, ?, ?, ?, 1.0, ?)", (k, b"o", b"x", "h:1", seq))
        db.execute("INSERT INTO accounts VALUES (?, 5, 6, 0, ?, 0, 10, 4)", (k, b"s"))
        db.execute("INSERT INTO reports VALUES (?, ?, 5, 6)", (k, IH))
    db.execute("INSERT INTO edges VALUES (?, ?, 7)", (a, b))
    db.execute("INSERT INTO edges VALUES (?, ?, 8)", (b, c))
    db.execute("INSERT INTO dialers VALUES (?, ?, ?)", (b, c, b))
    db.execute("INSERT INTO swarm VALUES (?, ?, 0, 5, 6)", (IH, c))
    db.execute("INSERT INTO torrents VALUES (?, 100)", (IH,))
    db.commit()
    db.close()
    store = Store(tmp_path)
    snap = store.load()
    links = sorted(snap.links)  # read lazily: before the database is closed
    store.close()
    assert [(p.identity, p.seq, p.address) for p in snap.peers] == [
        (a, 1, "h:1"),
        (b, 2, "h:2"[:0] + "h:1"),
        (c, 3, "h:1"),
    ]
    assert links == [(1, 2, 7, 0), (2, 3, 8, 2)]
    assert snap.accounts[c].relayed == 4 and snap.accounts[c].reports == {IH: (5, 6)}
    assert snap.swarm == {IH: {c: 0}}
    assert snap.torrents == {IH: 100} and snap.meta["announces"] == 77
    assert snap.meta["schema_version"] == 4
    db = sqlite3.connect(tmp_path / DB_FILE)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    # The view for readers gives the edges by identity, as schema 1 stored them.
    assert sorted(db.execute("SELECT a, b, nid FROM edges")) == [(a, b, 7), (b, c, 8)]
    db.close()
    assert tables == {
        "meta",
        "peers",
        "accounts",
        "reports",
        "links",
        "swarm",
        "torrents",
        "links_gone",
        "graph_image",
        "peers_log",
        "accounts_log",
        "tables_image",
    }


def test_store_refuses_a_foreign_schema(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="schema 99, expected 4"):
        Store(tmp_path)


# ----------------------------------------------------------------------------- write-behind


def test_serving_goes_on_while_the_database_is_locked(tmp_path, plugins):
    """Announces are answered while another process holds the database's write lock:
    the writes wait in the writer thread, and land once the lock is released.

    The old tracker wrote inline: its announce waited out SQLite's busy timeout
    (5 s) and then failed with an internal error."""
    settings = TrackerSettings(edge_settle=0, flush_max_pending=3)
    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, settings)
    t.start()
    try:
        locker = sqlite3.connect(t.store.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        peers = [Peer(t) for _ in range(12)]
        for p in peers:  # each 3rd announce hands a batch to the (blocked) writer
            p.announce(left=SIZE, uploaded=1)
        assert t.store.busy  # the writer is still waiting for the lock
        locker.execute("ROLLBACK")
        locker.close()
        t.flush()
        stored = set(t.store.load().identities)
        assert stored == {p.pub for p in peers}
    finally:
        t.stop()


def _consistent(t: Tracker) -> None:
    """The restored graph is whole: every stored link came back, NIDs agree at both ends."""
    g = t.graph
    for peer in t.peers:
        assert peer in g
        nids = [g.nid(peer, n) for n in g.neighbours(peer)]
        assert len(set(nids)) == len(nids)
        for n in g.neighbours(peer):
            assert n in t.peers and g.peer_by_nid(n, g.nid(peer, n)) == peer
    for ih, swarm in t.swarms.items():
        assert set(swarm.rows) <= set(t.peers), ih


@pytest.mark.slow
@pytest.mark.integration
def test_a_tracker_killed_while_writing_comes_back_consistent(tmp_path, plugins):
    """kill -9 of a real tracker process under a stream of joins and announces:
    the database is intact and the restored state is that of a recent flush."""
    with LocalNetwork(tmp_path / "net") as net:
        proc = net.start_tracker()
        #: identity -> [(time answered, uploaded reported)]
        acked: dict[bytes, list[tuple[float, int]]] = {}
        stop = False

        def run_peer() -> None:
            identity = PeerIdentity.generate()
            host = loopback_host()
            client = TrackerClient(net.tracker_url, net.fingerprint, identity, source_host=host)
            log = acked.setdefault(identity.identity_public, [])
            k = 0
            while not stop:
                k += 1
                try:
                    client.announce(f"{host}:7000", [TorrentStatus(IH, 1000 * k, k, SIZE)], 0)
                except Exception:
                    return  # the tracker is gone
                log.append((time.monotonic(), 1000 * k))

        pool = Pool()
        for _ in range(48):
            pool.spawn(run_peer)
            gevent.sleep(0.05)  # joins spread over the run
        deadline = time.monotonic() + 60
        while sum(bool(log) for log in acked.values()) < 32 and time.monotonic() < deadline:
            gevent.sleep(0.1)
        gevent.sleep(2 * FLUSH_INTERVAL + 3.5)  # their state is written by now
        proc.kill()
        killed = time.monotonic()
        proc.popen.wait(10)
        stop = True
        pool.join(timeout=20)

    db = sqlite3.connect(tmp_path / "net" / "tracker" / DB_FILE)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    t = Tracker(tmp_path / "net" / "tracker", "127.0.0.1:0", plugins)
    try:
        _consistent(t)
        by_id = {row.seq: row.identity for row in t.peers.values()}
        for a, b, nid, _dialer in t.store.links():  # every stored link came back
            assert t.graph.nid(by_id[a], by_id[b]) == nid
        recent = killed - (2 * FLUSH_INTERVAL + 3.0)
        checked = 0
        for identity, log in acked.items():
            old = [up for when, up in log if when < recent]
            if not old:
                continue
            checked += 1
            assert identity in t.peers
            account = t.accounts[identity]
            # Totals and the report baseline were written together, as some announce left them.
            assert account.reports[IH] == (account.uploaded, account.uploaded // 1000)
            assert account.uploaded in {up for _, up in log}
            assert account.uploaded >= old[-1]
        assert checked >= 32
    finally:
        t.stop()


# ----------------------------------------------------------------------------- exact restore


def _announce(t: Tracker, peer: bytes, rng, stopped: int = 0, as_before: bool = False) -> None:
    """A verified announce of ``peer`` straight into the handler (no HTTP: many peers);
    ``as_before``: with the counters it reported last (nothing to credit)."""
    up, down, relayed = rng.randrange(1 << 20), rng.randrange(1 << 20), rng.randrange(1 << 20)
    if as_before:
        account = t.accounts[peer]
        (up, down), relayed = account.reports[IH], account.relayed_reported
    torrent = {
        b"infohash": IH,
        b"uploaded": up,
        b"downloaded": down,
        b"left": rng.choice([0, SIZE]),
        b"event": b"",
    }
    t.announce(
        peer,
        {
            b"session": b"s",
            b"onion": b"o" * 32,
            b"box": b"x" * 32,
            b"address": f"10.0.{rng.randrange(256)}.{rng.randrange(256)}:6881".encode(),
            b"torrents": [torrent],
            b"relayed": relayed,
            b"stopped": stopped,
        },
    )


def _churn(t: Tracker, live: list[bytes], rng, rounds: int) -> None:
    """Joins, re-announces (which fix who dials) and leaves."""
    for _ in range(rounds):
        r = rng.random()
        if r < 0.2 and len(live) > 10:
            _announce(t, live.pop(rng.randrange(len(live))), rng, stopped=1)
        elif r < 0.5 and live:
            _announce(t, rng.choice(live), rng)
        else:
            live.append(rng.randbytes(32))
            _announce(t, live[-1], rng)


def _state(t: Tracker):
    """Everything a restart must bring back, the graph by peer id."""
    g = t.graph
    return {
        **snapshot(t),
        "ids": {k: g.seq(k) for k in t.peers},
        "degrees": {k: g.degree(k) for k in t.peers},
        "by_nid": {(k, g.nid(k, n)): n for k in t.peers for n in g.neighbours(k)},
        "reports": {k: dict(a.reports) for k, a in t.accounts.items()},
    }


def _unlimited() -> TrackerSettings:
    from anomos.tracker.limits import LimitSettings

    return TrackerSettings(limits=LimitSettings.unlimited(), rate=1e12, burst=1e12, edge_settle=0)


@pytest.mark.parametrize("path", ["image", "image and links after it", "links only"])
def test_a_restart_restores_exactly_the_saved_graph_and_tables(tmp_path, plugins, path, caplog):
    """The graph (every link with its NID and dialer, each peer's id and degree) and the
    tables come back exactly as saved: from the graph image written on close, from an
    older image plus the links written and removed after it (a crash), or from the
    links table alone (no image)."""
    import random

    rng = random.Random(3)
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins, _unlimited(), rng=random.Random(4))
    live: list[bytes] = []
    _churn(t, live, rng, 300)
    if path == "image and links after it":
        t.persistence.image_due = True
        t.persistence.write_behind()  # an image, then more churn written after it
        _churn(t, live, rng, 300)
    t.flush()
    saved = _state(t)
    assert sum(saved["degrees"].values()) > 2 * len(live)
    db = sqlite3.connect(state / DB_FILE, isolation_level=None)
    if path == "image":
        t.stop()  # writes the image
    elif path == "links only":
        db.execute("DELETE FROM graph_image")
    (gone,) = db.execute("SELECT count(*) FROM links_gone").fetchone()
    (images,) = db.execute("SELECT count(*) FROM graph_image").fetchone()
    db.close()
    assert images == (path != "links only")
    if path == "image and links after it":
        assert gone > 0  # links removed after the image are applied too
    # (A crash: the first tracker never closed its database.)
    t2 = Tracker(state, "127.0.0.1:0", plugins, _unlimited(), rng=random.Random(5))
    try:
        assert _state(t2) == saved
        assert "links dropped" not in caplog.text
        assert t2.persistence.pending.added_edges == {}  # nothing needed mending
        g = t2.graph
        assert all(g.settled(k, n) for k in t2.peers for n in g.neighbours(k))
        # The next peer gets a fresh id, above every restored one.
        newcomer = rng.randbytes(32)
        _announce(t2, newcomer, rng)
        assert t2.graph.seq(newcomer) > max(saved["ids"].values())
    finally:
        t2.stop()
        t.stop()


def _churned_and_stopped(tmp_path, plugins, rounds: int = 100):
    """A tracker's state dir after joins, re-announces and leaves and a clean stop,
    and what the tracker held when it stopped (:func:`_state`)."""
    import random

    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins, _unlimited())
    _churn(t, [], random.Random(3), rounds)
    saved = _state(t)
    t.stop()
    return state, saved


def test_a_bad_graph_image_falls_back_to_the_links(tmp_path, plugins):
    state, saved = _churned_and_stopped(tmp_path, plugins)
    db = sqlite3.connect(state / DB_FILE, isolation_level=None)
    db.execute("UPDATE graph_image SET deg = x'00'")  # torn or foreign: does not fit
    db.close()
    t2 = Tracker(state, "127.0.0.1:0", plugins, _unlimited())
    try:
        assert _state(t2) == saved
        assert t2.persistence.image_due  # a good one is written next
    finally:
        t2.stop()


def test_a_schema_2_database_is_converted_in_place(tmp_path, plugins):
    """Schema 2 had no batch numbers on links and no image: its links are read whole."""
    state, saved = _churned_and_stopped(tmp_path, plugins)
    db = sqlite3.connect(state / DB_FILE, isolation_level=None)
    db.executescript(
        "DROP INDEX links_by_gen; ALTER TABLE links DROP COLUMN gen;"
        "DROP TABLE links_gone; DROP TABLE graph_image;"
        "UPDATE meta SET value = 2 WHERE key = 'schema_version';"
    )
    db.close()
    t2 = Tracker(state, "127.0.0.1:0", plugins, _unlimited())
    try:
        assert _state(t2) == saved
        assert t2.store.load().meta["schema_version"] == 4
    finally:
        t2.stop()


def test_a_restore_pauses_the_collector_and_gives_it_back(tmp_path, plugins, monkeypatch):
    """The restore runs with garbage collection off (its millions of new objects would
    set off collections that re-walk everything), and leaves it as it found it: on, or
    off when the embedding program had turned it off, also when the restore fails."""
    import gc

    from anomos.tracker import server

    state, _saved = _churned_and_stopped(tmp_path, plugins, rounds=30)
    seen = []
    load = server.PeerTable.load

    def spy(self, rows, last_seen):
        seen.append(gc.isenabled())
        return load(self, rows, last_seen)

    monkeypatch.setattr(server.PeerTable, "load", spy)
    assert gc.isenabled()
    Tracker(state, "127.0.0.1:0", plugins, _unlimited()).stop()
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        Tracker(state, "127.0.0.1:0", plugins, _unlimited()).stop()
        assert not gc.isenabled()
    finally:
        gc.enable()

    def broken(self, rows, last_seen):
        raise RuntimeError("restore failed")

    monkeypatch.setattr(server.PeerTable, "load", broken)
    with pytest.raises(RuntimeError):
        Tracker(state, "127.0.0.1:0", plugins, _unlimited())
    assert gc.isenabled()


def _image_gens(state: Path) -> tuple[int, int]:
    """The batches the tables' image and the graph's image were taken at."""
    db = sqlite3.connect(state / DB_FILE, isolation_level=None)
    try:
        (image_gen,) = db.execute("SELECT gen FROM tables_image").fetchone()
        (graph_gen,) = db.execute("SELECT gen FROM graph_image").fetchone()
    finally:
        db.close()
    return image_gen, graph_gen


def _rows_only_copy(state: Path, to: Path) -> Path:
    """A copy of the tracker's state without its images: a restore from the rows alone."""
    shutil.copytree(state, to)
    db = sqlite3.connect(to / DB_FILE, isolation_level=None)
    db.execute("DELETE FROM tables_image")
    db.execute("DELETE FROM graph_image")
    db.close()
    return to


def _pack_late(t: Tracker):
    """Take the images with the next batch, but have the writer thread pack the tables'
    only once the returned event is set (after the test changed more)."""
    from gevent import monkey

    churned = monkey.get_original("threading", "Event")()  # a real thread waits on it
    take = t.persistence._tables
    assert take is not None

    def packed_late(gen):
        pack = take(gen)  # each slot's peer is taken now, with the graph's image

        def pack_after_more_changes():
            assert churned.wait(30)
            return pack()

        return pack_after_more_changes

    t.persistence._tables = packed_late
    t.persistence.image_due = True
    t.persistence.write_behind()
    assert t.store.busy
    return churned


def test_a_restore_from_the_images_and_later_rows_equals_one_from_the_rows(tmp_path, plugins):
    """The tables' image is packed by the writer thread while serving goes on, so it may
    hold changes made after its batch; those and every later change are re-read from
    their rows (the logs name their keys). Here the packing waits until the tracker
    changed more (joins, leaves, new counters), and more is written after the image: a
    restart from the images equals one from the rows alone, and what was saved."""
    import random

    rng = random.Random(7)
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins, _unlimited(), rng=random.Random(8))
    live: list[bytes] = []
    _churn(t, live, rng, 300)
    t.flush()
    churned = _pack_late(t)  # batch G with the images: packed by the writer, later
    _churn(t, live, rng, 300)  # meanwhile: batch G+1 and on
    churned.set()
    t.flush()  # the images (as of G) with the changes since
    _churn(t, live, rng, 200)
    t.flush()
    saved = _state(t)
    image_gen, graph_gen = _image_gens(state)
    db = sqlite3.connect(state / DB_FILE, isolation_level=None)
    logged = db.execute(
        "SELECT (SELECT count(*) FROM peers_log WHERE gen > ?),"
        " (SELECT count(*) FROM accounts_log WHERE gen > ?)",
        (image_gen, image_gen),
    ).fetchone()
    db.close()
    assert image_gen == graph_gen < t.persistence.gen
    assert min(logged) > 10  # peers and accounts changed after the image
    rows_only = _rows_only_copy(state, tmp_path / "rows")
    # (A crash: the first tracker never closed its database.)
    from_images = Tracker(state, "127.0.0.1:0", plugins, _unlimited())
    from_rows = Tracker(rows_only, "127.0.0.1:0", plugins, _unlimited())
    try:
        assert not from_images.persistence.image_due  # restored from the images
        assert from_rows.persistence.image_due
        assert _state(from_images) == _state(from_rows) == saved
        # Every field of every account (sessions and the last relayed report too).
        assert from_images.accounts == from_rows.accounts == t.accounts
        for restored in (from_images, from_rows):
            assert restored.peers.last_seen(live[-1]) == pytest.approx(time.time(), abs=60)
            assert len(restored.peers) == len(live)
    finally:
        from_images.stop()
        from_rows.stop()
        t.stop()


def test_packed_strings_keep_every_byte_and_refuse_a_torn_blob():
    """The images' byte strings come back whole: trailing NUL bytes, empty entries (free
    slots) and mixed widths; a blob cut short or with offsets that do not fit is refused."""
    from anomos.tracker.images import pack_strings, unpack_strings

    same_width = [b"\x00" * 32, b"a" * 31 + b"\x00", b"", b"\x01" * 32, b""]
    mixed = [b"s", b"", b"session\x00", b"\x00"]
    for items in (same_width, mixed, [], [b""] * 3):
        assert unpack_strings(pack_strings(items)) == items
    blob = pack_strings(same_width)
    for torn in (blob[:-1], blob[:12], blob[:16] + b"\xff" * 8 + blob[24:]):
        with pytest.raises(ValueError):
            unpack_strings(torn)


def test_a_slot_free_in_the_image_and_taken_since_holds_no_stale_row(tmp_path, plugins):
    """The peer table's columns are read after the image's batch: a peer that joined
    since may sit in a slot the graph's image has free, while the restored graph puts
    it elsewhere (its free slots are handed out in another order). That slot must not
    come back as a row without a peer."""
    import random

    rng = random.Random(9)
    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, _unlimited())
    live: list[bytes] = []
    _churn(t, live, rng, 120)
    slot = t.graph.slot
    high, low = sorted((p for p in live[:20]), key=slot)[-1], min(live[:20], key=slot)
    for peer in (high, low):  # the lower slot is freed last: the next join takes it
        live.remove(peer)
        _announce(t, peer, rng, stopped=1)
    t.flush()
    churned = _pack_late(t)
    newcomer = rng.randbytes(32)
    _announce(t, newcomer, rng)
    live.append(newcomer)
    churned.set()
    t.flush()
    saved = _state(t)
    t2 = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, _unlimited())
    try:
        assert not t2.persistence.image_due  # restored from the images
        assert len(t2.peers) == len(live) == len(list(t2.peers))
        assert _state(t2) == saved
    finally:
        t2.stop()
        t.stop()


def test_accounts_moving_while_the_writer_copies_them_restore_as_from_the_rows(
    tmp_path, plugins, monkeypatch, caplog
):
    """The race of the tables' image (issue 15): the writer thread copies the packed
    account table while the event loop moves accounts between graph slots and the loose
    dict. First, once the writer has read which peer holds each slot, peers leave (their
    accounts go loose), peers that left earlier rejoin into the freed slots (their
    accounts move in) and new peers join; then the copy runs while the loop keeps
    joining, leaving and crediting, with thread switches every microsecond (and should
    the writer walk the graph's live slots, the loop churns half-way through the walk,
    as a thread switch there would have it). The image must be written, and a restart
    from it equal one from the rows alone."""
    import itertools
    import random
    import sys
    import threading

    from gevent import monkey

    from anomos.tracker.graph import PeerGraph

    event = monkey.get_original("threading", "Event")  # real threads wait on them
    read, go, packed, midway, resumed = event(), event(), event(), event(), event()
    main = threading.get_ident()
    seen: list = []
    slot_peers, slots = PeerGraph.slot_peers, PeerGraph.slots

    def slot_peers_then_wait(self):
        peers = slot_peers(self)
        if threading.get_ident() != main:  # the writer thread, packing the image
            seen.append(peers)
            read.set()
            assert go.wait(30)
        return peers

    def slots_paused_half_way(self):
        view = slots(self)
        if threading.get_ident() == main:
            return view

        def walk():
            items = iter(view)
            yield from itertools.islice(items, len(view) // 2)
            midway.set()
            assert resumed.wait(30)
            yield from items

        return walk()

    monkeypatch.setattr(PeerGraph, "slot_peers", slot_peers_then_wait)
    monkeypatch.setattr(PeerGraph, "slots", slots_paused_half_way)
    rng = random.Random(11)
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins, _unlimited(), rng=random.Random(12))
    live: list[bytes] = []
    _churn(t, live, rng, 1500)
    left = [live.pop(rng.randrange(len(live))) for _ in range(40)]
    for peer in left:
        _announce(t, peer, rng, stopped=1)  # their accounts are kept loose
    t.flush()
    take = t.persistence._tables
    assert take is not None

    def tables(gen):
        pack = take(gen)

        def pack_and_tell():
            try:
                return pack()
            finally:
                packed.set()

        return pack_and_tell

    t.persistence._tables = tables
    t.persistence.image_due = True
    t.persistence.write_behind()
    switch = sys.getswitchinterval()
    try:
        assert read.wait(30)
        # Between the writer's reading of the slots and its copy of the columns:
        # peers expire (no announce: their accounts only move), then peers rejoin into
        # the slots freed (slot reuse) reporting what they did before (nothing changes
        # in their accounts but where they are), then new peers join.
        slot = t.graph.slot
        expired = [live.pop(rng.randrange(len(live))) for _ in range(30)]
        for peer in expired:
            t._remove_peer(peer, t.persistence.pending)
        back = left[:20] + expired[:10]
        for peer in back:
            _announce(t, peer, rng, as_before=True)
            live.append(peer)
        assert not back & t.persistence.pending.accounts.keys()  # (their accounts: the same)
        reused = [p for p in back if seen[0][slot(p)] not in (None, p)]
        assert len(reused) >= 10  # they sit in slots the writer saw others in
        _churn(t, live, rng, 50)
        sys.setswitchinterval(1e-6)
        go.set()
        rounds = 0
        while not packed.is_set():
            _churn(t, live, rng, 2)
            rounds += 2
            if midway.is_set() and not resumed.is_set():
                _churn(t, live, rng, 20)
                resumed.set()
    finally:
        go.set()
        resumed.set()
        sys.setswitchinterval(switch)
    t.flush()  # the image, with every change made while it was copied
    assert rounds > 0
    assert "packing the tables image failed" not in caplog.text
    _churn(t, live, rng, 100)
    t.flush()
    saved = _state(t)
    image_gen, graph_gen = _image_gens(state)
    assert image_gen == graph_gen < t.persistence.gen
    rows_only = _rows_only_copy(state, tmp_path / "rows")
    monkeypatch.undo()
    # (A crash: the first tracker never closed its database.)
    from_images = Tracker(state, "127.0.0.1:0", plugins, _unlimited())
    from_rows = Tracker(rows_only, "127.0.0.1:0", plugins, _unlimited())
    try:
        assert not from_images.persistence.image_due  # restored from the images
        assert _state(from_images) == _state(from_rows) == saved
        assert from_images.accounts == from_rows.accounts == t.accounts
    finally:
        from_images.stop()
        from_rows.stop()
        t.stop()


def test_the_store_keeps_no_copy_of_an_image_it_wrote(tmp_path):
    """SQLite copies a bound BLOB and a cached statement keeps its last values bound:
    the images written (~310 MB at 10^6) stayed resident until the next ones, 245 B a
    peer of the tracker's RSS. After a write, SQLite holds less than the image."""
    import ctypes

    from anomos.tracker.graph import GraphImage

    try:
        sqlite = ctypes.CDLL("libsqlite3.so.0")
    except OSError:
        pytest.skip("no shared libsqlite3 to read SQLite's memory from")
    sqlite.sqlite3_memory_used.restype = ctypes.c_int64
    store = Store(tmp_path)
    try:
        if not sqlite.sqlite3_memory_used():
            pytest.skip("this Python's sqlite3 does not use the shared libsqlite3")
        store._db.execute("PRAGMA cache_size=-2000")  # (pages cached are not the point)
        before = sqlite.sqlite3_memory_used()
        size = 32 << 20
        store.write(Batch(gen=1, image=GraphImage(1, 8, b"", b"\x01" * size, b"", b"", b"")))
        assert sqlite.sqlite3_memory_used() - before < size // 2
    finally:
        store.close()
