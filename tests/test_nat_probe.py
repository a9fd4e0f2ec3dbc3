"""The tracker dials announcing peers back, over real sockets, and cannot be aimed elsewhere.

A tracker with probing on (as ``anomos tracker`` runs by default) and real
peers in this process: each learns it is reachable and says so in one line.
Fake peers announcing a private address (as peers behind NAT do) are taken as
unreachable without being dialled, dial their edges themselves, and are never
linked to each other. A hostile peer cannot make the tracker connect to
another host, nor to many ports of its own.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent.server import StreamServer
from test_churn import Client, wait_until

from anomos.pluginmanager import Plugins
from anomos.testing import loopback_host, start_peers
from anomos.tracker.reachability import Reach
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings


@pytest.fixture
def tracker(tmp_path: Path, plugins: Plugins) -> Iterator[Tracker]:
    t = Tracker(
        tmp_path / "tracker",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(min_neighbours=2, max_neighbours=4, edge_settle=0, probe_reachability=True),
    )
    t.start()
    yield t
    t.stop()


class Listener:
    """A plain TCP listener that records the first bytes of every connection."""

    def __init__(self, host: str) -> None:
        self.first: list[bytes] = []
        self.server = StreamServer((host, 0), self._handle)
        self.server.start()
        self.address = f"{host}:{self.server.server_port}"

    def _handle(self, sock: socket.socket, _addr: object) -> None:
        sock.settimeout(2)
        try:
            self.first.append(sock.recv(5))
        except OSError:
            self.first.append(b"")
        sock.close()

    def close(self) -> None:
        self.server.stop()


def test_peers_learn_whether_they_are_reachable_and_nat_peers_dial_out(
    tracker: Tracker, plugins: Plugins, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="anomos.peer.node")
    reach = tracker.reach
    assert reach is not None
    peers = start_peers(plugins, tracker, tmp_path, 3, announce=False)
    try:
        for p in peers:
            pub = p.identity.identity_public
            wait_until(lambda pub=pub: reach.state(pub) is Reach.REACHABLE, 20, "probe answered")
            p.announce()
            assert p.reachable == "reachable"
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reachable")]
        assert sorted(lines) == sorted(f"reachable at {p.address}" for p in peers)
        # Peers behind NAT advertise their private address; the tracker sees the router.
        natted = []
        for _ in range(4):
            c = Client(tracker)
            c.address = f"{loopback_host()}:7000"  # not where its requests come from
            reply = c.announce()
            assert reply.reachable == "unreachable"
            natted.append(c)
        g = tracker.graph
        shut = {c.pub for c in natted}
        for c in natted:
            reply = c.announce()
            assert reply.neighbours, "an unreachable peer still gets reachable neighbours"
            for nb in reply.neighbours:
                assert nb.identity not in shut, "two unreachable peers made neighbours"
                assert nb.dial, "the unreachable side must dial"
        for p in peers:
            p.announce()
            for nb in p.links.neighbours().values():
                if nb.identity in shut:
                    assert not nb.dial
        assert all(g.dialer(e.a, e.b) in shut for e in g.edges() if {e.a, e.b} & shut)
        assert tracker.stats()["unreachable"] == len(natted)
        assert tracker.stats()["reachable"] == len(peers)
        assert not any("not reachable" in r.getMessage() for r in caplog.records)
    finally:
        for p in peers:
            p.stop()


def test_probes_go_only_to_the_announcing_host_once_per_identity(tracker: Tracker) -> None:
    reach = tracker.reach
    assert reach is not None
    attacker = Client(tracker)
    victim = Listener(loopback_host())  # another host: the tracker must never dial it
    own = [Listener(attacker.host) for _ in range(4)]  # ports on the attacker's own host
    try:
        attacker.address = victim.address
        assert attacker.announce().reachable == "unreachable"
        # Its own host, where something that is not an anomos peer answers: one probe,
        # the link's TLS hello (a handshake record), and the verdict is "unreachable".
        attacker.address = own[0].address
        attacker.announce()
        wait_until(lambda: own[0].first, 10, "the probe reached the announcing host")
        assert own[0].first[0][:1] == b"\x16"  # TLS handshake
        wait_until(lambda: reach.state(attacker.pub) is not Reach.CHECKING, 10, "a verdict")
        assert reach.state(attacker.pub) is Reach.UNREACHABLE
        assert reach.reason(attacker.pub)
        # Announcing other ports at once: no more probes within PROBE_EVERY.
        for listener in own[1:]:
            attacker.address = listener.address
            assert attacker.announce().reachable == "checking"
        gevent.sleep(0.5)
        assert victim.first == []
        assert [len(x.first) for x in own] == [1, 0, 0, 0]
        assert reach.started == 1
    finally:
        victim.close()
        for listener in own:
            listener.close()
