"""Churn: relays die, links drop, peers vanish; the network notices and heals.

The fast tests drive the tracker in-process (lost-neighbour reports, who
dials a new edge) and run real :class:`anomos.peer.node.Peer` objects against
it. The slow ones SIGKILL or SIGSTOP real peer processes of a
:class:`anomos.localnet.LocalNetwork` mid-transfer and read the outcome from
the operating system's socket table and the tracker's SQLite file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from anomos.errors import TrackerError
from anomos.identity import PeerIdentity
from anomos.localnet import LocalNetwork, Proc
from anomos.peer import node as nodemod
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.testing import loopback_host, start_peers
from anomos.torrent.metainfo import make_metainfo
from anomos.tracker import server as server_mod
from anomos.tracker.client import LostNeighbour, TrackerClient
from anomos.tracker.graph import PeerGraph
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

# ----------------------------------------------------------------------------- helpers


class Client:
    """A peer identity talking to the tracker, without links."""

    def __init__(self, tracker: Tracker) -> None:
        self.identity = PeerIdentity.generate()
        self.host = loopback_host()
        self.address = f"{self.host}:7000"
        self.client = TrackerClient(
            tracker.url, tracker.fingerprint, self.identity, source_host=self.host
        )

    @property
    def pub(self) -> bytes:
        return self.identity.identity_public

    def announce(self, lost: list[LostNeighbour] | None = None) -> Any:
        return self.client.announce(self.address, [], 0, lost=lost or [])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    with gevent.Timeout(timeout, AssertionError(f"{what}: not within {timeout:g} s")):
        while not predicate():
            gevent.sleep(0.05)


@pytest.fixture
def tracker(tmp_path: Path, plugins: Plugins) -> Iterator[Tracker]:
    t = Tracker(
        tmp_path / "tracker",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(edge_settle=0, min_neighbours=3),
    )
    t.start()
    yield t
    t.stop()


# ----------------------------------------------------------------------------- the tracker side


def test_one_report_stops_planning_over_the_edge_two_drop_the_peer(tracker: Tracker) -> None:
    peers = [Client(tracker) for _ in range(8)]
    for p in peers:
        p.announce()
    for p in peers:  # everyone told of every edge: all settled
        p.announce()
    g = tracker.graph
    victim = peers[0]
    reporters = [p for p in peers if p.pub in set(g.neighbours(victim.pub))]
    assert len(reporters) >= 3
    first, second = reporters[:2]
    assert g.settled(first.pub, victim.pub)

    reply = first.announce([LostNeighbour(g.nid(first.pub, victim.pub), 0)])
    # One report: that edge is out of planning at once, the peer stays (it may be
    # only that link), and the reporter is asked back soon to hear the outcome.
    assert not g.settled(first.pub, victim.pub)
    assert victim.pub in tracker.peers
    assert reply.interval == server_mod.LOST_RECHECK_INTERVAL < tracker.interval
    assert g.settled(reporters[2].pub, victim.pub)

    second.announce([LostNeighbour(g.nid(second.pub, victim.pub), 0)])
    # A second neighbour lost it too: dropped and its neighbours repaired.
    assert victim.pub not in tracker.peers and victim.pub not in g
    assert tracker.stats()["dropped"] == 1
    for p in peers[1:]:
        assert g.degree(p.pub) >= g.min_neighbours
    # The first reporter, back as asked, hears its replacement neighbours.
    reply = first.announce()
    assert {n.identity for n in reply.neighbours} == set(g.neighbours(first.pub))
    assert victim.pub not in {n.identity for n in reply.neighbours}


def test_a_report_older_than_the_neighbours_announce_is_ignored(tracker: Tracker) -> None:
    peers = [Client(tracker) for _ in range(6)]
    for _ in range(2):
        for p in peers:
            p.announce()
    g = tracker.graph
    victim = peers[0]
    a, b = [p for p in peers if p.pub in set(g.neighbours(victim.pub))][:2]
    # The victim restarted: it announced again after the links dropped.
    time.sleep(0.3)
    victim.announce()
    for p in (a, b):
        p.announce([LostNeighbour(g.nid(p.pub, victim.pub), 2000)])
    assert victim.pub in tracker.peers
    assert g.settled(a.pub, victim.pub)
    # A report about an NID that is not an edge of the reporter changes nothing.
    a.announce([LostNeighbour(12345, 10)])
    assert len(tracker.peers) == 6


def test_malformed_lost_lists_are_refused(tracker: Tracker) -> None:
    p = Client(tracker)
    too_many = [LostNeighbour(i + 1, 0) for i in range(server_mod.MAX_LOST + 1)]
    with pytest.raises(TrackerError, match="'lost' must be a list of at most"):
        p.announce(too_many)
    with pytest.raises(TrackerError, match="must be one of lost, protocol"):
        p.announce([LostNeighbour(1, 0, "bored")])
    with pytest.raises(TrackerError, match="'ago' must be an integer"):
        p.announce([LostNeighbour(1, server_mod.MAX_LOST_AGE_MS + 1)])


def test_the_end_told_first_dials_a_new_edge() -> None:
    g = PeerGraph(min_neighbours=2, max_neighbours=3)
    for name in "abcde":
        g.add_peer(name)
        g.mark_told(name)
    changes = g.remove_peer("a")
    for edge in changes.added:  # repairs among old peers: nobody told yet, newer dials
        assert g.dialer(edge.a, edge.b) == max(edge.a, edge.b, key=g.seq)
    g.add_peer("f")
    g.mark_told("f")
    new = [(x, y) for x, y in ((e.a, e.b) for e in g.edges()) if "f" in (x, y)]
    assert new and all(g.dialer(x, y) == "f" for x, y in new)
    # An edge between two old peers, told to the older one first: the older dials.
    g2 = PeerGraph(min_neighbours=1, max_neighbours=1)
    g2.add_peer("old")
    g2.add_peer("new")
    assert g2.dialer("old", "new") == "new"
    fixed = g2.mark_told("old")
    assert [(e.a, e.dialer) for e in fixed] == [("old", "old")]
    assert g2.dialer("old", "new") == g2.dialer("new", "old") == "old"
    g2.mark_told("new")
    assert g2.dialer("new", "old") == "old"


def test_dial_direction_survives_a_tracker_restart(tmp_path: Path, plugins: Plugins) -> None:
    state = tmp_path / "tracker"
    t = Tracker(state, "127.0.0.1:0", plugins, TrackerSettings(edge_settle=0, min_neighbours=2))
    t.start()
    peers = [Client(t) for _ in range(6)]
    for p in peers:
        p.announce()
    victim = peers[1]
    for p in [q for q in peers if q.pub in set(t.graph.neighbours(victim.pub))][:2]:
        p.announce([LostNeighbour(t.graph.nid(p.pub, victim.pub), 0)])
    before = {frozenset((e.a, e.b)): (e.nid, e.dialer) for e in t.graph.edges()}
    t.stop()
    t2 = Tracker(state, "127.0.0.1:0", plugins, TrackerSettings(min_neighbours=2))
    try:
        after = {frozenset((e.a, e.b)): (e.nid, e.dialer) for e in t2.graph.edges()}
        assert after == before
    finally:
        t2.stop()


# ----------------------------------------------------------------------------- real peers


@pytest.fixture
def peers(
    tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Tracker, list[Peer]]]:
    """An in-process tracker (long interval) and six relaying peers on their own hosts."""
    monkeypatch.setattr(nodemod, "LINK_WATCH_INTERVAL", 0.5)
    t = Tracker(
        tmp_path / "tracker",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(min_neighbours=3, edge_settle=0.2),
    )
    t.start()
    made: list[Peer] = start_peers(plugins, t, tmp_path, 6)  # all heard of every edge
    wait_until(lambda: all_linked(made), 10, "links up")
    yield t, made
    for p in made:
        p.stop()
    t.stop()


def all_linked(peers: list[Peer]) -> bool:
    return all(set(p.links.neighbours()) <= set(p.links.links) for p in peers if not p._stopped)


def crash(peer: Peer) -> None:
    """Vanish as a killed process would: links drop, no goodbye to the tracker."""
    peer._stopped = True
    peer._group.kill(block=False)
    peer.switch.close()
    peer.links.close()


def test_a_crashed_peer_is_reported_dropped_and_replaced_within_seconds(
    peers: tuple[Tracker, list[Peer]],
) -> None:
    tracker, live = peers
    victim = live[0]
    vid = victim.identity.identity_public
    survivors = live[1:]
    assert tracker.interval == 60
    t0 = time.monotonic()
    crash(victim)
    # Its neighbours see the links drop and report at once: dropped long before
    # an announce interval (60 s), let alone expiry (180 s).
    wait_until(lambda: vid not in tracker.peers, 10, "victim dropped")
    assert time.monotonic() - t0 < tracker.interval / 2
    # Every survivor hears of its replacement neighbours and links to them.
    wait_until(
        lambda: all(
            vid not in {bytes(nb.identity) for nb in p.links.neighbours().values()}
            for p in survivors
        ),
        10,
        "survivors re-assigned",
    )
    wait_until(lambda: all_linked(survivors), 10, "replacement links up")
    for p in survivors:
        assert len(p.links.links) >= tracker.graph.min_neighbours


def test_a_neighbour_that_restarts_is_not_dropped(peers: tuple[Tracker, list[Peer]]) -> None:
    """A stale report (the link dropped before the neighbour came back) changes nothing."""
    tracker, live = peers
    victim = live[0]
    vid = victim.identity.identity_public
    nbr = next(p for p in live[1:] if vid in tracker.graph.neighbours(p.identity.identity_public))
    nid = tracker.graph.nid(nbr.identity.identity_public, vid)
    nbr._lost[nid] = (time.monotonic() - 5.0, "lost")  # lost 5 s ago
    victim.announce()  # ... and the victim announced since
    nbr.announce()
    assert vid in tracker.peers and not nbr._lost


# ----------------------------------------------------------------------------- processes

FILE_SIZE = 48 * 1024 * 1024 + 777


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def throttled(*procs: Proc, run: float = 0.03, pause: float = 0.07) -> Iterator[None]:
    """Slow processes down (SIGSTOP/SIGCONT duty cycle), so a transfer on a fast
    machine still lasts long enough to be interrupted mid-way."""

    def cycle() -> None:
        while True:
            for p in procs:
                if p.alive():
                    os.kill(p.pid, signal.SIGSTOP)
            gevent.sleep(pause)
            for p in procs:
                if p.alive():
                    os.kill(p.pid, signal.SIGCONT)
            gevent.sleep(run)

    g = gevent.spawn(cycle)
    try:
        yield
    finally:
        g.kill()
        for p in procs:
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)


def received_by_host() -> dict[str, int]:
    from test_network import socket_table

    totals: dict[str, int] = {}
    for (lip, _, _, _), n in socket_table().items():
        totals[lip] = totals.get(lip, 0) + n
    return totals


def tracker_graph(db: Path) -> tuple[dict[bytes, str], set[frozenset[bytes]]]:
    """(identity -> host, edges) as the tracker last wrote them."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        peers = {
            i: a.rpartition(":")[0] for i, a in con.execute("SELECT identity, address FROM peers")
        }
        edges = {frozenset((a, b)) for a, b in con.execute("SELECT a, b FROM edges")}
    finally:
        con.close()
    return peers, edges


def identity_of(proc: Proc) -> bytes:
    return bytes.fromhex(json.loads((proc.state_dir / "peer.json").read_text())["identity"])


@pytest.mark.slow
@pytest.mark.integration
def test_relay_killed_mid_transfer(tmp_path: Path) -> None:
    data = tmp_path / "share" / "big.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(FILE_SIZE))
    interval = 60
    with LocalNetwork(tmp_path / "net", verbose=1) as net:
        tracker = net.start_tracker(
            "--neighbours", "3-4", "--relays", "1-3", "--interval", str(interval)
        )
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp_path / "big.atorrent"
        meta.save(atorrent)
        relays = [net.start_peer(f"relay{i}", "relay") for i in range(6)]
        seeders = [
            net.start_peer(f"seeder{i}", "seed", str(atorrent), "--data", str(data))
            for i in range(2)
        ]
        time.sleep(6.0)  # edges settle (a relay refreshes for unknown callers every 2 s)
        dest, summary = tmp_path / "dest", tmp_path / "summary.json"
        downloader = net.start_peer(
            "downloader", "get", str(atorrent), "--dest", str(dest), "--sources", "2",
            "--summary", str(summary), "--timeout", "80", wait=False,
        )  # fmt: skip
        # Kill the host that relays most of the transfer, once it is under way
        # (the sources are slowed down so that this is early in the transfer).
        # Paths are drawn from all peers: now and then a seeder relays the other
        # seeder's circuit and no dedicated relay carries much.
        victim, got = None, {}
        deadline = time.monotonic() + 40
        with throttled(*seeders):
            while victim is None and downloader.alive() and time.monotonic() < deadline:
                got = received_by_host()
                best = max([*relays, *seeders], key=lambda r: got.get(r.host, 0))
                if got.get(best.host, 0) > FILE_SIZE // 16:
                    victim = best
                time.sleep(0.02)
            assert victim is not None, f"no host between the ends carried the transfer: {got}"
            db = tracker.state_dir / "tracker.sqlite3"
            vid = identity_of(victim)
            assert vid in tracker_graph(db)[0]
            killed_at = time.monotonic()
            victim.kill()
            time.sleep(1.0)

        # The tracker drops it and repairs its neighbours long before the next
        # announce interval (60 s) could have told anyone, let alone expiry (180 s).
        dropped_after = None
        while time.monotonic() - killed_at < interval / 2:
            hosts, edges = tracker_graph(db)
            if vid not in hosts and not any(vid in e for e in edges):
                dropped_after = time.monotonic() - killed_at
                break
            time.sleep(0.1)
        assert dropped_after is not None, "the dead relay is still in the tracker's graph"
        survivors = [p for p in [*relays, *seeders] if p is not victim]
        for _ in range(100):  # ... and the survivors hold links to their new neighbours
            hosts, edges = tracker_graph(db)
            degree = {h: 0 for h in hosts}
            for e in edges:
                for i in e:
                    degree[i] = degree.get(i, 0) + 1
            if all(degree.get(identity_of(p), 0) >= 3 for p in survivors):
                break
            time.sleep(0.2)
        assert all(degree.get(identity_of(p), 0) >= 3 for p in survivors), degree

        assert downloader.popen.wait(90) == 0, downloader.log_tail()
        assert sha256(dest / data.name) == sha256(data)
        report = json.loads(summary.read_text())
        # Its circuit broke and fresh tracking codes came at once, not at the
        # next announce (the interval is 60 s).
        assert report["broken_circuits"] >= 1, report
        assert report["replan_seconds"], report
        assert max(report["replan_seconds"]) < interval / 4, report
        # Both ends of the broken circuit learnt of it: the source closed it too (its own
        # link to the victim was lost, or a BREAK came, which carries no reason).
        sources_log = "".join(s.log_path.read_text(errors="replace") for s in seeders)
        learnt = ("link lost", "link to NID", "broken by the circuit")
        assert any(s in sources_log for s in learnt), sources_log[-2000:]


@pytest.mark.slow
@pytest.mark.integration
def test_a_vanished_peer_is_expired(tmp_path: Path) -> None:
    """SIGSTOP: the peer's sockets stay open, nobody sees a link drop; expiry finds it."""
    interval = 2
    with LocalNetwork(tmp_path / "net") as net:
        tracker = net.start_tracker("--neighbours", "2-3", "--interval", str(interval))
        relays = [net.start_peer(f"relay{i}", "relay") for i in range(5)]
        db = tracker.state_dir / "tracker.sqlite3"
        time.sleep(1.5)
        victim = relays[0]
        vid = identity_of(victim)
        assert vid in tracker_graph(db)[0]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            while vid in tracker_graph(db)[0] and time.monotonic() - stopped_at < 30:
                time.sleep(0.2)
            gone_after = time.monotonic() - stopped_at
            hosts, edges = tracker_graph(db)
            assert vid not in hosts and not any(vid in e for e in edges)
            # Expired, not reported (a report drops a peer within a second): it took
            # about EXPIRY_INTERVALS intervals.
            assert gone_after >= (server_mod.EXPIRY_INTERVALS - 2) * interval
            for r in relays[1:]:
                assert sum(identity_of(r) in e for e in edges) >= 2
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        # Back from the dead, it announces again and rejoins.
        deadline = time.monotonic() + 20
        while vid not in tracker_graph(db)[0] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert vid in tracker_graph(db)[0]
