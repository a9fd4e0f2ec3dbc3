"""``anomos make``, ``info`` and ``anonymize`` run as real subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import libtorrent as lt
import pytest

from anomos import bencode
from anomos.testing import anomos_cmd, run_anomos

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TRACKER = "https://127.0.0.1:8443/"
FP = hashlib.sha256(b"tracker").hexdigest()


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anomos: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    (root / "docs" / "deep").mkdir(parents=True)
    rng = random.Random(4)
    (root / "docs" / "deep" / "report.pdf").write_bytes(rng.randbytes(50_000))
    (root / "music.ogg").write_bytes(rng.randbytes(123_457))
    return root


def unwrap(atorrent: bytes) -> bytes:
    """The info dict of an .atorrent as a plain torrent (to check it with libtorrent)."""
    return bencode.encode({b"info": bencode.decode(atorrent)[b"anomos-info"]})


def lt_reference(root: Path, piece_length: int) -> bytes:
    files = sorted(lt.list_files(str(root)), key=lambda f: f.filename.encode())
    ct = lt.create_torrent(files, piece_length, flags=lt.create_torrent.v1_only)
    ct.add_tracker("udp://open.tracker.example:6969/announce")
    ct.add_url_seed("https://cdn.example/files/")
    ct.set_comment("made by bob")
    lt.set_piece_hashes(ct, str(root.parent))
    return bytes(lt.bencode(ct.generate()))


def test_make_then_info_matches_libtorrent(share: Path, tmp_path: Path):
    out = tmp_path / "share.atorrent"
    proc = run_anomos(
        "make", str(share), "--tracker", TRACKER, "-o", str(out), "--piece-size", "32K",
        "--fingerprint", FP,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    reference = lt.load_torrent_buffer(lt_reference(share, 32768)).ti.info_hashes().v1
    with pytest.raises(RuntimeError, match="info"):
        lt.load_torrent_buffer(out.read_bytes())  # BitTorrent clients refuse an .atorrent
    ours = lt.load_torrent_buffer(unwrap(out.read_bytes()))
    assert ours.ti.info_hashes().v1 == reference
    assert str(reference) in proc.stdout

    proc = run_anomos("info", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["infohash"] == str(reference)
    assert info["name"] == "share"
    assert info["length"] == 173_457
    assert info["piece_length"] == 32768 and info["piece_count"] == 6
    assert info["trackers"] == [TRACKER] and info["fingerprint"] == FP
    assert [(f["path"], f["length"], f["offset"]) for f in info["files"]] == [
        ("share/docs/deep/report.pdf", 50_000, 0),
        ("share/music.ogg", 123_457, 50_000),
    ]

    text = run_anomos("info", str(out))
    assert text.returncode == 0 and str(reference) in text.stdout
    assert "share/music.ogg" in text.stdout


def test_make_single_file_with_progress_bar(share: Path, tmp_path: Path):
    out = tmp_path / "one.atorrent"
    target = share / "music.ogg"
    env = dict(os.environ, ANOMOS_PROGRESS="1")
    proc = subprocess.run(
        anomos_cmd("make", str(target), "-t", TRACKER, "--fingerprint", FP, "-o", str(out)),
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "hashing music.ogg" in proc.stderr and "100%" in proc.stderr
    files = [lt.create_file_entry("music.ogg", 123_457)]
    ct = lt.create_torrent(files, 0, flags=lt.create_torrent.v1_only)
    lt.set_piece_hashes(ct, str(share))
    expected = lt.load_torrent_buffer(bytes(lt.bencode(ct.generate()))).ti.info_hashes().v1
    assert lt.load_torrent_buffer(unwrap(out.read_bytes())).ti.info_hashes().v1 == expected


def test_anonymize_keeps_infohash_and_drops_trackers(share: Path, tmp_path: Path):
    plain = tmp_path / "plain.torrent"
    plain.write_bytes(lt_reference(share, 16384))
    before = plain.read_bytes()
    out = tmp_path / "anon.atorrent"
    proc = run_anomos("anonymize", str(plain), "-t", TRACKER, "--fingerprint", FP, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert plain.read_bytes() == before
    plain_atp = lt.load_torrent_buffer(before)
    anon_atp = lt.load_torrent_buffer(unwrap(out.read_bytes()))
    assert anon_atp.ti.info_hashes().v1 == plain_atp.ti.info_hashes().v1
    assert list(anon_atp.trackers) == [] and list(anon_atp.url_seeds) == []
    data = out.read_bytes()
    assert b"open.tracker" not in data and b"cdn.example" not in data and b"bob" not in data
    assert bencode.decode(data)[b"anomos"][b"fingerprint"] == FP.encode()


def test_outputs_never_overwrite_inputs(share: Path, tmp_path: Path):
    plain = tmp_path / "plain.torrent"
    plain.write_bytes(lt_reference(share, 16384))
    before = plain.read_bytes()
    proc = run_anomos(
        "anonymize", str(plain), "-t", TRACKER, "--fingerprint", FP, "-o", str(plain), "--force"
    )
    assert_clean_error(proc, "is the input file")
    assert plain.read_bytes() == before

    proc = run_anomos(
        "make", str(share), "-t", TRACKER, "--fingerprint", FP, "-o", str(share / "x.atorrent")
    )
    assert_clean_error(proc, "inside the shared path")
    assert not (share / "x.atorrent").exists()

    existing = tmp_path / "existing.atorrent"
    existing.write_bytes(b"keep me")
    proc = run_anomos("make", str(share), "-t", TRACKER, "--fingerprint", FP, "-o", str(existing))
    assert_clean_error(proc, "--force")
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "existing.atorrent",
        "plain.torrent",
        "share",
    ]


def test_bad_input_gives_one_line_and_exit_2(share: Path, tmp_path: Path):
    hostile = tmp_path / "evil.atorrent"
    info = {
        b"files": [{b"length": 5, b"path": [b"..", b"..", b".bashrc"]}],
        b"name": b"x",
        b"piece length": 16384,
        b"pieces": b"\0" * 20,
    }
    hostile.write_bytes(bencode.encode({b"info": info}))
    assert_clean_error(run_anomos("info", str(hostile)), "evil.atorrent", "path[0]")
    hostile.write_bytes(b"d4:infod4:name")
    assert_clean_error(run_anomos("info", str(hostile), "--json"), "bencode")
    assert_clean_error(run_anomos("info", str(tmp_path / "missing")), "cannot read")
    assert_clean_error(
        run_anomos(
            "anonymize", str(hostile), "-t", TRACKER, "--fingerprint", FP, "-o", str(tmp_path / "o")
        ),
        "bencode",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(
        run_anomos(
            "make",
            str(empty),
            "-t",
            TRACKER,
            "--fingerprint",
            FP,
            "-o",
            str(tmp_path / "e.atorrent"),
        ),
        "no files",
    )
    assert_clean_error(
        run_anomos(
            "make",
            str(share),
            "-t",
            "http://x/",
            "--fingerprint",
            FP,
            "-o",
            str(tmp_path / "h.atorrent"),
        ),
        "https://",
    )
    assert_clean_error(
        run_anomos(
            "make",
            str(share),
            "-t",
            TRACKER,
            "--fingerprint",
            FP,
            "-o",
            str(tmp_path / "p"),
            "--piece-size",
            "3M",
        ),
        "power of two",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "evil.atorrent", "share"]


def test_help_for_each_command():
    needles = {
        "make": ["--tracker", "--piece-size", "--fingerprint", "--output"],
        "info": ["--json"],
        "anonymize": ["--tracker", "--fingerprint", "--output"],
    }
    for command, wanted in needles.items():
        proc = run_anomos(command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"Usage: anomos {command} ")
        for needle in wanted:
            assert needle in proc.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["info", "--bogus"], "No such option '--bogus' (see anomos info --help)"),
        (["frob"], "No such command 'frob' (see anomos --help)"),
        (["info"], "Missing argument 'FILE' (see anomos info --help)"),
    ],
)
def test_usage_errors_are_one_line(argv, needle):
    proc = run_anomos(*argv)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"anomos: error: {needle}"]
