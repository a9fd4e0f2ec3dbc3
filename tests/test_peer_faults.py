"""Faulty and hostile peers (issue 12): a seeder whose data went bad under it, a
downloader that reports pieces bad to make a seeder re-hash, a tracker that is
down or busy, a download stopped by a signal.

Sessions talk over real loopback TCP; the downloads run real in-process peers
against a real tracker; the signal tests run real ``anomos get`` processes.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gevent
import pytest
from test_session import PIECE, connect, make_torrent, new_session, tcp_pair

from anomos.config import Settings
from anomos.errors import StorageError
from anomos.localnet import LocalNetwork
from anomos.peer import download as download_mod
from anomos.peer import node as nodemod
from anomos.peer.download import DownloadStalled
from anomos.peer.node import Peer
from anomos.pluginmanager import Plugins
from anomos.testing import free_port, loopback_host, tracker_and_peers
from anomos.torrent import session as session_mod
from anomos.torrent import wire
from anomos.torrent.metainfo import Metainfo, make_metainfo
from anomos.torrent.session import MAX_STRIKES, TorrentSession
from anomos.tracker.client import CircuitPlan, TrackerBusy
from anomos.tracker.server import Tracker

#: Bytes of movie.bin zeroed under the seeder (two 64 KiB pieces at most).
ZEROED = (200_000, 100_000)


def bad_pieces(m: Metainfo) -> set[int]:
    """The pieces ZEROED falls in."""
    (movie,) = [f for f in m.files if f.path[-1] == "movie.bin"]
    start, length = movie.offset + ZEROED[0], ZEROED[1]
    return set(range(start // m.piece_length, (start + length - 1) // m.piece_length + 1))


@pytest.fixture
def sessions() -> Iterator[list[TorrentSession]]:
    made: list[TorrentSession] = []
    yield made
    for s in made:
        s.close()


def wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    with gevent.Timeout(timeout, AssertionError(f"{what}: not within {timeout:g} s")):
        while not predicate():
            gevent.sleep(0.02)


def zero(path: Path, offset: int, length: int) -> None:
    """Overwrite part of a file in place, as a disk fault or an editor would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def seeder_gone_bad(
    tmp_path: Path, sessions: list[TorrentSession], m: Metainfo, name: str = "seed"
) -> TorrentSession:
    """A seeder that verified its data, whose first file then lost ZEROED."""
    seeder = new_session(sessions, m, tmp_path / name, label=name, resume_dir=tmp_path / "resume")
    assert seeder.complete
    zero(tmp_path / name / "share" / "movie.bin", *ZEROED)
    return seeder


def pieces_of(session: TorrentSession) -> set[int]:
    return {i for i in range(len(session.metainfo.pieces)) if session.has_piece(i)}


# ----------------------------------------------------------------------------- sessions


def test_a_seeder_gone_bad_serves_every_good_piece_and_withdraws_the_bad_ones(
    tmp_path: Path, sessions: list[TorrentSession], caplog: pytest.LogCaptureFixture
) -> None:
    m, content = make_torrent(tmp_path / "seed")
    n, bad = len(m.pieces), bad_pieces(m)
    assert len(bad) == 2
    seeder = seeder_gone_bad(tmp_path, sessions, m)
    leech = new_session(sessions, m, tmp_path / "leech", label="leech")
    caplog.set_level(logging.INFO, logger="anomos.torrent.session")
    _, conn = connect(seeder, leech, "leech", "seeder")
    # Every good piece arrives from the only source; the bad ones, once each.
    wait_until(lambda: pieces_of(leech) == set(range(n)) - bad, 30, "every good piece")
    wait_until(lambda: seeder.lost_pieces == bad, 10, "the seeder withdrew the bad pieces")
    assert leech.failed_pieces == bad
    assert leech.hash_failures == len(bad)  # never asked for a bad piece twice
    assert not conn.closed and conn.strikes == len(bad)  # kept: it had good pieces too
    assert conn.good_pieces == n - len(bad)
    # The seeder said so, one line per piece, and stopped offering them.
    lines = [r.getMessage() for r in caplog.records if "corrupt on disk" in r.getMessage()]
    assert sorted(lines) == [
        f"seed: piece {i} is corrupt on disk (a downloader's hash check failed): no longer offered"
        for i in sorted(bad)
    ]
    assert not seeder.complete and seeder.left == sum(m.piece_size(i) for i in bad)
    assert seeder.storage.missing == bad
    assert not leech.picker.interesting(conn)  # it offers nothing more we lack
    # Its resume data no longer claims them: a restart does not serve them again.
    seeder.close()
    again = new_session(sessions, m, tmp_path / "seed", resume_dir=tmp_path / "resume")
    assert set(range(n)) - pieces_of(again) == bad
    assert again.rechecked == 0
    good = content["movie.bin"]
    got = (tmp_path / "leech" / "share" / "movie.bin").read_bytes()
    assert got[: ZEROED[0] - PIECE] == good[: ZEROED[0] - PIECE]
    assert got[sum(ZEROED) + PIECE :] == good[sum(ZEROED) + PIECE :]


def test_a_seeder_gone_bad_beside_an_honest_one_the_download_is_intact(
    tmp_path: Path, sessions: list[TorrentSession]
) -> None:
    m, content = make_torrent(tmp_path / "seed")
    make_torrent(tmp_path / "honest")
    bad = seeder_gone_bad(tmp_path, sessions, m)
    honest = new_session(sessions, m, tmp_path / "honest", label="honest")
    leech = new_session(sessions, m, tmp_path / "leech", label="leech")
    _, bad_conn = connect(bad, leech, "leech", "bad")
    wait_until(lambda: leech.failed_pieces, 30, "a bad piece from the bad seeder")
    _, honest_conn = connect(honest, leech, "leech", "honest")
    assert leech.wait_complete(timeout=30)
    for rel, data in content.items():
        assert (tmp_path / "leech" / "share" / rel).read_bytes() == data, rel
    assert honest_conn.strikes == 0
    assert 1 <= bad_conn.strikes <= len(bad_pieces(m))
    assert bad.lost_pieces <= bad_pieces(m) and bad.lost_pieces


def test_bad_piece_reports_rehash_only_served_pieces_at_a_bounded_rate(
    tmp_path: Path, sessions: list[TorrentSession], caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile downloader reports every piece bad, over and over: the seeder hashes
    again only pieces it sent over that connection, at most RECHECK_BURST of them at
    once, and keeps serving."""
    m, _ = make_torrent(tmp_path / "seed")
    seeder = new_session(sessions, m, tmp_path / "seed", label="seed")
    caplog.set_level(logging.INFO, logger="anomos.torrent.session")
    at_start = seeder.storage.checks
    # Served nothing: its reports are ignored.
    ours, other = tcp_pair()
    seeder.add_connection(ours, "served nothing")
    other.sendall(
        wire.Handshake(m.infohash, wire.new_peer_id()).encode()
        + b"".join(wire.BadPiece(i).encode() for i in range(len(m.pieces)))
        + wire.Interested().encode()
    )
    wait_until(lambda: seeder.connections[0].peer_interested, 10, "its interest")
    assert seeder.storage.checks == at_start
    ours, theirs = tcp_pair()
    seeder.add_connection(ours, "hostile")
    theirs.sendall(
        wire.Handshake(m.infohash, wire.new_peer_id()).encode() + wire.Interested().encode()
    )
    reader = wire.MessageReader(len(m.pieces), m.piece_size)
    got: list[object] = []

    def read_until(kind: type, count: int = 1) -> None:
        with gevent.Timeout(10, AssertionError(f"no {kind.__name__}: {got[-5:]}")):
            while sum(isinstance(x, kind) for x in got) < count:
                data = theirs.recv(1 << 16)
                assert data, f"the seeder closed the connection: {got[-5:]}"
                got.extend(reader.feed(data))

    read_until(wire.Unchoke)
    served = list(range(6))
    theirs.sendall(
        b"".join(wire.Request(i, 0, min(wire.BLOCK_SIZE, m.piece_size(i))).encode() for i in served)
    )
    read_until(wire.Piece, len(served))
    before = seeder.storage.checks
    reports = [wire.BadPiece(i).encode() for i in range(len(m.pieces))] * 20
    theirs.sendall(b"".join(reports) + wire.Request(7, 0, wire.BLOCK_SIZE).encode())
    read_until(wire.Piece, len(served) + 1)  # still served after all that
    assert seeder.storage.checks - before == session_mod.RECHECK_BURST
    assert seeder.complete and not seeder.lost_pieces  # its data is intact
    intact = [r for r in caplog.records if "but it is intact here" in r.getMessage()]
    assert len(intact) == session_mod.RECHECK_BURST
    theirs.close()
    other.close()


def test_a_piece_that_cannot_be_written_pauses_requests_and_keeps_the_source(
    tmp_path: Path, sessions: list[TorrentSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing at run time (a full disk) is a state retried later, not a reason
    to drop the source it came from."""
    monkeypatch.setattr(session_mod, "WRITE_RETRY", 0.5)
    monkeypatch.setattr(session_mod, "MAINTENANCE_INTERVAL", 0.2)
    m, content = make_torrent(tmp_path / "seed")
    seeder = new_session(sessions, m, tmp_path / "seed", label="seed")
    leech = new_session(sessions, m, tmp_path / "leech", label="leech")
    real = leech.storage.write_piece
    full = [True]

    def no_space(index: int, data: bytes) -> bool:
        if full[0]:
            raise StorageError(f"cannot write piece {index}: No space left on device")
        return real(index, data)

    leech.storage.write_piece = no_space  # type: ignore[method-assign]
    _, conn = connect(seeder, leech, "leech", "seed")
    wait_until(lambda: leech.write_error, 10, "the write error")
    assert "No space left on device" in (leech.write_error or "")
    gevent.sleep(1.0)
    assert not conn.closed and leech.left == m.total_length
    full[0] = False
    assert leech.wait_complete(timeout=30)
    assert leech.write_error is None
    for rel, data in content.items():
        assert (tmp_path / "leech" / "share" / rel).read_bytes() == data, rel


# ----------------------------------------------------------------------------- processes


def share(tmp_path: Path, size: int) -> Path:
    data = tmp_path / "share" / "file.bin"
    data.parent.mkdir(parents=True)
    data.write_bytes(os.urandom(size))
    return data


def start_network(net: LocalNetwork, data: Path, tmp_path: Path, *seed_args: str) -> Path:
    """A tracker, three relays and a seeder of ``data``; the .atorrent's path."""
    net.start_tracker()
    meta = make_metainfo(
        data, trackers=[net.tracker_url], fingerprint=net.fingerprint, piece_length=PIECE_LEN,
        progress=False,
    )  # fmt: skip
    atorrent = tmp_path / "file.atorrent"
    meta.save(atorrent)
    for i in range(3):
        net.start_peer(f"relay{i}", "relay")
    net.start_peer("seeder", "seed", str(atorrent), "--data", str(data), *seed_args)
    return atorrent


PIECE_LEN = 256 * 1024


@pytest.mark.slow
@pytest.mark.integration
def test_get_from_a_seeder_gone_bad_gets_every_good_piece_and_names_the_bad_ones(
    tmp_path: Path,
) -> None:
    size = 6 * 1024 * 1024 + 1234
    data = share(tmp_path, size)
    original = data.read_bytes()
    zeroed = (2 * 1024 * 1024 + 100, 300_000)  # pieces 8 and 9 (of 25)
    bad = {8, 9}
    with LocalNetwork(tmp_path / "net", verbose=1) as net:
        atorrent = start_network(net, data, tmp_path)
        zero(data, *zeroed)  # under the running seeder, after it verified its data
        dest = tmp_path / "dest"
        getter = net.start_peer(
            "downloader", "get", str(atorrent), "--dest", str(dest), "--stall-limit", "15",
            wait=False,
        )  # fmt: skip
        assert getter.popen.wait(150) == 1, getter.log_tail()
        log = getter.log_path.read_text()
        seeder_log = (tmp_path / "net" / "seeder.log").read_text()
    # Every good piece arrived ...
    got = (dest / "file.bin").read_bytes()
    for i in range(-(-size // PIECE_LEN)):
        if i not in bad:
            assert (
                got[i * PIECE_LEN : (i + 1) * PIECE_LEN]
                == original[i * PIECE_LEN : (i + 1) * PIECE_LEN]
            ), f"piece {i}"
    # ... the bad ones are named in one line, and the seeder said it stopped offering them.
    (line,) = [x for x in log.splitlines() if "gave up" in x]
    assert re.fullmatch(
        r"anomos: error: gave up: no piece for 15 s: 2 piece\(s\) failed their hash check "
        r"and no source offers a good copy: 8, 9 \(23/25 pieces kept in .*\)",
        line,
    ), line
    assert "Traceback" not in log
    for i in bad:
        assert f"piece {i} is corrupt on disk" in seeder_log, seeder_log[-3000:]
    # It never asked the tracker faster than the tracker allows.
    assert "too many requests" not in log


def resumed_pieces(state: Path) -> int:
    (resume,) = (state / "resume").glob("*.json")
    saved = json.loads(resume.read_text())
    return sum(bin(b).count("1") for b in bytes.fromhex(saved["have"]))


@pytest.mark.slow
@pytest.mark.integration
def test_get_stopped_by_sigint_or_sigterm_keeps_its_pieces_and_resumes_without_rehashing(
    tmp_path: Path,
) -> None:
    size = 6 * 1024 * 1024 + 99
    data = share(tmp_path, size)
    pieces = -(-size // PIECE_LEN)
    with LocalNetwork(tmp_path / "net", verbose=1) as net:
        # A slow seeder (200 kB/s: 30 s for the file; resume data is saved every 5 s):
        # each run is still under way when it is stopped.
        atorrent = start_network(net, data, tmp_path, "--max-send-rate", "200k")
        dest, summary = tmp_path / "dest", tmp_path / "summary.json"
        args = ["get", str(atorrent), "--dest", str(dest)]
        kept = 0
        for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            getter = net.start_peer("downloader", *args, wait=False)
            log_at = getter.log_path.stat().st_size
            # Stopped once the periodic resume data holds more than it did.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and getter.alive():
                state = tmp_path / "net" / "downloader"
                if list((state / "resume").glob("*.json")) and resumed_pieces(state) > kept:
                    break
                time.sleep(0.1)
            assert getter.alive(), getter.log_tail()
            getter.popen.send_signal(sig)
            assert getter.popen.wait(30) == status, getter.log_tail()
            log = getter.log_path.read_text()[log_at:]
            assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
            (line,) = [x for x in log.splitlines() if x.startswith("stopped")]
            match = re.fullmatch(rf"stopped by {sig.name}: (\d+)/{pieces} pieces kept in .*", line)
            assert match, line
            assert kept < int(match[1]) == resumed_pieces(tmp_path / "net" / "downloader")
            kept = int(match[1])
        # A third run starts from those pieces without hashing them again.
        getter = net.start_peer("downloader", *args, "--summary", str(summary), wait=False)
        log_at = getter.log_path.stat().st_size
        assert getter.popen.wait(90) == 0, getter.log_tail()
        log = getter.log_path.read_text()[log_at:]
    assert (dest / "file.bin").read_bytes() == data.read_bytes()
    assert re.search(rf"{kept} of {pieces} pieces on disk \(0 re-hashed\)", log), log[-3000:]
    report = json.loads(summary.read_text())
    assert size - kept * PIECE_LEN <= report["left_at_start"] < size - (kept - 1) * PIECE_LEN


# ----------------------------------------------------------------------------- the tracker


def small_torrent(tmp_path: Path, url: str) -> Metainfo:
    data = tmp_path / "share" / "small.bin"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(os.urandom(300_000))
    return make_metainfo(data, trackers=[url], piece_length=PIECE, progress=False)


def record_circuit_requests(peer: Peer) -> list[tuple[float, BaseException | None]]:
    """Wrap the peer's circuit requests: (monotonic time, the error raised or None)."""
    calls: list[tuple[float, BaseException | None]] = []
    real = peer.tracker.request_circuits

    def request_circuits(
        infohash: bytes, count: int, avoid: Sequence[bytes] = ()
    ) -> list[CircuitPlan]:
        at = time.monotonic()
        try:
            plans = real(infohash, count, avoid)
        except BaseException as exc:
            calls.append((at, exc))
            raise
        calls.append((at, None))
        return plans

    peer.tracker.request_circuits = request_circuits  # type: ignore[method-assign]
    return calls


def test_a_down_tracker_is_one_waiting_line_retried_then_a_clear_give_up(
    tmp_path: Path,
    plugins: Plugins,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(nodemod, "RETRY_MIN", 0.05)
    monkeypatch.setattr(download_mod, "TRACKER_RETRY_MIN", 0.05)
    monkeypatch.setattr(download_mod, "TRACKER_RETRY_MAX", 0.2)
    host = loopback_host()
    made = Tracker(tmp_path / "tracker", f"{host}:{free_port(host)}", plugins)  # never started
    url, fingerprint = made.url, made.fingerprint
    made.stop()
    settings = Settings(listen=f"{loopback_host()}:0", state_dir=tmp_path / "peer")
    peer = Peer(plugins, settings, tracker_url=url, fingerprint=fingerprint)
    caplog.set_level(logging.INFO)
    peer.start()
    try:
        session = peer.add_torrent(small_torrent(tmp_path, url), tmp_path / "dest")
        calls = record_circuit_requests(peer)
        with pytest.raises(
            DownloadStalled,
            match=r"^no piece for 3 s: waiting for the tracker since \d\d:\d\d:\d\d "
            r"\(cannot reach the tracker: .*\)$",
        ):
            peer.download(session, stall_limit=3)
    finally:
        peer.stop()
    assert len(calls) >= 5 and all(exc is not None for _, exc in calls)  # it kept trying
    waiting = [
        r.getMessage() for r in caplog.records if "waiting for the tracker" in r.getMessage()
    ]
    # ... and said so once (announces and circuit requests alike), not once per try.
    assert len(waiting) == 1, waiting


def test_a_busy_tracker_is_not_asked_again_before_its_retry_after(
    tmp_path: Path, plugins: Plugins
) -> None:
    limited = tracker_and_peers(plugins, tmp_path, 1, announce=False, rate=0.5, burst=2)
    with limited as (tracker, [peer]):
        # Nobody seeds it: the tracker plans nothing, and the downloader keeps asking.
        session = peer.add_torrent(small_torrent(tmp_path, tracker.url), tmp_path / "dest")
        calls = record_circuit_requests(peer)
        with pytest.raises(DownloadStalled, match="no source offers the missing pieces"):
            peer.download(session, stall_limit=8)
    busy = [(at, exc) for at, exc in calls if isinstance(exc, TrackerBusy)]
    assert busy, calls  # it was rate-limited ...
    for (at, exc), (later, _) in itertools.pairwise(calls):
        if isinstance(exc, TrackerBusy):  # ... and waited as long as it was told each time
            assert exc.retry_after == 2 and later - at >= exc.retry_after


def honest_seeder_completes(
    honest: Peer,
    m: Metainfo,
    content: dict[str, bytes],
    tmp_path: Path,
    downloading: gevent.Greenlet,
    timeout: float,
) -> None:
    """An honest seeder joins: the download under way completes, every file intact."""
    honest.add_torrent(m, tmp_path / "honest")
    honest.announce()
    report = downloading.get(timeout=timeout)
    for rel, data in content.items():
        assert (tmp_path / "leech" / "share" / rel).read_bytes() == data, rel
    assert report.size == m.total_length


def test_a_peer_downloads_intact_over_circuits_beside_a_seeder_gone_bad(
    tmp_path: Path, plugins: Plugins
) -> None:
    """The bad seeder alone first (so it certainly serves a bad piece), then an honest
    one joins: the download completes intact. (It did before too: a regression guard.)"""
    with tracker_and_peers(plugins, tmp_path, 6, min_neighbours=3) as (_tracker, peers):
        honest, bad, leech = peers[:3]
        m, content = make_torrent(tmp_path / "honest")
        make_torrent(tmp_path / "bad")
        bad_session = bad.add_torrent(m, tmp_path / "bad")
        zero(tmp_path / "bad" / "share" / "movie.bin", *ZEROED)
        bad.announce()
        session = leech.add_torrent(m, tmp_path / "leech")
        downloading = gevent.spawn(leech.download, session, sources=2, stall_limit=60)
        wait_until(lambda: bad_session.lost_pieces, 30, "a bad piece from the bad seeder")
        honest_seeder_completes(honest, m, content, tmp_path, downloading, 60)
        assert session.hash_failures >= 1 and not session.failed_pieces


def test_a_source_dropped_for_corrupt_data_is_not_planned_again(
    tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A liar serves corrupt data and answers every bad-piece report "intact here". Its
    circuit is closed after MAX_STRIKES bad pieces; the downloader then hands the tracker
    its plan's tag in ``avoid``, so the liar is never planned again, and the honest
    seeder that joins later serves the whole file."""
    with tracker_and_peers(plugins, tmp_path, 6, min_neighbours=3) as (_tracker, peers):
        honest, liar, leech = peers[:3]
        m, content = make_torrent(tmp_path / "honest")
        make_torrent(tmp_path / "liar")
        liar_session = liar.add_torrent(m, tmp_path / "liar")
        for rel in content:
            path = tmp_path / "liar" / "share" / rel
            zero(path, 0, path.stat().st_size)
        monkeypatch.setattr(liar_session.storage, "check_piece", lambda index: True)
        connected: list[float] = []
        real_connect = liar_session.connect

        def connect(*args: Any, **kwargs: Any) -> Any:
            connected.append(time.monotonic())
            return real_connect(*args, **kwargs)

        monkeypatch.setattr(liar_session, "connect", connect)
        liar.announce()
        asked: list[tuple[float, int, int]] = []  # (time, sources avoided, circuits planned)
        real = leech.tracker.request_circuits

        def request_circuits(
            infohash: bytes, count: int, avoid: Sequence[bytes] = ()
        ) -> list[CircuitPlan]:
            plans = real(infohash, count, avoid)
            asked.append((time.monotonic(), len(avoid), len(plans)))
            return plans

        leech.tracker.request_circuits = request_circuits  # type: ignore[method-assign]
        session = leech.add_torrent(m, tmp_path / "leech")
        downloading = gevent.spawn(leech.download, session, sources=2, stall_limit=90)
        # Without the avoid, each of these asks would plan the liar again.
        wait_until(lambda: sum(1 for a in asked if a[1]) >= 3, 60, "asks avoiding the liar")
        assert all(planned == 0 for _, avoided, planned in asked if avoided), asked
        first_avoid = min(at for at, avoided, _ in asked if avoided)
        assert connected and max(connected) < first_avoid, (connected, first_avoid)
        assert session.hash_failures >= MAX_STRIKES
        honest_seeder_completes(honest, m, content, tmp_path, downloading, 90)
        assert max(connected) < first_avoid  # never planned again, however long it took


def test_announces_asked_for_by_torrents_wait_for_the_trackers_min_interval(
    tmp_path: Path, plugins: Plugins
) -> None:
    """Torrents added and downloads ending ask for an announce; the peer makes it no
    sooner than the tracker's min_interval after the last one."""
    with tracker_and_peers(plugins, tmp_path, 1, min_interval=2) as (_tracker, [peer]):
        times: list[float] = []
        real = peer.tracker.announce

        def announce(*args: object, **kwargs: object) -> object:
            times.append(time.monotonic())
            return real(*args, **kwargs)  # type: ignore[arg-type]

        peer.tracker.announce = announce  # type: ignore[method-assign]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            peer.announce_soon()
            gevent.sleep(0.1)
    assert len(times) >= 3, times  # it did announce when asked ...
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]  # (the last is the goodbye)
    assert all(gap >= 2 for gap in gaps), gaps  # ... never sooner than min_interval
