"""anomos.testing's network helpers leave nothing running when a peer fails to start:
the peers started before it (and the tracker) are stopped, their sockets closed."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from anomos import hookimpl
from anomos.config import split_address
from anomos.errors import StorageError
from anomos.peer.node import Peer
from anomos.pluginmanager import get_plugins
from anomos.testing import tracker_and_peers
from anomos.tracker.server import Tracker

pytestmark = pytest.mark.integration


class Lifecycle:
    """Records the peers that started and stopped."""

    def __init__(self) -> None:
        self.started: list[Any] = []
        self.stopped: list[Any] = []

    @hookimpl
    def anomos_peer_started(self, peer: Any) -> None:
        self.started.append(peer)

    @hookimpl
    def anomos_peer_stopped(self, peer: Any) -> None:
        self.stopped.append(peer)


def refuses(address: str) -> bool:
    """Whether nothing listens at ``address`` any more."""
    host, port = split_address(address)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def recorded(start: Callable[[Any], None], into: list[Any]) -> Callable[[Any], None]:
    """``start``, noting first in ``into`` what it starts."""

    def recorded_start(self: Any) -> None:
        into.append(self)
        start(self)

    return recorded_start


@pytest.mark.parametrize("fault", ["state dir", "half started"])
def test_a_peer_failing_to_start_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The third of four peers cannot be made (its state directory is a file) or fails
    half-way through its start (listening, its greenlets running): the two before it,
    it, and the tracker are stopped and their ports closed before the error is raised."""
    seen = Lifecycle()
    plugins = get_plugins(load_entrypoints=False, extra=[seen])
    listening: list[Any] = []  # every peer and tracker that began to start
    for cls in (Tracker, Peer):
        monkeypatch.setattr(cls, "start", recorded(cls.start, listening))
    if fault == "state dir":
        (tmp_path / "p2").write_text("not a directory")
        expected: type[Exception] = StorageError
    else:
        write = Peer._write_peer_file

        def fails_for_the_third(peer: Peer) -> None:
            if len(listening) == 4 and peer is listening[3]:
                raise OSError("the third peer's start fails half-way")
            write(peer)

        monkeypatch.setattr(Peer, "_write_peer_file", fails_for_the_third)
        expected = OSError
    with pytest.raises(expected), tracker_and_peers(plugins, tmp_path, 4):
        pytest.fail("the network came up despite the fault")
    tracker, *peers = listening
    assert len(peers) == (2 if fault == "state dir" else 3)
    assert list(map(id, seen.started)) == list(map(id, peers[:2]))
    assert set(map(id, seen.stopped)) == set(map(id, peers))
    for peer in peers:
        assert peer._stopped and refuses(peer.address), peer.address
    assert tracker._closed and refuses(tracker.address)
