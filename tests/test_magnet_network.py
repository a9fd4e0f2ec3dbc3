"""A magnet's metadata over real circuits: a real tracker and in-process peers on
loopback (TLS links, onion-routed circuits). A hostile source that sends bad
metadata is dropped with one line, never planned again, and another source
tried; the metadata of the good one is checked, and the download then completes
intact; `anomos get` takes a magnet as a real process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import gevent
import pytest
from test_session import make_torrent

from anomos.peer.download import MetadataFetch
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.testing import loopback_host, tracker_and_peers
from anomos.torrent import wire
from anomos.torrent.magnet import Magnet
from anomos.torrent.metainfo import Metainfo, make_metainfo
from anomos.torrent.session import PeerConnection, TorrentSession
from anomos.tracker.client import CircuitPlan

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    with gevent.Timeout(timeout, AssertionError(f"{what}: not within {timeout:g} s")):
        while not predicate():
            gevent.sleep(0.05)


def lie_about_the_metadata(session: TorrentSession) -> list[int]:
    """Make ``session`` answer metadata requests with a corrupted copy; the pieces it sent."""
    sent: list[int] = []
    info = bytearray(session.metainfo.info_bytes)
    info[-2] ^= 0xFF

    def answer(conn: PeerConnection, piece: int) -> None:
        sent.append(piece)
        start = piece * wire.METADATA_PIECE_SIZE
        data = bytes(info[start : start + wire.METADATA_PIECE_SIZE])
        conn.send(wire.MetadataPiece(piece, len(info), data).encode())

    session._on_metadata_request = answer  # type: ignore[method-assign]
    return sent


def record_circuit_requests(peer: Peer) -> list[tuple[tuple[bytes, ...], int]]:
    """Wrap ``peer``'s circuit requests: (the source tags it asked to avoid, the circuits
    planned) of each one answered."""
    answered: list[tuple[tuple[bytes, ...], int]] = []
    real = peer.tracker.request_circuits

    def request_circuits(infohash: bytes, count: int, *avoid: Sequence[bytes]) -> list[CircuitPlan]:
        plans = real(infohash, count, *avoid)  # (as called: a caller may pass no avoid)
        answered.append((tuple(avoid[0]) if avoid else (), len(plans)))
        return plans

    peer.tracker.request_circuits = request_circuits  # type: ignore[method-assign]
    return answered


def test_bad_metadata_drops_the_source_and_a_good_one_brings_the_download(
    tmp_path: Path, plugins: Plugins, caplog: pytest.LogCaptureFixture
) -> None:
    with tracker_and_peers(plugins, tmp_path, 6, min_neighbours=3) as (tracker, peers):
        honest, bad, leech = peers[:3]
        caplog.set_level(logging.INFO, logger="anomos.peer.download")
        plain, content = make_torrent(tmp_path / "honest")
        m = Metainfo.from_info(plain.info_bytes, (tracker.url,), tracker.fingerprint)
        make_torrent(tmp_path / "bad")
        lies = lie_about_the_metadata(bad.add_torrent(m, tmp_path / "bad"))
        bad.announce()
        magnet = Magnet.parse(str(Magnet.from_metainfo(m)))
        fetch = MetadataFetch(leech, magnet, timeout=90)
        fetching = gevent.spawn(fetch.run)
        # The liar alone first: it certainly gets asked, and is dropped.
        wait_until(lambda: fetch.dropped >= 1 and lies, 60, "the lying source dropped")
        # ... and never planned again: the tracker, asked to avoid it, plans nothing.
        told, asked = len(lies), record_circuit_requests(leech)
        wait_until(lambda: len(asked) >= 3, 30, "three more circuit requests")
        assert len(lies) == told and fetch.dropped == 1, (lies, asked)
        assert all(len(avoid) == 1 and planned == 0 for avoid, planned in asked), asked
        honest.add_torrent(m, tmp_path / "honest")
        honest.announce()
        fetched = fetching.get(timeout=90)
        assert fetched == m and fetched.trackers == (tracker.url,)
        dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert dropped and all("does not match the infohash" in line for line in dropped), dropped
        # Then it runs as today: the download completes, every file intact.
        session = leech.add_torrent(fetched, tmp_path / "leech")
        report = leech.download(session, sources=2, stall_limit=60)
        assert report.size == m.total_length
        for rel, data in content.items():
            assert (tmp_path / "leech" / "share" / rel).read_bytes() == data, rel


def test_anomos_get_downloads_from_a_magnet(tmp_path: Path, plugins: Plugins) -> None:
    """`anomos get MAGNET` (a real process) against in-process relays and a seeder."""
    with tracker_and_peers(plugins, tmp_path, 4, min_neighbours=2) as (tracker, peers):
        data = tmp_path / "share" / "song.ogg"
        data.parent.mkdir()
        data.write_bytes(os.urandom(700_001))
        m = make_metainfo(
            data, trackers=[tracker.url], fingerprint=tracker.fingerprint, progress=False
        )
        peers[0].add_torrent(m, data.parent)
        peers[0].announce()
        env = dict(os.environ, ANOMOS_PROGRESS="0")
        args = ["--dest", str(tmp_path / "got"), "--state", str(tmp_path / "getter")]
        args += ["--listen", f"{loopback_host()}:0", "--stall-limit", "90"]
        done = subprocess.run(
            [sys.executable, "-m", "anomos", "get", str(Magnet.from_metainfo(m)), *args],
            capture_output=True,
            text=True,
            timeout=150,
            env=env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"metadata of song.ogg ({m.infohash_hex}) received" in done.stderr
        assert (tmp_path / "got" / "song.ogg").read_bytes() == data.read_bytes()
