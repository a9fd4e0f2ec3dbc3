"""A peer's tracker client keeps its TLS connection alive (issue 13, fast start): the
circuit request right after the join rides the join's connection, a connection the
tracker closed while idle is replaced without an error, and an old one is not
reused. Connections are counted where the tracker accepts them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from anomos.config import Settings
from anomos.identity import PeerIdentity
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.testing import loopback_host
from anomos.tracker import client as clientmod
from anomos.tracker import http as httpmod
from anomos.tracker.client import TrackerClient
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

INFOHASH = b"\x01" * 20


@pytest.fixture
def accepted(monkeypatch: Any) -> list[Any]:
    """Every TCP connection the tracker's front end takes, as it takes it."""
    seen: list[Any] = []
    original = httpmod._Server.wrap_socket_and_handle

    def counting(self: Any, client_socket: Any, address: Any) -> Any:
        seen.append(address)
        return original(self, client_socket, address)

    monkeypatch.setattr(httpmod._Server, "wrap_socket_and_handle", counting)
    return seen


def tracker_with(tmp_path: Path, plugins: Plugins, **settings: Any) -> Iterator[Tracker]:
    """A started tracker (after ``accepted`` is in place: the server binds its handler)."""
    t = Tracker(tmp_path / "tracker", "127.0.0.1:0", plugins, TrackerSettings(**settings))
    t.start()
    yield t
    t.stop()


@pytest.fixture
def tracker(tmp_path: Path, plugins: Plugins, accepted: list[Any]) -> Iterator[Tracker]:
    yield from tracker_with(tmp_path, plugins, min_interval=0)


def join(client: TrackerClient) -> None:
    client.announce(address=f"{loopback_host()}:6881", torrents=(), relayed=0)


def test_the_circuit_request_after_the_join_reuses_its_connection(
    tracker: Tracker, accepted: list[Any]
) -> None:
    client = TrackerClient(tracker.url, tracker.fingerprint, PeerIdentity.generate())
    join(client)
    assert client.request_circuits(INFOHASH, 2) == []  # no such torrent: nothing planned
    join(client)
    assert len(accepted) == 1 and client.connections_opened == 1
    client.close()
    join(client)  # closed: a new one
    assert len(accepted) == 2 and client.connections_opened == 2
    client.close()


def test_a_connection_the_tracker_closed_while_idle_is_replaced(
    tmp_path: Path, plugins: Plugins, accepted: list[Any], monkeypatch: Any
) -> None:
    """The tracker drops idle connections after ``keepalive_idle``; a client that still
    holds one sends into it once, then on a new connection, and the caller never knows."""
    monkeypatch.setattr(clientmod, "KEEPALIVE_REUSE", 60.0)
    for t in tracker_with(tmp_path, plugins, keepalive_idle=0.2, min_interval=0):
        client = TrackerClient(t.url, t.fingerprint, PeerIdentity.generate())
        join(client)
        gevent.sleep(1.0)  # the tracker cuts it meanwhile
        join(client)  # no TrackerError
        assert len(accepted) == 2 and client.connections_opened == 2
        client.close()


def test_an_idle_connection_is_not_reused_past_its_time(
    tracker: Tracker, accepted: list[Any], monkeypatch: Any
) -> None:
    monkeypatch.setattr(clientmod, "KEEPALIVE_REUSE", 0.1)
    client = TrackerClient(tracker.url, tracker.fingerprint, PeerIdentity.generate())
    join(client)
    # The client lets it go (the tracker would keep it 15 s): peers that share an
    # address do not sit on its connections.
    server = tracker.front._server
    assert server is not None
    with gevent.Timeout(5, AssertionError("the idle connection was not closed")):
        while server.per_ip:
            gevent.sleep(0.02)
    join(client)
    assert len(accepted) == 2 and client.connections_opened == 2
    client.close()


def test_a_peer_opens_its_first_connection_while_it_starts(
    tracker: Tracker, accepted: list[Any], tmp_path: Path, plugins: Plugins
) -> None:
    """The connection is up before the first announce is sent, which then rides it."""
    settings = Settings(listen=f"{loopback_host()}:0", state_dir=tmp_path / "peer")
    peer = Peer(plugins, settings, tracker_url=tracker.url, fingerprint=tracker.fingerprint)
    try:
        with gevent.Timeout(10, AssertionError("no connection ahead of the announce")):
            while not accepted:
                gevent.sleep(0.01)
        peer.start()  # the join
        assert len(accepted) == 1 and peer.tracker.connections_opened == 1
    finally:
        peer.stop()
