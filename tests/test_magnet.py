"""anomos magnet links: the link format (refused by libtorrent), and a magnet's
metadata fetched from a source over real loopback TCP: from an honest
TorrentSession, and from hostile sources that lie about it in every way."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import libtorrent as lt
import pytest
from test_session import make_torrent, new_session, tcp_pair

from anomos.errors import MetainfoError, ProtocolError
from anomos.testing import run_anomos
from anomos.torrent import magnet as magnet_mod
from anomos.torrent import wire
from anomos.torrent.magnet import Magnet, SourceClosed, fetch_metadata, is_magnet
from anomos.torrent.metainfo import MAX_METAINFO_SIZE, Metainfo, make_metainfo
from anomos.torrent.session import MAX_METADATA_SENDS, TorrentSession

TRACKER = "https://127.0.0.1:8443/announce"
FP = "ab" * 32
IH = bytes(range(20))


@pytest.fixture
def sessions() -> Iterator[list[TorrentSession]]:
    made: list[TorrentSession] = []
    yield made
    for s in made:
        s.close()


def anomos_torrent(root: Path) -> Metainfo:
    m, _ = make_torrent(root)
    return Metainfo.from_info(m.info_bytes, (TRACKER,), FP)


# ----------------------------------------------------------------------------- the link


def test_a_magnet_round_trips_and_carries_what_a_download_needs(tmp_path: Path) -> None:
    m = anomos_torrent(tmp_path)
    magnet = Magnet.from_metainfo(m)
    text = str(magnet)
    assert text.startswith(f"magnet:?xt=urn:anomos:{m.infohash_hex}&dn=share&tr=https%3A%2F%2F")
    assert text.endswith(f"&x.fp={FP}")
    assert Magnet.parse(text) == magnet
    assert (magnet.infohash, magnet.trackers, magnet.fingerprint, magnet.name) == (
        m.infohash,
        (TRACKER,),
        FP,
        "share",
    )
    odd = Magnet(IH, (TRACKER, "https://[::1]:9/a?b=c&d"), FP, name="Ünïcode & spaces + 100%")
    assert Magnet.parse(str(odd)) == odd
    assert Magnet.parse(f"  {odd}\n") == odd  # pasted with whitespace around
    assert is_magnet(" Magnet:?xt") and not is_magnet("song.atorrent")


GOOD = f"xt=urn:anomos:{IH.hex()}&tr={TRACKER}&x.fp={FP}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("song.atorrent", "does not start with magnet:?"),
        (f"magnet:?xt=urn:btih:{IH.hex()}&tr={TRACKER}&x.fp={FP}", "a BitTorrent magnet"),
        (f"magnet:?xt=urn:btmh:1220{IH.hex()}&x.fp={FP}", "a BitTorrent magnet"),
        (f"magnet:?tr={TRACKER}&x.fp={FP}", "no anomos topic"),
        (f"magnet:?xt=urn:anomos:{IH.hex()[:-1]}&tr={TRACKER}&x.fp={FP}", "not 40 lowercase hex"),
        (f"magnet:?xt=urn:anomos:{IH.hex().upper()}&tr={TRACKER}&x.fp={FP}", "40 lowercase hex"),
        (f"magnet:?xt=urn:anomos:{IH.hex()}&x.fp={FP}", "no tracker"),
        (f"magnet:?xt=urn:anomos:{IH.hex()}&tr={TRACKER}", "no tracker fingerprint"),
        (f"magnet:?xt=urn:anomos:{IH.hex()}&tr={TRACKER}&x.fp={FP[:-2]}", "x.fp: not 64"),
        (f"magnet:?xt=urn:anomos:{IH.hex()}&tr=http://t.example/a&x.fp={FP}", "https://"),
        (f"magnet:?xt=urn:anomos:{IH.hex()}&tr=https://u:p@t.example/&x.fp={FP}", "user name"),
        (f"magnet:?{GOOD}&xt=urn:anomos:{IH.hex()}", "xt given more than once"),
        (f"magnet:?{GOOD}&dn=a&dn=b", "dn given more than once"),
        (f"magnet:?{GOOD}&dn=a%0Ab", "dn: contains control characters"),
        (f"magnet:?{GOOD}&dn={'x' * 256}", "dn: longer than 255 bytes"),
        (f"magnet:?{GOOD}&dn=%FF", "malformed"),
        (f"magnet:?{GOOD}&as=https://t.example/f.torrent", "unknown parameter 'as'"),
        (f"magnet:?{GOOD}&xs=x", "unknown parameter 'xs'"),
        (f"magnet:?{GOOD}&&", "malformed"),
        (f"magnet:?{GOOD}" + "&tr=https://t.example/" * 17, "malformed"),  # too many fields
        ("magnet:?" + "dn=" + "x" * 9000, "longer than 8192 characters"),
    ],
)
def test_bad_links_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(MetainfoError, match=message) as caught:
        Magnet.parse(text)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("magnet: ")


def test_libtorrent_refuses_the_link_and_the_infohash_never_appears_as_btih(
    tmp_path: Path,
) -> None:
    """A pasted anomos magnet cannot make a BitTorrent client announce the infohash on
    the public DHT: libtorrent finds no infohash it knows in it."""
    m = anomos_torrent(tmp_path)
    text = str(Magnet.from_metainfo(m))
    with pytest.raises(RuntimeError, match="missing info-hash"):
        lt.parse_magnet_uri(text)
    session = lt.session({"enable_dht": False, "enable_lsd": False, "listen_interfaces": ""})
    params = lt.add_torrent_params()
    params.url = text  # the old way of adding a magnet: parsed when added
    params.save_path = str(tmp_path)
    with pytest.raises(RuntimeError):
        session.add_torrent(params)
    assert not session.get_torrents()
    # Neither the BitTorrent topics nor the infohash in base32 (BEP 9's other spelling).
    lowered = text.lower()
    assert "btih" not in lowered and "btmh" not in lowered
    assert base64.b32encode(m.infohash).decode().lower() not in lowered
    # The same infohash as a btih magnet is what libtorrent would take (the control).
    assert lt.parse_magnet_uri(f"magnet:?xt=urn:btih:{m.infohash_hex}").info_hashes.v1.to_bytes()


# ----------------------------------------------------------------------------- metadata


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Metainfo, Path]:
    """A torrent whose info dict spans several 16 KiB metadata pieces (40 MiB of
    zeros in 16 KiB pieces: 2,560 hashes, 51 KiB of metadata; a sparse file hashes
    fast), and the folder holding its data."""
    root = tmp_path_factory.mktemp("big")
    with open(root / "zeros.bin", "wb") as f:
        f.truncate(40 * 1024 * 1024)
    m = make_metainfo(
        root / "zeros.bin",
        trackers=[TRACKER],
        fingerprint=FP,
        piece_length=16 * 1024,
        progress=False,
    )
    assert len(m.info_bytes) > 3 * wire.METADATA_PIECE_SIZE
    return m, root


def test_wire_bound_matches_the_metainfo_limit() -> None:
    assert wire.MAX_METADATA_PIECES * wire.METADATA_PIECE_SIZE == MAX_METAINFO_SIZE


@pytest.mark.parametrize("size", ["small", "big"])
def test_the_metadata_comes_in_pieces_from_a_source_and_makes_the_same_atorrent(
    tmp_path: Path, sessions: list[TorrentSession], size: str, big: tuple[Metainfo, Path]
) -> None:
    m, root = (anomos_torrent(tmp_path), tmp_path) if size == "small" else big
    source = new_session(sessions, m, root)
    assert source.complete
    ours, theirs = tcp_pair()
    source.add_connection(theirs, "downloader")
    seen: list[float] = []
    info = fetch_metadata(ours, m.infohash, timeout=20, progress=seen.append)
    ours.close()
    assert info == m.info_bytes
    assert Magnet.from_metainfo(m).metainfo(info) == m
    pieces = -(-len(info) // wire.METADATA_PIECE_SIZE)
    assert len(seen) == pieces and seen[-1] == 1.0


class HostileSource:
    """A source over a real socket that answers the handshake, then sends what
    ``answer(request_piece)`` returns for each metadata request."""

    def __init__(self, infohash: bytes, answer: Callable[[int], bytes]) -> None:
        self.infohash = infohash
        self.answer = answer
        self.ours, self.theirs = tcp_pair()
        self.greenlet = gevent.spawn(self._serve)

    def _serve(self) -> None:
        sock = self.theirs
        sock.sendall(wire.Handshake(self.infohash, wire.new_peer_id()).encode())
        reader = wire.MessageReader(1, lambda _i: 1)
        try:
            while data := sock.recv(65536):
                for msg in reader.feed(data):
                    if isinstance(msg, wire.MetadataRequest):
                        sock.sendall(self.answer(msg.piece))
        except OSError:
            pass

    def close(self) -> None:
        self.greenlet.kill()
        self.ours.close()
        self.theirs.close()


def piece_msg(piece: int, total: int, data: bytes) -> bytes:
    return wire.MetadataPiece(piece, total, data).encode()


def honest_pieces(info: bytes) -> Callable[[int], bytes]:
    step = wire.METADATA_PIECE_SIZE
    return lambda i: piece_msg(i, len(info), info[i * step : (i + 1) * step])


@pytest.mark.parametrize(
    ("lie", "message"),
    [
        # another torrent's metadata: the hash check at the end
        (lambda info: honest_pieces(info[:-1] + b"x"), "does not match the infohash"),
        # claims more than the metainfo limit
        (lambda info: lambda i: piece_msg(0, MAX_METAINFO_SIZE + 1, b"x"), "the limit is"),
        (lambda info: lambda i: piece_msg(0, 0, b"x"), "metadata of 0 bytes"),
        # a piece past the end, never asked for
        (lambda info: lambda i: piece_msg(511, len(info), b"x"), "piece 511 was not asked for"),
        # unrequested data: two answers to one request
        (lambda info: lambda i: honest_pieces(info)(i) * 2, "was not asked for"),
        # the total changes between pieces
        (
            lambda info: lambda i: piece_msg(i, len(info) + i, info[i * 16384 : (i + 1) * 16384]),
            "metadata size changed",
        ),
        # a short piece
        (lambda info: lambda i: piece_msg(i, len(info), b"xy"), "of 2 bytes (expected 16384)"),
        # a piece id past the wire's bound
        (lambda info: lambda i: struct.pack(">IBII", 10, 27, 512, 9) + b"x", "at most 512"),
        # a framing lie: a message longer than any
        (lambda info: lambda i: struct.pack(">IB", 1 << 24, 27), "exceeds the"),
        # silence
        (lambda info: lambda i: b"", "no metadata within 1 s"),
    ],
)
def test_a_source_lying_about_the_metadata_is_caught_in_one_line(
    big: tuple[Metainfo, Path], lie: Callable[[bytes], Callable[[int], bytes]], message: str
) -> None:
    m, _ = big
    source = HostileSource(m.infohash, lie(m.info_bytes))
    try:
        with pytest.raises(ProtocolError, match=re.escape(message)) as caught:
            fetch_metadata(source.ours, m.infohash, timeout=1 if "within" in message else 10)
        assert "\n" not in str(caught.value)
        # A lie or silence, not an end of the stream: the source is not planned again.
        assert not isinstance(caught.value, SourceClosed)
    finally:
        source.close()


def test_a_source_ending_the_stream_early_is_told_apart_from_a_liar(
    big: tuple[Metainfo, Path],
) -> None:
    """An end of the stream may be a relay's doing: the downloader may plan the source
    again (MetadataFetch avoids only liars and silent ones)."""
    m, _ = big
    source = HostileSource(m.infohash, lambda i: b"")
    try:
        gevent.spawn_later(0.2, source.theirs.shutdown, socket.SHUT_WR)
        with pytest.raises(SourceClosed, match="closed before sending the metadata"):
            fetch_metadata(source.ours, m.infohash, timeout=10)
    finally:
        source.close()


def test_a_source_answering_for_another_torrent_is_caught(tmp_path: Path) -> None:
    m = anomos_torrent(tmp_path)
    source = HostileSource(IH, honest_pieces(m.info_bytes))
    try:
        with pytest.raises(ProtocolError, match="another torrent"):
            fetch_metadata(source.ours, m.infohash, timeout=10)
    finally:
        source.close()


def test_metadata_matching_the_hash_is_still_validated_before_use() -> None:
    """Bytes whose SHA-1 is the magnet's infohash but that are no valid info dict."""
    junk = b"d4:name3:abce"
    magnet = Magnet(hashlib.sha1(junk).digest(), (TRACKER,), FP)
    with pytest.raises(ProtocolError, match="matches the infohash but is invalid"):
        magnet.metainfo(junk)
    with pytest.raises(ProtocolError, match="does not match"):
        Magnet(IH, (TRACKER,), FP).metainfo(junk)


# ----------------------------------------------------------------------------- the source side


def raw_downloader(source: TorrentSession, m: Metainfo) -> socket.socket:
    ours, theirs = tcp_pair()
    source.add_connection(theirs, "hostile downloader")
    ours.sendall(wire.Handshake(m.infohash, wire.new_peer_id()).encode())
    return ours


@pytest.mark.parametrize(
    ("send", "message"),
    [
        (lambda n: wire.MetadataRequest(n).encode(), "metadata request for piece"),
        (lambda n: piece_msg(0, 5, b"abcde"), "sent metadata nobody asked for"),
        (
            lambda n: wire.MetadataRequest(0).encode() * (MAX_METADATA_SENDS * n + 1),
            f"asked for the metadata more than {MAX_METADATA_SENDS} times",
        ),
    ],
)
def test_a_source_closes_a_downloader_abusing_the_metadata_messages(
    tmp_path: Path,
    sessions: list[TorrentSession],
    caplog: pytest.LogCaptureFixture,
    send: Callable[[int], bytes],
    message: str,
) -> None:
    m = anomos_torrent(tmp_path)
    source = new_session(sessions, m, tmp_path)
    pieces = -(-len(m.info_bytes) // wire.METADATA_PIECE_SIZE)
    caplog.set_level(logging.INFO, logger="anomos.torrent.session")
    sock = raw_downloader(source, m)
    sock.sendall(send(pieces))
    with gevent.Timeout(10):
        while sock.recv(65536):
            pass  # the source hangs up
    sock.close()
    lines = [
        r.getMessage() for r in caplog.records if "hostile downloader closed" in r.getMessage()
    ]
    assert len(lines) == 1 and message in lines[0], lines


def test_the_metadata_reader_skips_piece_messages_it_cannot_check() -> None:
    """Before the metadata, the piece count is unknown: bitfields and haves of any
    size are skipped (bounded by the largest torrent), metadata pieces parsed."""
    reader = magnet_mod._MetadataReader()
    reader.feed(wire.Handshake(IH, wire.new_peer_id()).encode())
    msgs = reader.feed(
        wire.Bitfield(b"\xff" * 5000).encode() + wire.Have(7).encode() + piece_msg(0, 3, b"abc")
    )
    assert msgs[-1] == wire.MetadataPiece(0, 3, b"abc")
    assert all(isinstance(x, wire.KeepAlive) for x in msgs[:-1])


# ----------------------------------------------------------------------------- the commands


def test_make_and_info_print_the_magnet_and_info_reads_one(tmp_path: Path) -> None:
    song = tmp_path / "song.ogg"
    song.write_bytes(b"la" * 50_000)
    out = tmp_path / "song.atorrent"
    made = run_anomos("make", str(song), "-t", TRACKER, "--fingerprint", FP, "-o", str(out))
    assert made.returncode == 0, made.stderr
    magnet = str(Magnet.from_metainfo(Metainfo.load(out)))
    assert f"magnet: {magnet}" in made.stdout.splitlines()
    shown = run_anomos("info", str(out))
    assert f"magnet:       {magnet}" in shown.stdout.splitlines()
    assert json.loads(run_anomos("info", str(out), "--json").stdout)["magnet"] == magnet
    named = json.loads(run_anomos("info", magnet, "--json").stdout)
    assert named["name"] == "song.ogg" and named["trackers"] == [TRACKER]
    refused = run_anomos("info", f"magnet:?xt=urn:btih:{IH.hex()}")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "anomos: error: magnet: a BitTorrent magnet (urn:btih/btmh), not an anomos one "
        "(urn:anomos:)"
    ]
