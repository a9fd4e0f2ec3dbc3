"""Selective download and file priorities: the picker, and sessions over loopback TCP."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import click
import pytest

from anomos.errors import ConfigError
from anomos.pluginmanager import get_plugins
from anomos.plugins.commands.peer_cmds import _chosen_files, _file_indices
from anomos.testing import run_anomos
from anomos.torrent import resume
from anomos.torrent.metainfo import Metainfo, make_metainfo
from anomos.torrent.picker import SKIP, PiecePicker, Priority, band
from anomos.torrent.session import TorrentSession
from anomos.torrent.wire import BLOCK_SIZE
from tests.test_session import (
    PIECE,
    Recorder,
    connect,
    make_torrent,
    new_session,
    sessions,  # noqa: F401  (a fixture)
)

# Pieces of 64 KiB. a.bin fills pieces 0-1 and half of 2; b.bin the rest of 2, all of
# 3-9 and a bit of 10; c.bin the rest of 10 and 11-12: piece 2 and 10 are shared.
FILES = {"a.bin": 2 * PIECE + PIECE // 2, "b.bin": 8 * PIECE, "c.bin": 2 * PIECE + 1000}
A, B, C = 0, 1, 2


def test_priority_bands() -> None:
    assert [band(Priority.HIGH), band(Priority.NORMAL), band(Priority.LOW), band(None)] == [
        0,
        1,
        2,
        SKIP,
    ]


def test_higher_priority_pieces_come_before_rarer_ones() -> None:
    bands = bytearray([2, 1, 1, 0, SKIP])
    p = PiecePicker(5, lambda i: BLOCK_SIZE, bands=bands, rng=random.Random(1))
    p.add_peer("x")
    p.add_peer("y")
    p.peer_bitfield("x", b"\x01\x01\x01\x01\x01")
    p.peer_bitfield("y", b"\x00\x01\x00\x01\x01")  # 0 and 2 are rarer than 1 and 3
    p.peer_unchoked("x")
    got = [b[0] for b in p.next_requests("x", 5)]
    # high first, then the rarest normal one, the other normal one, the low one; never 4
    assert got == [3, 2, 1, 0]
    assert p.remaining == 4


def test_unwanted_pieces_are_not_requested_nor_make_a_peer_interesting() -> None:
    p = PiecePicker(3, lambda i: BLOCK_SIZE, rng=random.Random(2))
    p.add_peer("x")
    p.peer_bitfield("x", b"\x00\x00\x01")
    p.peer_unchoked("x")
    assert p.interesting("x")
    interesting, bored = p.set_band(2, SKIP)
    assert (interesting, bored) == ([], ["x"]) and not p.interesting("x")
    assert p.next_requests("x", 10) == []
    for i in (0, 1):
        p.set_band(i, SKIP)
    assert p.complete and p.remaining == 0
    interesting, bored = p.set_band(2, band(Priority.LOW))
    assert interesting == ["x"] and not p.complete
    assert p.next_requests("x", 10) == [(2, 0, BLOCK_SIZE)]


def test_unwanting_a_started_piece_drops_its_requests() -> None:
    p = PiecePicker(2, lambda i: 2 * BLOCK_SIZE, rng=random.Random(3))
    p.add_peer("x")
    p.peer_bitfield("x", b"\x01\x01")
    p.peer_unchoked("x")
    first = p.next_requests("x", 1)[0]
    p.set_band(first[0], SKIP)
    assert p.outstanding("x") == 0
    assert not p.block_received("x", first).accepted  # arrives late: dropped
    assert all(b[0] != first[0] for b in p.next_requests("x", 10))


def selection_torrent(tmp_path: Path) -> tuple[Metainfo, dict[str, bytes]]:
    return make_torrent(tmp_path / "seed", FILES)


def test_a_session_fetches_only_the_pieces_of_wanted_files_then_the_rest(
    tmp_path: Path,
    sessions: list[TorrentSession],  # noqa: F811
) -> None:
    m, content = selection_torrent(tmp_path)
    assert len(m.pieces) == 13
    seeder = new_session(sessions, m, tmp_path / "seed")
    leech = TorrentSession(m, tmp_path / "leech", plugins=None, resume_dir=tmp_path / "resume")
    leech.set_wanted([B], False)  # before start: replaces any saved choice
    leech.set_priority([C], Priority.HIGH)
    leech.start()
    sessions.append(leech)
    assert leech.size_when_done == 5 * PIECE + PIECE // 2 + 1000  # pieces 0-2 and 10-12
    assert leech.left_until_done == leech.size_when_done
    assert leech.left == m.total_length  # as announced: no piece here yet
    connect(seeder, leech, "leech", "seeder")
    assert leech.wait_complete(timeout=30)
    share = tmp_path / "leech" / "share"
    assert (share / "a.bin").read_bytes() == content["a.bin"]
    assert (share / "c.bin").read_bytes() == content["c.bin"]
    # b.bin holds only the bytes of the two boundary pieces it shares, sparse elsewhere
    b = share / "b.bin"
    on_disk = b.read_bytes()
    assert len(on_disk) == FILES["b.bin"]
    head = tail = PIECE // 2  # from piece 2, and from piece 10
    assert on_disk[:head] == content["b.bin"][:head]
    assert on_disk[head:-tail] == bytes(len(on_disk) - head - tail)
    assert on_disk[-tail:] == content["b.bin"][-tail:]
    assert leech.downloaded == leech.size_when_done < m.total_length // 2
    assert leech.left_until_done == 0 and leech.progress == 1.0
    assert leech.left == m.total_length - leech.size_when_done
    stats = leech.file_progress()
    assert [(s.bytes_completed, s.wanted, s.priority) for s in stats] == [
        (FILES["a.bin"], True, Priority.NORMAL),
        (head + tail, False, Priority.NORMAL),
        (FILES["c.bin"], True, Priority.HIGH),
    ]
    # the choice is in the resume data
    doc = json.loads(resume.resume_path(tmp_path / "resume", m).read_text())
    assert doc["wanted"] == [1, 0, 1] and doc["priority"] == [0, 0, 1]
    # done, with a seed: nothing to trade, the connection was let go
    assert leech.connections == ()
    # wanted later: fetched then
    leech.set_wanted([B], True)
    assert not leech.complete and leech.left_until_done == 7 * PIECE  # pieces 3-9
    connect(seeder, leech, "leech", "seeder")
    assert leech.wait_complete(timeout=30)
    assert b.read_bytes() == content["b.bin"]
    assert leech.downloaded == m.total_length


def test_the_choice_survives_a_restart_and_an_explicit_one_replaces_it(
    tmp_path: Path,
    sessions: list[TorrentSession],  # noqa: F811
) -> None:
    m, _ = selection_torrent(tmp_path)
    first = TorrentSession(m, tmp_path / "leech", plugins=None, resume_dir=tmp_path / "resume")
    first.start()
    first.set_wanted([A, C], False)
    first.set_priority([B], Priority.LOW)
    first.close()
    again = TorrentSession(m, tmp_path / "leech", plugins=None, resume_dir=tmp_path / "resume")
    again.start()
    sessions.append(again)
    assert [(s.wanted, s.priority) for s in again.file_progress()] == [
        (False, Priority.NORMAL),
        (True, Priority.LOW),
        (False, Priority.NORMAL),
    ]
    assert again.size_when_done == 9 * PIECE  # pieces 2-10
    explicit = TorrentSession(m, tmp_path / "other", plugins=None, resume_dir=tmp_path / "resume")
    explicit.set_wanted([A], True)
    explicit.start()
    sessions.append(explicit)
    assert all(s.wanted for s in explicit.file_progress())


def test_bad_file_indices_are_refused_in_one_line(tmp_path: Path) -> None:
    m, _ = selection_torrent(tmp_path)
    s = TorrentSession(m, tmp_path / "leech", plugins=None)
    with pytest.raises(ValueError, match=r"no file 3 .* 3 files"):
        s.set_wanted([3], False)
    with pytest.raises(ValueError):
        s.set_priority([0], 7)  # type: ignore[arg-type]


def test_a_hostile_selection_in_the_resume_file_is_ignored(tmp_path: Path) -> None:
    m, _ = selection_torrent(tmp_path)
    resume.save(tmp_path, m, bytes(len(m.pieces)), [None] * 3, wanted=[True, False, True])
    assert resume.load(tmp_path, m) is not None
    path = resume.resume_path(tmp_path, m)
    doc = json.loads(path.read_text())
    doc["wanted"] = [1, 0]
    path.write_text(json.dumps(doc))
    assert resume.load(tmp_path, m) is None
    doc["wanted"], doc["priority"] = [1, 0, 1], [0, 5, 0]
    path.write_text(json.dumps(doc))
    assert resume.load(tmp_path, m) is None


def test_nothing_wanted_is_done_at_once_and_creates_no_file(
    tmp_path: Path,
    sessions: list[TorrentSession],  # noqa: F811
) -> None:
    m, _ = selection_torrent(tmp_path)
    s = TorrentSession(m, tmp_path / "leech", plugins=None)
    s.set_wanted([A, B, C], False)
    s.start()
    sessions.append(s)
    assert s.complete and s.left_until_done == 0 and s.size_when_done == 0
    assert not (tmp_path / "leech" / "share").exists()
    s.set_wanted([C], True)
    assert not s.complete and s.left_until_done == 2 * PIECE + PIECE // 2 + 1000


def test_info_lists_file_indices_and_get_refuses_a_bad_choice_in_one_line(
    tmp_path: Path,
) -> None:
    m, _ = selection_torrent(tmp_path)
    signed = make_metainfo(
        tmp_path / "seed" / "share",
        trackers=["https://127.0.0.1:9/"],
        fingerprint="ab" * 32,
        piece_length=PIECE,
        progress=False,
    )
    atorrent = tmp_path / "share.atorrent"
    signed.save(atorrent)
    text = run_anomos("info", str(atorrent)).stdout
    for i, name in enumerate(FILES):
        assert re.search(rf"^ +{i} +{FILES[name]} +share/{name}$", text, re.M), text
    get = ["get", str(atorrent), "--dest", str(tmp_path / "d"), "--state", str(tmp_path / "s")]
    proc = run_anomos(*get, "--only", "0,3", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == "anomos: error: no file 3 in 'share': it has 3 (see `anomos info`)"
    with pytest.raises(ConfigError, match="not both"):
        _chosen_files(m, frozenset({0}), frozenset({1}))
    assert _chosen_files(m, None, frozenset({1})) == {0, 2}
    assert _chosen_files(m, frozenset({1}), None) == {1}
    assert _chosen_files(m, None, None) == {0, 1, 2}
    for bad in ("zero", "-1", ","):
        with pytest.raises(click.BadParameter, match="give file indices like 0,3,4"):
            _file_indices(None, None, bad)  # type: ignore[arg-type]
    assert _file_indices(None, None, "2, 0") == {0, 2}  # type: ignore[arg-type]


def test_high_priority_pieces_arrive_first_and_low_ones_last(
    tmp_path: Path,
    sessions: list[TorrentSession],  # noqa: F811
) -> None:
    m, content = selection_torrent(tmp_path)
    seeder = new_session(sessions, m, tmp_path / "seed")
    rec = Recorder()
    leech = TorrentSession(
        m, tmp_path / "leech", plugins=get_plugins(load_entrypoints=False, extra=[rec])
    )
    leech.set_priority([C], Priority.HIGH)
    leech.set_priority([A], Priority.LOW)
    leech.start()
    sessions.append(leech)
    connect(seeder, leech, "leech", "seeder")
    assert leech.wait_complete(timeout=30)
    order = rec.verified
    assert sorted(order) == list(range(13))
    # c.bin's pieces (10 is shared with b.bin: the higher priority wins), then b.bin's
    # (2 is shared with a.bin), then what only the low-priority a.bin holds
    assert set(order[:3]) == {10, 11, 12} and set(order[-2:]) == {0, 1}, order
    assert (tmp_path / "leech" / "share" / "a.bin").read_bytes() == content["a.bin"]
