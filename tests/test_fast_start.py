"""The start of a download (issue 13, fast start): what it asks for, and in which order.

Only the order of events is asserted here, never how long a step took: the
times are measured by ``anomos bench --wan`` (docs/performance.md).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.event

from anomos.backoff import Waiting
from anomos.peer import download as download_mod
from anomos.peer.download import TorrentDownload
from anomos.tracker.client import CircuitPlan


def plan(n: int) -> CircuitPlan:
    return CircuitPlan(n, b"", (), b"", "x25519", b"")


def test_a_tracker_that_plans_one_circuit_per_request_is_asked_again_at_once(
    monkeypatch: Any,
) -> None:
    """The tracker plans circuits to distinct sources only, so a swarm with one source
    gets one circuit per request: the download asks again at once for the others,
    not one progress tick (DOWNLOAD_TICK) later per circuit."""
    monkeypatch.setattr(download_mod, "DOWNLOAD_TICK", 60.0)  # a tick would fail the test
    asked: list[int] = []

    def request_circuits(infohash: bytes, count: int, avoid: tuple[bytes, ...]) -> list[Any]:
        asked.append(count)
        return [plan(len(asked))]

    peer = SimpleNamespace(
        tracker=SimpleNamespace(request_circuits=request_circuits),
        tracker_wait=Waiting("waiting for the tracker", logging.getLogger("test")),
        startup={},
        links=SimpleNamespace(links={}),
        spawn=gevent.spawn,
        announce_soon=lambda **_: None,
    )
    session = SimpleNamespace(
        complete=False,
        left=1,
        downloaded=0,
        connections=[],
        write_error=None,
        failed_pieces=(),
        first_block_at=None,
        first_piece_at=None,
        metainfo=SimpleNamespace(infohash=b"\1" * 20, total_length=1),
    )
    running = gevent.event.Event()  # the circuits hold their places until the end

    def run_circuit(self: TorrentDownload, plan: CircuitPlan) -> None:
        running.wait()

    monkeypatch.setattr(TorrentDownload, "_run_circuit", run_circuit)
    download = TorrentDownload(peer, session, sources=4)  # type: ignore[arg-type]
    g = gevent.spawn(download.run)
    try:
        with gevent.Timeout(5, AssertionError(f"asked only {asked} within 5 s")):
            while len(asked) < 4:
                gevent.sleep(0.01)
        assert asked == [4, 3, 2, 1]  # each time for the circuits still missing
        gevent.sleep(0.1)
        assert len(asked) == 4  # all four running: nothing more is asked
    finally:
        session.complete = True
        running.set()
        g.kill()
