"""Persistence: a restarted tracker keeps its identity, peers, edges, NIDs, swarms and ratios."""

from __future__ import annotations

import sqlite3

import pytest
from test_tracker_server import IH, SIZE, Peer

from anomos.errors import ConfigError
from anomos.tracker.client import TorrentStatus, TrackerClient
from anomos.tracker.server import Tracker
from anomos.tracker.store import DB_FILE, Account, Batch, PeerRow, Store, SwarmRow


def snapshot(t: Tracker):
    return {
        "edges": sorted((e.a, e.b, e.nid, e.dialer) for e in t.graph.edges()),
        "peers": {k: (r.onion, r.box, r.address, r.seq) for k, r in t.peers.items()},
        "accounts": {
            k: (a.uploaded, a.downloaded, a.relayed_claimed, a.relayed_confirmed)
            for k, a in t.accounts.items()
        },
        "swarms": {
            ih: {p: (r.left, r.uploaded, r.downloaded) for p, r in s.rows.items()}
            for ih, s in t.swarms.items()
        },
        "sizes": dict(t.sizes),
    }


def test_restart_keeps_everything(tmp_path, plugins):
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins, edge_settle=0)
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
        batch.peers[k] = PeerRow(k, b"o" * 32, b"x" * 32, f"10.0.0.{i}:1", 5.0, i + 1)
        batch.accounts[k] = Account(1, 2, 30, 3, b"s", 7)
        batch.set_report(k, IH, (i, 2 * i))
    batch.add_edge(b, a, 11)
    batch.add_edge(b, c, 12)
    batch.set_swarm(IH, a, SwarmRow(0, 1, 2))
    batch.set_swarm(IH, c, SwarmRow(9, 0, 0))
    batch.torrents[IH] = 9
    batch.meta["circuits_planned"] = 4
    store.write(batch)
    snap = store.load()
    assert [p.identity for p in snap.peers] == [a, b, c]
    assert sorted(snap.edges) == [(a, b, 11), (b, c, 12)]
    assert snap.accounts[b] == Account(1, 2, 30, 3, b"s", 7)
    assert snap.accounts[b].relayed == 3
    assert snap.accounts[b].reports == {IH: (1, 2)}
    assert snap.torrents == {IH: 9} and snap.meta["circuits_planned"] == 4

    gone = Batch(removed_peers={a})
    store.write(gone)
    snap = store.load()
    assert [p.identity for p in snap.peers] == [b, c]
    assert snap.edges == [(b, c, 12)]
    assert [(ih, p) for ih, p, _ in snap.swarm] == [(IH, c)]
    assert snap.accounts[a].reports == {IH: (0, 0)}  # the account outlives the peer
    cleared = Batch()
    cleared.clear_reports(c)
    store.write(cleared)
    assert store.load().accounts[c].reports == {}
    store.close()


def test_store_refuses_a_foreign_schema(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="schema 99, expected 1"):
        Store(tmp_path)
