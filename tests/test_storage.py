"""Storage (pieces across files, verification before disk, safety) and resume data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from anomos.errors import StorageError
from anomos.torrent import resume
from anomos.torrent.metainfo import Metainfo, make_metainfo
from anomos.torrent.storage import Storage
from anomos.torrent.wire import BLOCK_SIZE

PIECE = 2 * BLOCK_SIZE
#: Odd sizes so pieces straddle file boundaries; one empty file; one file
#: smaller than a block inside a piece.
FILES = {
    "a.bin": 50_001,
    "sub/b.bin": 7,
    "sub/empty": 0,
    "sub/deep/c.bin": 70_000,
    "z.bin": 12_345,
}


def write_files(root: Path, sizes: dict[str, int], seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    out = {}
    for rel, size in sizes.items():
        data = rng.randbytes(size)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[rel] = data
    return out


def make_torrent(tmp_path: Path, sizes: dict[str, int] = FILES) -> tuple[Metainfo, Path, dict]:
    """A multi-file torrent seeded at ``tmp_path/seed/data``."""
    seed_root = tmp_path / "seed"
    content = write_files(seed_root / "data", sizes)
    m = make_metainfo(
        seed_root / "data",
        trackers=["https://tracker.example/announce"],
        piece_length=PIECE,
        progress=False,
    )
    return m, seed_root, content


def file_index(m: Metainfo, rel: str) -> int:
    return next(i for i, f in enumerate(m.files) if "/".join(f.path[1:]) == rel)


def concat(content: dict[str, bytes]) -> bytes:
    # make_metainfo orders files by path
    return b"".join(content[k] for k in sorted(content, key=lambda k: k.encode()))


def test_pieces_span_file_boundaries(tmp_path: Path) -> None:
    m, seed_root, content = make_torrent(tmp_path)
    whole = concat(content)
    seeder = Storage(m, seed_root)
    assert seeder.check_all() == bytearray([1] * len(m.pieces))
    # piece 1 holds the tail of a.bin, all of sub/b.bin and the head of sub/deep/c.bin
    assert seeder.piece_files(1) == {
        file_index(m, "a.bin"),
        file_index(m, "sub/b.bin"),
        file_index(m, "sub/deep/c.bin"),
    }
    leech = Storage(m, tmp_path / "leech")
    order = list(range(len(m.pieces)))
    random.Random(2).shuffle(order)
    for i in order:
        piece = seeder.read_block(i, 0, m.piece_size(i))
        assert piece == whole[i * PIECE : i * PIECE + m.piece_size(i)]
        assert leech.write_piece(i, piece)
    leech.finish()
    for rel, data in content.items():
        assert (tmp_path / "leech" / "data" / rel).read_bytes() == data
    assert leech.read_block(3, BLOCK_SIZE, 100) == whole[3 * PIECE + BLOCK_SIZE :][:100]
    seeder.close()
    leech.close()


def test_blocks_of_a_piece_cost_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, seed_root, content = make_torrent(tmp_path, {"one.bin": 5 * PIECE + 100})
    whole = concat(content)
    seeder = Storage(m, seed_root)
    reads = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, at: int) -> bytes:
        reads.append((n, at))
        return real_pread(fd, n, at)

    monkeypatch.setattr(os, "pread", counting_pread)
    for i in (0, 1, 0, 5):  # blocks in any order; a piece read again after another
        size = m.piece_size(i)
        for begin in range(0, size, BLOCK_SIZE):
            n = min(BLOCK_SIZE, size - begin)
            assert seeder.read_block(i, begin, n) == whole[i * PIECE + begin :][:n]
    assert reads == [(PIECE, 0), (PIECE, PIECE), (PIECE, 0), (100, 5 * PIECE)]
    with pytest.raises(StorageError, match="outside the piece"):
        seeder.read_block(5, 0, 101)
    seeder.close()


def test_single_file_torrent_lives_at_root_slash_name(tmp_path: Path) -> None:
    (tmp_path / "one.iso").write_bytes(b"x" * 100_000)
    m = make_metainfo(
        tmp_path / "one.iso", trackers=["https://t.example/a"], piece_length=PIECE, progress=False
    )
    s = Storage(m, tmp_path / "dl")
    for i in range(len(m.pieces)):
        assert s.write_piece(i, b"x" * m.piece_size(i))
    s.close()
    assert (tmp_path / "dl" / "one.iso").read_bytes() == b"x" * 100_000


def test_a_bad_piece_never_reaches_disk(tmp_path: Path) -> None:
    m, seed_root, _ = make_torrent(tmp_path)
    good = Storage(m, seed_root).read_block(0, 0, PIECE)
    leech = Storage(m, tmp_path / "leech")
    bad = bytearray(good)
    bad[100] ^= 1
    assert not leech.write_piece(0, bad)
    assert not leech.write_piece(0, good[:-1])  # wrong length
    assert not (tmp_path / "leech").exists()
    assert leech.write_piece(0, good)
    assert (tmp_path / "leech" / "data" / "a.bin").stat().st_size == PIECE  # sparse, lazy
    assert not (tmp_path / "leech" / "data" / "z.bin").exists()


def test_check_piece_detects_corruption_and_missing_files(tmp_path: Path) -> None:
    m, seed_root, _ = make_torrent(tmp_path)
    path = seed_root / "data" / "sub" / "deep" / "c.bin"
    with open(path, "r+b") as f:
        f.seek(5)
        byte = f.read(1)
        f.seek(5)
        f.write(bytes([byte[0] ^ 0xFF]))
    s = Storage(m, seed_root)
    offset = m.files[file_index(m, "sub/deep/c.bin")].offset + 5
    bad = offset // PIECE
    have = s.check_all()
    assert [i for i, f in enumerate(have) if not f] == [bad]
    assert s.checks == len(m.pieces)
    (seed_root / "data" / "z.bin").unlink()
    s2 = Storage(m, seed_root)
    assert not s2.check_piece(len(m.pieces) - 1)
    with pytest.raises(StorageError, match="missing from disk"):
        s2.read_block(len(m.pieces) - 1, 0, 10)


def test_larger_existing_file_is_refused_not_truncated(tmp_path: Path) -> None:
    m, _, _ = make_torrent(tmp_path)
    target = tmp_path / "leech" / "data" / "a.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"precious" * 10_000)
    with pytest.raises(StorageError, match="larger than the torrent") as exc:
        Storage(m, tmp_path / "leech")
    assert "\n" not in str(exc.value)
    assert target.read_bytes() == b"precious" * 10_000


def test_symlink_escaping_data_root_is_refused(tmp_path: Path) -> None:
    m, _, _ = make_torrent(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "leech").mkdir()
    os.symlink(outside, tmp_path / "leech" / "data")
    with pytest.raises(StorageError, match="resolves outside"):
        Storage(m, tmp_path / "leech")


def test_folder_where_a_file_belongs_is_refused(tmp_path: Path) -> None:
    m, _, _ = make_torrent(tmp_path)
    (tmp_path / "leech" / "data" / "z.bin").mkdir(parents=True)
    with pytest.raises(StorageError, match="not a regular file"):
        Storage(m, tmp_path / "leech")


# ----------------------------------------------------------------------------- resume


def test_resume_round_trip_and_plan(tmp_path: Path) -> None:
    m, seed_root, _ = make_torrent(tmp_path)
    s = Storage(m, seed_root)
    have = s.check_all()
    resume.save(tmp_path / "r", m, have, s.file_stats())
    saved = resume.load(tmp_path / "r", m)
    assert saved is not None and saved.have == bytes(have)
    trusted, recheck = resume.plan(m, saved, s.file_stats())
    assert trusted == have and recheck == []
    # touch c.bin: only the pieces holding its bytes are re-checked
    c = seed_root / "data" / "sub" / "deep" / "c.bin"
    st = c.stat()
    os.utime(c, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    trusted, recheck = resume.plan(m, saved, s.file_stats())
    expected = list(resume.pieces_of_file(m, file_index(m, "sub/deep/c.bin")))
    assert 1 < len(expected) < len(m.pieces) - 1
    assert recheck == expected
    assert all(trusted[i] == 0 for i in expected)
    assert all(trusted[i] == 1 for i in range(len(m.pieces)) if i not in expected)


def test_without_resume_only_existing_files_are_checked(tmp_path: Path) -> None:
    m, _, _ = make_torrent(tmp_path)
    s = Storage(m, tmp_path / "empty")
    have, recheck = resume.plan(m, None, s.file_stats())
    assert recheck == [] and not any(have)


@pytest.mark.parametrize(
    "text",
    [
        "not json{",
        "[]",
        '{"version": 99}',
        '{"version": 1, "infohash": "00"}',
        "CORRUPT_HAVE",
        "WRONG_FILES",
    ],
)
def test_corrupt_resume_data_is_ignored(tmp_path: Path, text: str) -> None:
    m, seed_root, _ = make_torrent(tmp_path)
    s = Storage(m, seed_root)
    resume.save(tmp_path / "r", m, s.check_all(), s.file_stats())
    path = resume.resume_path(tmp_path / "r", m)
    if text == "CORRUPT_HAVE":
        doc = json.loads(path.read_text())
        doc["have"] = "zz"
        text = json.dumps(doc)
    elif text == "WRONG_FILES":
        doc = json.loads(path.read_text())
        doc["files"] = doc["files"][:-1]
        text = json.dumps(doc)
    path.write_text(text)
    assert resume.load(tmp_path / "r", m) is None


def test_sync_lets_the_event_loop_run_while_the_disk_flushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fsync of a download's last seconds took up to 0.84 s on the WAN bench;
    # done in the event loop it stopped every circuit's reads and requests. A
    # stand-in fsync that returns only once the loop has ticked, or after 5 s.
    import gevent
    from gevent import monkey

    real_sleep = monkey.get_original("time", "sleep")
    ticks = [0]
    fsynced: list[int] = []

    def slow_fsync(fd: int) -> None:
        for _ in range(500):
            if ticks[0] >= 3:
                break
            real_sleep(0.01)
        fsynced.append(ticks[0])

    def ticker() -> None:
        while True:
            ticks[0] += 1
            gevent.sleep(0.005)

    m, seed_root, _ = make_torrent(tmp_path)
    good = Storage(m, seed_root).read_block(0, 0, PIECE)
    leech = Storage(m, tmp_path / "leech")
    assert leech.write_piece(0, good)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    ticking = gevent.spawn(ticker)
    try:
        gevent.sleep(0)
        ticks[0] = 0
        leech.sync()
    finally:
        ticking.kill()
    assert len(fsynced) == 1 and fsynced[0] >= 3  # flushed, while the loop went on
    leech.sync()
    assert len(fsynced) == 1  # ... once: nothing written since
