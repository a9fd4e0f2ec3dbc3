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
        "accounts": {k: (a.uploaded, a.downloaded, a.relayed) for k, a in t.accounts.items()},
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
    for i, p in enumerate(peers):
        p.announce(left=0 if i < 3 else SIZE, uploaded=10 * i, downloaded=5, relayed=100 * i)
    for i, p in enumerate(peers):  # a second round: splits and repairs are persisted too
        p.announce(left=0 if i < 3 else SIZE, uploaded=10 * i, downloaded=5, relayed=100 * i)
    planned = len(peers[9].client.request_circuits(IH, 2))
    assert planned >= 1
    before = snapshot(t)
    fingerprint = t.fingerprint
    t.stop()

    t2 = Tracker(state, "127.0.0.1:0", plugins)
    t2.start()
    try:
        assert t2.fingerprint == fingerprint
        assert snapshot(t2) == before
        assert t2.stats()["circuits_planned"] == planned
        # Peers are live again without announcing: circuits can be planned at once.
        for p in peers:
            p.client = TrackerClient(
                t2.url, fingerprint, p.identity, source_host=p.host, timeout=10
            )
            p.client.session = t2.accounts[p.pub].session  # same process, same session
        assert peers[9].client.request_circuits(IH, 1)
        # Re-announcing the same cumulative counters credits nothing twice.
        reply = peers[4].announce(left=SIZE, uploaded=40, downloaded=5, relayed=400)
        assert (reply.uploaded, reply.downloaded, reply.relayed) == (40, 5, 400)
        assert {(n.identity, n.nid) for n in reply.neighbours} == {
            (b, nid) for a, b, nid, _ in before["edges"] if a == peers[4].pub
        } | {(a, nid) for a, b, nid, _ in before["edges"] if b == peers[4].pub}
    finally:
        t2.stop()


def test_ratio_survives_leaving_and_restart(tmp_path, plugins):
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins)
    t.start()
    p = Peer(t)
    p.announce(left=SIZE, downloaded=1000, relayed=3000)
    p.announce(stopped=True, left=SIZE, downloaded=1000, relayed=3000)
    assert p.pub not in t.peers
    t.stop()
    t2 = Tracker(state, "127.0.0.1:0", plugins)
    t2.start()
    try:
        p.client = TrackerClient(t2.url, t2.fingerprint, p.identity, source_host=p.host)
        reply = p.client.announce(p.address, [TorrentStatus(IH, 0, 0, SIZE)], 0)
        assert (reply.downloaded, reply.relayed) == (1000, 3000)
        assert reply.ratio == pytest.approx(3.0)
    finally:
        t2.stop()


def test_store_round_trip_and_peer_removal(tmp_path):
    store = Store(tmp_path)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    batch = Batch()
    for i, k in enumerate((a, b, c)):
        batch.peers[k] = PeerRow(k, b"o" * 32, b"x" * 32, f"10.0.0.{i}:1", 5.0, i + 1)
        batch.accounts[k] = Account(1, 2, 3, b"s", 7)
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
    assert snap.accounts[b] == Account(1, 2, 3, b"s", 7)
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
