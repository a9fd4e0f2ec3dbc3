"""Torrent sessions exchanging data over real loopback TCP connections."""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from anomos import hookimpl
from anomos.errors import StorageError
from anomos.pluginmanager import Plugins, get_plugins
from anomos.torrent import flow as flow_mod
from anomos.torrent import session as session_mod
from anomos.torrent import wire
from anomos.torrent.metainfo import Metainfo, make_metainfo
from anomos.torrent.resume import pieces_of_file
from anomos.torrent.session import PeerConnection, TorrentSession

PIECE = 64 * 1024
#: Odd sizes: pieces straddle files, one file is smaller than a block, one is empty.
FILES = {
    "movie.bin": 1_000_003,
    "extras/notes.txt": 777,
    "extras/empty": 0,
    "extras/deep/sample.bin": 333_333,
    "zzz.bin": 65_536 + 1,
}


class Recorder:
    """A plugin that records the torrent lifecycle hooks."""

    def __init__(self) -> None:
        self.verified: list[int] = []
        self.failed: list[tuple[int, str]] = []
        self.completed = 0

    @hookimpl
    def anomos_piece_verified(self, torrent: Any, index: int) -> None:
        self.verified.append(index)

    @hookimpl
    def anomos_piece_failed(self, torrent: Any, index: int, source: str) -> None:
        self.failed.append((index, source))

    @hookimpl
    def anomos_download_complete(self, torrent: Any) -> None:
        self.completed += 1


def make_torrent(root: Path, sizes: dict[str, int] = FILES) -> tuple[Metainfo, dict[str, bytes]]:
    rng = random.Random(7)
    content = {}
    for rel, size in sizes.items():
        path = root / "share" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        content[rel] = rng.randbytes(size)
        path.write_bytes(content[rel])
    m = make_metainfo(
        root / "share", trackers=["https://t.example/announce"], piece_length=PIECE, progress=False
    )
    return m, content


def assert_identical(root: Path, content: dict[str, bytes]) -> None:
    for rel, data in content.items():
        assert (root / "share" / rel).read_bytes() == data, rel


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real loopback TCP connection."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def connect(
    s1: TorrentSession, s2: TorrentSession, l1: str, l2: str
) -> tuple[PeerConnection, PeerConnection]:
    """Connect two sessions (``l1`` is s1's label for s2); their two connection objects."""
    a, b = tcp_pair()
    s1.add_connection(a, l1)
    c1 = s1.connections[-1]
    s2.add_connection(b, l2)
    return c1, s2.connections[-1]


@pytest.fixture
def torrent(tmp_path: Path) -> tuple[Metainfo, dict[str, bytes]]:
    return make_torrent(tmp_path / "seed")


@pytest.fixture
def sessions() -> Iterator[list[TorrentSession]]:
    made: list[TorrentSession] = []
    yield made
    for s in made:
        s.close()


def new_session(
    made: list[TorrentSession],
    m: Metainfo,
    root: Path,
    plugins: Plugins | None = None,
    **kw: Any,
) -> TorrentSession:
    s = TorrentSession(m, root, plugins=plugins or get_plugins(load_entrypoints=False), **kw)
    s.start()
    made.append(s)
    return s


def test_two_sessions_exchange_a_multi_file_torrent(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    m, content = torrent
    rec = Recorder()
    seeder = new_session(sessions, m, tmp_path / "seed", label="seeder")
    progress: list[float] = []
    leech = new_session(
        sessions,
        m,
        tmp_path / "leech",
        plugins=get_plugins(load_entrypoints=False, extra=[rec]),
        on_progress=lambda s: progress.append(s.progress),
    )
    assert seeder.complete and not leech.complete
    assert leech.left == m.total_length and leech.progress == 0.0
    seed_conn, conn = connect(seeder, leech, "leech", "seeder")
    assert conn.label == "seeder" and seed_conn.label == "leech"
    assert leech.wait_complete(timeout=30)
    assert_identical(tmp_path / "leech", content)
    assert (tmp_path / "leech" / "share" / "extras" / "empty").exists()
    assert sorted(rec.verified) == list(range(len(m.pieces)))
    assert rec.completed == 1 and rec.failed == []
    assert progress[-1] == 1.0 and len(progress) == len(m.pieces)
    assert leech.left == 0 and leech.have == seeder.have
    assert leech.downloaded == m.total_length == seeder.uploaded
    assert leech.wasted == 0 and conn.strikes == 0
    # peer ids are random per connection: the ends share none
    assert conn.remote_peer_id == seed_conn.peer_id != conn.peer_id
    # two seeds have nothing to trade: the stream (a circuit, in anomos) is freed
    assert conn.closed and conn.close_reason == "both sides complete"
    assert _wait_for(lambda: seeder.connections == (), 5)


def test_piece_buffers_are_reused_without_mixing_pieces(
    tmp_path: Path, sessions: list[TorrentSession]
) -> None:
    """Finished pieces' buffers gather the next pieces' blocks: a buffer handed on
    while still in use, or before every block was written over it, would mix two
    pieces (hash failures, or a wrong file if the hash were skipped)."""
    m, content = make_torrent(tmp_path / "seed", {"big.bin": 40 * PIECE + 123})
    rec = Recorder()
    leech = new_session(
        sessions, m, tmp_path / "leech", plugins=get_plugins(load_entrypoints=False, extra=[rec])
    )
    made: list[int] = []
    new_buffer = leech._piece_buffer

    def counting(index: int) -> Any:
        spare = len(leech._spare_pieces)
        buf = new_buffer(index)
        made.append(spare)
        return buf

    leech._piece_buffer = counting  # type: ignore[method-assign]
    for name in ("seeder1", "seeder2"):  # pieces from two at once: several partial at a time
        seeder = new_session(sessions, m, tmp_path / "seed", label=name)
        connect(seeder, leech, "leech", name)
    assert leech.wait_complete(timeout=30)
    assert_identical(tmp_path / "leech", content)
    assert rec.failed == [] and leech.hash_failures == 0
    assert len(made) == len(m.pieces)
    assert sum(1 for spare in made if spare) >= len(m.pieces) // 2  # most pieces reuse one


def test_wait_complete_returns_false_on_timeout_and_on_close(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]]
) -> None:
    m, _ = torrent
    leech = TorrentSession(m, tmp_path / "leech", plugins=None)
    leech.start()
    assert leech.wait_complete(timeout=0.05) is False
    waiter = gevent.spawn(leech.wait_complete)
    gevent.sleep(0.05)
    leech.close()
    assert waiter.get(timeout=5) is False


def test_connections_added_during_the_initial_check_wait_for_it(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    m, content = torrent
    seeder = TorrentSession(m, tmp_path / "seed", plugins=None)
    sessions.append(seeder)
    starting = gevent.spawn(seeder.start)  # hashes every piece, yielding between them
    gevent.sleep(0)
    assert not starting.ready()
    leech = new_session(sessions, m, tmp_path / "leech")
    connect(seeder, leech, "leech", "seeder")  # add_connection waits for the check
    assert starting.ready() and seeder.complete
    assert leech.wait_complete(timeout=30)
    assert_identical(tmp_path / "leech", content)


def test_failed_start_raises_one_line_error_every_time(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]]
) -> None:
    m, _ = torrent
    big = tmp_path / "dl" / "share" / "zzz.bin"
    big.parent.mkdir(parents=True)
    big.write_bytes(b"x" * 200_000)  # larger than the torrent's file
    s = TorrentSession(m, tmp_path / "dl", plugins=None)
    with pytest.raises(StorageError, match="refusing to touch it"):
        s.start()
    ours, theirs = tcp_pair()
    with pytest.raises(StorageError, match="refusing to touch it"):
        s.add_connection(ours, "x")
    assert recv_until_closed(theirs) == b""  # the stream was closed, not leaked
    s.close()
    assert big.stat().st_size == 200_000


def test_three_way_swarm_shares_pieces_between_downloaders(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    m, content = torrent
    seeder = new_session(sessions, m, tmp_path / "seed")
    d1 = new_session(sessions, m, tmp_path / "d1")
    d2 = new_session(sessions, m, tmp_path / "d2")
    connect(seeder, d1, "d1", "seeder")
    connect(seeder, d2, "d2", "seeder")
    connect(d1, d2, "d2", "d1")
    assert d1.wait_complete(30) and d2.wait_complete(30)
    assert_identical(tmp_path / "d1", content)
    assert_identical(tmp_path / "d2", content)


def corrupt_reads(s: TorrentSession, pieces: set[int] | None) -> None:
    """Make a seeder lie: the blocks it serves of ``pieces`` (all if None) are corrupt."""
    real = s.storage.read_block

    def read_block(index: int, begin: int, length: int) -> bytes:
        data = bytearray(real(index, begin, length))
        if pieces is None or index in pieces:
            data[0] ^= 0xFF
        return bytes(data)

    s.storage.read_block = read_block  # type: ignore[method-assign]


def hold_reads_until(s: TorrentSession, event: gevent.event.Event) -> None:
    """Make a seeder wait for ``event`` before it reads any block it serves."""
    real = s.storage.read_block

    def read_block(index: int, begin: int, length: int) -> bytes:
        event.wait()
        return real(index, begin, length)

    s.storage.read_block = read_block  # type: ignore[method-assign]


def asked(s: TorrentSession, conn: PeerConnection) -> bool:
    """Whether ``s`` has blocks requested on ``conn`` (False before the handshake)."""
    try:
        return s.picker.outstanding(conn) > 0
    except KeyError:
        return False


def test_corrupt_piece_is_detected_blamed_and_fetched_from_the_honest_seeder(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    m, content = torrent
    bad_piece = 5
    rec = Recorder()
    liar = new_session(sessions, m, tmp_path / "seed")
    honest = new_session(sessions, m, tmp_path / "seed")
    corrupt_reads(liar, {bad_piece})
    leech = new_session(
        sessions, m, tmp_path / "leech", plugins=get_plugins(load_entrypoints=False, extra=[rec])
    )
    # Only the liar at first, so it certainly supplies the bad piece.
    _, liar_conn = connect(liar, leech, "leech", "liar")
    with gevent.Timeout(20):
        while not rec.failed:
            gevent.sleep(0.01)
    _, honest_conn = connect(honest, leech, "leech", "honest")
    assert leech.wait_complete(timeout=30)
    assert_identical(tmp_path / "leech", content)
    assert rec.failed[0] == (bad_piece, "liar")
    assert {index for index, _ in rec.failed} == {bad_piece}
    assert all(source == "liar" for _, source in rec.failed)
    assert leech.hash_failures == len(rec.failed) >= 1
    assert honest_conn.strikes == 0
    assert liar_conn.strikes == len(rec.failed)  # each failure had the liar as only source


def test_seeder_corrupting_everything_is_disconnected_after_three_strikes(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    m, content = torrent
    rec = Recorder()
    liar = new_session(sessions, m, tmp_path / "seed")
    honest = new_session(sessions, m, tmp_path / "seed")
    corrupt_reads(liar, None)
    leech = new_session(
        sessions, m, tmp_path / "leech", plugins=get_plugins(load_entrypoints=False, extra=[rec])
    )
    _, liar_conn = connect(liar, leech, "leech", "liar")
    _, honest_conn = connect(honest, leech, "leech", "honest")
    assert leech.wait_complete(timeout=30)
    assert_identical(tmp_path / "leech", content)
    assert liar_conn.strikes == session_mod.MAX_STRIKES
    assert liar_conn.close_reason == "sent corrupt data for 3 pieces (0 good)"
    assert honest_conn.strikes == 0
    assert honest_conn.close_reason == "both sides complete"


def test_mixed_pieces_blame_only_the_source_of_the_bad_blocks(
    tmp_path: Path, sessions: list[TorrentSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Big pieces (32 blocks) and short pipelines: with partial pieces first,
    # both seeders' blocks end up in the same pieces.
    monkeypatch.setattr(flow_mod, "INITIAL_WINDOW", 4 * flow_mod.BLOCK)
    monkeypatch.setattr(flow_mod, "MAX_WINDOW", 4 * flow_mod.BLOCK)
    sizes = {"big.bin": 3 * 512 * 1024 + 1234, "small.bin": 4321}
    rng = random.Random(3)
    content = {rel: rng.randbytes(n) for rel, n in sizes.items()}
    for rel, data in content.items():
        (tmp_path / "seed" / "share").mkdir(parents=True, exist_ok=True)
        (tmp_path / "seed" / "share" / rel).write_bytes(data)
    m = make_metainfo(
        tmp_path / "seed" / "share",
        trackers=["https://t.example/a"],
        piece_length=512 * 1024,
        progress=False,
    )
    rec = Recorder()
    liar = new_session(sessions, m, tmp_path / "seed")
    honest = new_session(sessions, m, tmp_path / "seed")
    corrupt_reads(liar, None)
    leech = new_session(
        sessions, m, tmp_path / "leech", plugins=get_plugins(load_entrypoints=False, extra=[rec])
    )
    # Neither seeder serves a block until the leech has asked both: otherwise
    # the liar, connected first, can earn its strikes on pieces it supplied
    # alone and be dropped before any mixed piece fails.
    asked_both = gevent.event.Event()
    for seeder in (liar, honest):
        hold_reads_until(seeder, asked_both)
    _, liar_conn = connect(liar, leech, "leech", "liar")
    _, honest_conn = connect(honest, leech, "leech", "honest")
    with gevent.Timeout(10, AssertionError("the leech never asked both seeders")):
        while not all(asked(leech, c) for c in (liar_conn, honest_conn)):
            gevent.sleep(0.01)
    asked_both.set()
    assert leech.wait_complete(timeout=30)
    assert_identical(tmp_path / "leech", content)
    assert "honest, liar" in {source for _, source in rec.failed}
    assert honest_conn.strikes == 0  # never blamed for the liar's blocks
    assert honest_conn.close_reason == "both sides complete"
    assert liar_conn.strikes >= 1


def test_resume_rechecks_only_pieces_of_changed_files(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    m, content = torrent
    resume_dir = tmp_path / "resume"
    seeder = new_session(sessions, m, tmp_path / "seed")
    leech = TorrentSession(m, tmp_path / "leech", plugins=None, resume_dir=resume_dir)
    leech.start()
    assert leech.rechecked == 0  # nothing on disk: nothing to hash
    connect(seeder, leech, "leech", "seeder")
    assert leech.wait_complete(timeout=30)
    leech.close()

    again = TorrentSession(m, tmp_path / "leech", plugins=None, resume_dir=resume_dir)
    again.start()
    assert again.complete and again.rechecked == 0 and again.storage.checks == 0
    again.close()

    # Touch one file: only its pieces are re-hashed, and they are still good.
    sample = next(i for i, f in enumerate(m.files) if f.path[-1] == "sample.bin")
    path = tmp_path / "leech" / Path(*m.files[sample].path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    expected = len(pieces_of_file(m, sample))
    assert 1 < expected < len(m.pieces) // 2
    third = TorrentSession(m, tmp_path / "leech", plugins=None, resume_dir=resume_dir)
    third.start()
    assert third.rechecked == third.storage.checks == expected
    assert third.complete
    third.close()

    # Corrupt that file: its pieces are found bad and only they are fetched again.
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 10)
    fourth = new_session(sessions, m, tmp_path / "leech", resume_dir=resume_dir)
    assert fourth.rechecked == expected and not fourth.complete
    assert fourth.left == m.piece_size(0)
    connect(seeder, fourth, "fourth", "seeder")
    assert fourth.wait_complete(timeout=30)
    assert fourth.downloaded == m.piece_size(0)
    assert_identical(tmp_path / "leech", content)

    # Garbage resume data: a full re-check, never an error.
    fourth.close()
    (resume_dir / f"{m.infohash.hex()}.json").write_bytes(b"\x00garbage")
    fifth = new_session(sessions, m, tmp_path / "leech", resume_dir=resume_dir)
    assert fifth.complete and fifth.rechecked == len(m.pieces)


def handshake_with(sock: socket.socket, m: Metainfo) -> None:
    sock.sendall(wire.Handshake(m.infohash, wire.new_peer_id()).encode())


def recv_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    data = b""
    with gevent.Timeout(timeout):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_malformed_message_closes_only_that_connection(
    tmp_path: Path,
    torrent: tuple[Metainfo, dict[str, bytes]],
    sessions: list[TorrentSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    m, content = torrent
    seeder = new_session(sessions, m, tmp_path / "seed")
    leech = new_session(sessions, m, tmp_path / "leech")
    evil, ours = tcp_pair()
    g = leech.add_connection(ours, "evil")
    evil_conn = leech.connections[-1]
    _, seed_conn = connect(seeder, leech, "leech", "seeder")
    handshake_with(evil, m)
    # A request for 1 MiB: longer than any block may be.
    caplog.set_level(logging.INFO, logger="anomos.torrent.session")
    evil.sendall(struct.pack(">IBIII", 13, wire.REQUEST, 0, 0, 1 << 20))
    received = recv_until_closed(evil)
    assert received[:20] == b"\x13BitTorrent protocol"  # we spoke first, then hung up
    g.join(timeout=5)
    assert g.dead
    assert "request of 1048576 bytes" in evil_conn.close_reason
    assert leech.wait_complete(timeout=30)
    assert seed_conn.close_reason == "both sides complete"
    assert_identical(tmp_path / "leech", content)
    (line,) = [r.getMessage() for r in caplog.records if "evil" in r.getMessage()]
    assert "request of 1048576 bytes" in line


def test_handshake_goes_out_first_even_if_a_have_is_queued_at_once(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    m, _ = torrent
    leech = new_session(sessions, m, tmp_path / "leech")
    peer, ours = tcp_pair()
    leech.add_connection(ours, "late")
    # A piece verified before the new connection's greenlets first run queues a
    # HAVE for it at once (_piece_verified does so for connections not yet
    # handshaken); the peer must still hear the handshake first (it hung up on
    # circuits opened while others were downloading).
    leech.connections[-1].send(wire.encode_have(0))
    handshake_with(peer, m)
    data = b""
    with gevent.Timeout(10):
        while len(data) < wire.HANDSHAKE_LEN + 9:
            data += peer.recv(65536)
    assert data[:20] == b"\x13BitTorrent protocol"
    peer.close()


def test_a_peer_that_asked_for_the_torrent_is_unchoked_in_the_first_answer(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    # A circuit to us as its source asked for this torrent: the seeder unchokes it
    # with its handshake and bitfield, before the peer says it is interested, so
    # the peer's first requests go out one round trip sooner.
    m, _ = torrent
    seeder = new_session(sessions, m, tmp_path / "seed")
    peer, ours = tcp_pair()
    seeder.add_connection(ours, "circuit", asked=True)
    reader = wire.MessageReader(len(m.pieces), m.piece_size)
    messages: list[Any] = []
    with gevent.Timeout(10):
        while len(messages) < 3:
            messages += reader.feed(peer.recv(65536))
    assert [type(x) for x in messages[:3]] == [wire.Handshake, wire.Bitfield, wire.Unchoke]
    # Not so for a connection nobody asked for: it is unchoked once interested.
    other, ours = tcp_pair()
    seeder.add_connection(ours, "plain")
    handshake_with(other, m)
    other.settimeout(0.5)
    data = b""
    with pytest.raises(TimeoutError):
        while True:
            data += other.recv(65536)
    reader = wire.MessageReader(len(m.pieces), m.piece_size)
    assert not any(isinstance(x, wire.Unchoke) for x in reader.feed(data))
    peer.close()
    other.close()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x13BitTorrent protocol" + bytes(8) + b"\x01" * 20 + bytes(20), "another torrent"),
        (b"GET / HTTP/1.1\r\n" * 5, "not the BitTorrent protocol"),
    ],
)
def test_bad_handshake_is_refused(
    tmp_path: Path,
    torrent: tuple[Metainfo, dict[str, bytes]],
    sessions: list[TorrentSession],
    payload: bytes,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="anomos.torrent.session")
    m, _ = torrent
    seeder = new_session(sessions, m, tmp_path / "seed")
    evil, ours = tcp_pair()
    g = seeder.add_connection(ours, "evil")
    evil.sendall(payload)
    recv_until_closed(evil)
    g.join(timeout=5)
    assert seeder.connections == ()
    assert any("evil" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_idle_peer_gets_keepalives_then_is_dropped(
    tmp_path: Path,
    torrent: tuple[Metainfo, dict[str, bytes]],
    sessions: list[TorrentSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m, _ = torrent
    monkeypatch.setattr(session_mod, "MAINTENANCE_INTERVAL", 0.05)
    monkeypatch.setattr(session_mod, "KEEPALIVE_INTERVAL", 0.2)
    monkeypatch.setattr(session_mod, "IDLE_TIMEOUT", 1.0)
    seeder = new_session(sessions, m, tmp_path / "seed")
    quiet, ours = tcp_pair()
    seeder.add_connection(ours, "quiet")
    handshake_with(quiet, m)
    data = recv_until_closed(quiet)
    reader = wire.MessageReader(len(m.pieces), m.piece_size)
    messages = reader.feed(data)
    assert isinstance(messages[0], wire.Handshake)
    assert isinstance(messages[1], wire.Bitfield)
    assert wire.KEEP_ALIVE in messages[2:]
    assert seeder.connections == ()


def test_endgame_finishes_without_waiting_for_a_stalled_peer(
    tmp_path: Path,
    torrent: tuple[Metainfo, dict[str, bytes]],
    sessions: list[TorrentSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m, content = torrent
    # Without endgame the blocks held by the stalled peer would wait this long.
    monkeypatch.setattr(session_mod, "REQUEST_TIMEOUT", 600.0)
    stalled = new_session(sessions, m, tmp_path / "seed")
    fast = new_session(sessions, m, tmp_path / "seed")
    stalled.storage.read_block = lambda *a: gevent.sleep(600)  # type: ignore[assignment,method-assign,return-value]
    leech = new_session(sessions, m, tmp_path / "leech")
    _, stalled_conn = connect(stalled, leech, "leech", "stalled")
    gevent.sleep(0.2)  # the stalled peer gets a full pipeline of requests first
    assert leech.picker.outstanding(stalled_conn) > 0
    connect(fast, leech, "leech", "fast")
    assert leech.wait_complete(timeout=20)
    assert_identical(tmp_path / "leech", content)
    assert stalled_conn.downloaded == 0


# ----------------------------------------------------------------------------- interoperability


def _libtorrent_session() -> Any:
    lt = pytest.importorskip("libtorrent")
    disabled = int(lt.enc_policy.disabled)
    return lt, lt.session(
        {
            "listen_interfaces": "127.0.0.1:0",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "out_enc_policy": disabled,
            "in_enc_policy": disabled,
            "allow_multiple_connections_per_ip": True,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
        }
    )


def _lt_add(lt: Any, ses: Any, m: Metainfo, save_path: Path) -> Any:
    params = lt.add_torrent_params()
    # The info dict alone: no tracker to announce to.
    params.ti = lt.torrent_info(lt.bdecode(b"d4:info" + m.info_bytes + b"e"))
    params.save_path = str(save_path)
    return ses.add_torrent(params)


def _wait_for(condition: Any, timeout: float) -> bool:
    with gevent.Timeout(timeout, False):
        while not condition():
            gevent.sleep(0.05)
        return True
    return False


def test_interoperates_with_libtorrent_both_ways(
    tmp_path: Path, torrent: tuple[Metainfo, dict[str, bytes]], sessions: list[TorrentSession]
) -> None:
    """A standard client (libtorrent) accepts our BEP 3 peer wire, as seeder and leecher."""
    m, content = torrent
    lt, ses = _libtorrent_session()
    try:
        lt_seed = _lt_add(lt, ses, m, tmp_path / "seed")
        assert _wait_for(lambda: lt_seed.status().is_seeding, 20)
        leech = new_session(sessions, m, tmp_path / "leech")
        leech.add_connection(
            socket.create_connection(("127.0.0.1", ses.listen_port())), "libtorrent"
        )
        assert leech.wait_complete(timeout=20)
        assert_identical(tmp_path / "leech", content)
        ses.remove_torrent(lt_seed)

        from gevent.server import StreamServer

        seeder = new_session(sessions, m, tmp_path / "seed")
        server = StreamServer(
            ("127.0.0.1", 0), lambda sock, _: seeder.add_connection(sock, "lt").join()
        )
        server.start()
        try:
            lt_leech = _lt_add(lt, ses, m, tmp_path / "lt")
            lt_leech.connect_peer(("127.0.0.1", server.server_port))
            assert _wait_for(lambda: lt_leech.status().is_seeding, 20)
        finally:
            server.stop(timeout=1)
        assert_identical(tmp_path / "lt", content)
        assert seeder.uploaded == m.total_length
    finally:
        ses.pause()
