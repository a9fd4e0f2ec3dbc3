"""A neighbour that is alive but that a peer can never link to is reported and replaced.

A link that never came up never goes down, so no "lost" report would ever
name it, and the neighbour keeps announcing. Here real peers in one process
dial a fake peer that announces an address nobody listens on: the one that
dials it reports it "unreachable", the tracker replaces the edge, and the
peer ends up linked to every neighbour it is assigned.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_churn import Client, wait_until

from anomos.peer import node as nodemod
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.testing import free_port, start_peers
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings


@pytest.fixture
def tracker(tmp_path: Path, plugins: Plugins) -> Iterator[Tracker]:
    t = Tracker(
        tmp_path / "tracker",
        "127.0.0.1:0",
        plugins,
        TrackerSettings(min_neighbours=2, edge_settle=0),
    )
    t.start()
    yield t
    t.stop()


def test_a_neighbour_nobody_can_reach_is_reported_and_replaced(
    tracker: Tracker, plugins: Plugins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodemod, "LINK_WATCH_INTERVAL", 0.2)
    monkeypatch.setattr(nodemod, "UNREACHABLE_AFTER", 3.0)
    g = tracker.graph
    # The fake joins first, alone, at an address where nothing listens: every
    # real peer that joins after it and is given it as a neighbour dials it.
    dead = Client(tracker)
    dead.address = f"{dead.host}:{free_port(dead.host)}"
    assert dead.announce().neighbours == ()
    peers: list[Peer] = []
    try:
        peers = start_peers(plugins, tracker, tmp_path, 4, announce=False)
        first = peers[0]  # the fake was the only peer to link it to
        me = first.identity.identity_public
        assert dead.pub in g.neighbours(me)
        nb = next(n for n in first.links.neighbours().values() if n.identity == dead.pub)
        assert nb.dial
        # The fake keeps announcing: it is alive as far as the tracker can tell.
        dead.announce()
        wait_until(lambda: dead.pub not in g.neighbours(me), 30, "edge to the dead peer replaced")
        assert dead.pub in tracker.peers and tracker.stats()["dropped"] == 0
        assert g.avoided(me, dead.pub)
        assert g.degree(me) >= g.min_neighbours

        def all_linked() -> bool:
            assigned = first.links.neighbours()
            return dead.pub not in {n.identity for n in assigned.values()} and set(assigned) <= set(
                first.links.links
            )

        wait_until(all_linked, 30, "every assigned neighbour linked")
        assert len(first.links.links) >= g.min_neighbours
    finally:
        for p in peers:
            p.stop()
