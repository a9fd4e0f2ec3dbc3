"""Restarts: a killed downloader resumes, a killed tracker comes back with everything.

Real processes of a :class:`anomos.localnet.LocalNetwork`, killed with SIGKILL
(a crash, a power cut of one process) and started again on the same state.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from test_churn import identity_of, sha256, throttled

from anomos.config import Settings
from anomos.errors import TrackerError
from anomos.identity import PeerIdentity
from anomos.localnet import LocalNetwork
from anomos.peer import node as nodemod
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.testing import free_port, loopback_host
from anomos.torrent.metainfo import make_metainfo
from anomos.tracker.client import TrackerClient
from anomos.tracker.identity import TrackerTrustError
from anomos.tracker.server import FLUSH_INTERVAL, Tracker

FILE_SIZE = 24 * 1024 * 1024 + 4321


def make_share(tmp_path: Path, size: int = FILE_SIZE) -> Path:
    data = tmp_path / "share" / "file.bin"
    data.parent.mkdir(parents=True)
    data.write_bytes(os.urandom(size))
    return data


def make_torrent(net: LocalNetwork, data: Path, tmp_path: Path) -> tuple[Path, Any]:
    meta = make_metainfo(
        data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
    )
    path = tmp_path / "file.atorrent"
    meta.save(path)
    return path, meta


# ----------------------------------------------------------------------------- in-process


def test_a_peer_keeps_trying_a_tracker_that_is_down(
    tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodemod, "RETRY_MIN", 0.2)
    host = loopback_host()
    port = free_port(host)
    first = Tracker(tmp_path / "tracker", f"{host}:{port}", plugins)  # made, never started
    url, fingerprint = first.url, first.fingerprint
    first.stop()
    settings = Settings(listen=f"{loopback_host()}:0", state_dir=tmp_path / "peer")
    peer = Peer(plugins, settings, tracker_url=url, fingerprint=fingerprint)
    peer.start()  # the tracker is down: no error, it keeps trying
    try:
        gevent.sleep(1.0)
        assert not peer._announced
        tracker = Tracker(tmp_path / "tracker", f"{host}:{port}", plugins)
        tracker.start()
        try:
            with gevent.Timeout(10, AssertionError("never announced")):
                while peer.identity.identity_public not in tracker.peers:
                    gevent.sleep(0.05)
        finally:
            peer.stop()
            tracker.stop()
    finally:
        peer.stop()


def test_a_tracker_with_the_wrong_identity_is_fatal(tmp_path: Path, plugins: Plugins) -> None:
    tracker = Tracker(tmp_path / "tracker", f"{loopback_host()}:0", plugins)
    tracker.start()
    try:
        settings = Settings(listen=f"{loopback_host()}:0", state_dir=tmp_path / "peer")
        peer = Peer(plugins, settings, tracker_url=tracker.url, fingerprint="ab" * 32)
        with pytest.raises(TrackerTrustError, match="tracker identity mismatch"):
            peer.start()
        assert not tracker.peers
    finally:
        tracker.stop()


# ----------------------------------------------------------------------------- processes


def bytes_on_disk(path: Path, original: bytes, piece_length: int, good: set[int]) -> int:
    """Bytes of ``original`` that ``path`` holds in whole, correct pieces.

    ``good`` keeps the pieces found so far between calls (they are not read again).
    """
    try:
        with open(path, "rb") as f:
            for begin in range(0, len(original), piece_length):
                index = begin // piece_length
                if index not in good:
                    f.seek(begin)
                    if f.read(piece_length) == original[begin : begin + piece_length]:
                        good.add(index)
    except FileNotFoundError:
        return 0
    return sum(len(original[i * piece_length : (i + 1) * piece_length]) for i in good)


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_download_resumes_with_only_the_missing_pieces(tmp_path: Path) -> None:
    data = make_share(tmp_path)
    with LocalNetwork(tmp_path / "net", verbose=1) as net:
        net.start_tracker()
        atorrent, meta = make_torrent(net, data, tmp_path)
        for i in range(3):
            net.start_peer(f"relay{i}", "relay")
        seeder = net.start_peer("seeder", "seed", str(atorrent), "--data", str(data))
        time.sleep(2.5)
        dest = tmp_path / "dest"
        args = ["get", str(atorrent), "--dest", str(dest), "--timeout", "60", "--sources", "1"]
        first = net.start_peer("downloader", *args, wait=False)
        original, good = data.read_bytes(), set[int]()
        with throttled(seeder):
            # Killed once 40 % of the file is on disk in whole, correct pieces (what a
            # restart can keep), not at 40 % of the bytes received: megabytes of those
            # are still in socket buffers and circuits.
            deadline = time.monotonic() + 50
            on_disk = 0
            while first.alive() and time.monotonic() < deadline:
                on_disk = bytes_on_disk(dest / data.name, original, meta.piece_length, good)
                if on_disk >= FILE_SIZE * 0.4:
                    break
                time.sleep(0.1)
            assert first.alive(), "finished before it could be killed: " + first.log_tail()
            assert on_disk >= FILE_SIZE * 0.4, (
                f"only {on_disk} of {FILE_SIZE} bytes on disk after 50 s: " + first.log_tail()
            )
            first.kill()
        identity = identity_of(first)

        summary = tmp_path / "summary.json"
        second = net.start_peer("downloader", *args, "--summary", str(summary), wait=False)
        assert second.popen.wait(60) == 0, second.log_tail()
        assert sha256(dest / data.name) == sha256(data)
        assert identity_of(second) == identity  # the same peer, from its state directory
        report = json.loads(summary.read_text())
        # Progress survived the crash: the second run started with part of the file
        # and fetched only what was missing (at most a piece or two again, for
        # pieces the crash left half-written).
        assert 0 < report["left_at_start"] < FILE_SIZE * 0.8, report
        assert report["downloaded"] <= report["left_at_start"] + 2 * meta.piece_length, report
        assert sum(c["received"] for c in report["circuits"]) < FILE_SIZE, report
        pieces = re.findall(r"(\d+) of (\d+) pieces on disk", second.log_path.read_text())
        have, total = map(int, pieces[-1])
        assert 0 < have < total


def stats(url: str) -> dict[str, int]:
    """The tracker's /stats, fetched with the pin checked."""
    import http.client

    from anomos.tracker.identity import pinned_context

    netloc = url.split("/")[2]
    host, port = netloc.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=pinned_context(), timeout=10)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def poll_stats(
    url: str, wanted: Callable[[dict[str, int]], bool], timeout: float
) -> dict[str, int]:
    """The tracker's /stats once ``wanted`` holds; the last ones on timeout (for the message)."""
    deadline = time.monotonic() + timeout
    while not wanted(current := stats(url)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert wanted(current), current
    return current


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_tracker_comes_back_with_everything(tmp_path: Path) -> None:
    data = make_share(tmp_path, 8 * 1024 * 1024 + 99)
    with LocalNetwork(tmp_path / "net", verbose=1) as net:
        tracker = net.start_tracker("--interval", "3")
        fingerprint, url = net.fingerprint, net.tracker_url
        atorrent, _ = make_torrent(net, data, tmp_path)
        relays = [net.start_peer(f"relay{i}", "relay") for i in range(4)]
        net.start_peer("seeder", "seed", str(atorrent), "--data", str(data))
        time.sleep(2.5)
        # A first download, so that the tracker has ratio accounting to lose.
        a = net.start_peer("a", "get", str(atorrent), "--dest", str(tmp_path / "a"), wait=False)
        assert a.popen.wait(60) == 0, a.log_tail()
        # The 4 relays and the seeder, once a's stop announce has landed.
        before = poll_stats(url, lambda s: s["peers"] == 5, 10)
        time.sleep(2 * FLUSH_INTERVAL)  # a's accounting written to the database

        tracker.kill()
        # A download starts while the tracker is down: it keeps trying.
        dest = tmp_path / "b"
        b = net.start_peer("b", "get", str(atorrent), "--dest", str(dest), "--timeout", "60")
        # A relay's next announce (every 3 s, retried sooner) fails.
        deadline = time.monotonic() + 15
        waiting = "waiting for the tracker since"
        while time.monotonic() < deadline:
            if waiting in b.log_path.read_text() and waiting in relays[0].log_path.read_text():
                break
            time.sleep(0.2)
        assert b.alive(), b.log_tail()
        assert waiting in b.log_path.read_text(), b.log_tail()
        assert waiting in relays[0].log_path.read_text(), relays[0].log_tail()

        net.restart_tracker()
        assert (net.fingerprint, net.tracker_url) == (fingerprint, url)
        assert b.popen.wait(60) == 0, b.log_tail()
        assert sha256(dest / data.name) == sha256(data)
        # One line when the tracker went away and one when it came back, not one per try.
        b_log = b.log_path.read_text()
        assert b_log.count(waiting) == 2 and b_log.count(": over after") == 1, b_log[-3000:]

        after = stats(url)
        # Nothing was lost: peers, the accounting, the counters; and everyone came back.
        assert after["announces"] > before["announces"]
        assert after["peers"] >= before["peers"]
        client = TrackerClient(url, fingerprint, PeerIdentity.load_or_create(a.state_dir))
        reply = client.announce(f"{a.host}:1", [], 0, stopped=True)
        # Every byte of the file was counted (endgame may fetch a few blocks twice).
        size = data.stat().st_size
        assert size <= reply.downloaded <= size * 1.1
        with pytest.raises(TrackerError, match="identity mismatch"):
            TrackerClient(url, "cd" * 32, PeerIdentity.generate()).announce(f"{a.host}:1", [], 0)
