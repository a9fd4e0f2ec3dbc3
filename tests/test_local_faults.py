"""Local faults (issues 11.10 and 12): files, modes, locks, preflight, words, TLS goodbyes.

Each test performs the fault for real (processes, a planted symlink, a
read-only or tiny mount, a client cutting its TLS connection) and fails on the
code before the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomos import bencode
from anomos.errors import ConfigError, StorageError
from anomos.fsutil import atomic_write, lock_state_dir, private_dir
from anomos.identity import PeerIdentity
from anomos.testing import anomos_cmd, loopback_host, run_anomos
from anomos.torrent import resume
from anomos.torrent.metainfo import Metainfo, make_metainfo
from anomos.torrent.storage import Storage
from anomos.tracker.identity import TrackerIdentity
from anomos.tracker.store import DB_FILE, Store

FP = hashlib.sha256(b"some tracker").hexdigest()
PACKAGE = Path(__file__).resolve().parent.parent / "anomos"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anomos: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def silent_tracker() -> Iterator[tuple[str, socket.socket]]:
    """A tracker URL whose port accepts TCP but answers nothing: counts who asked."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield f"https://127.0.0.1:{sock.getsockname()[1]}/announce", sock
    sock.close()


def asked(sock: socket.socket) -> bool:
    """Whether anything connected to the silent tracker."""
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def atorrent_for(tmp_path: Path, size: int, url: str = "https://127.0.0.1:9/announce") -> Path:
    data = tmp_path / "song.ogg"
    data.write_bytes(os.urandom(size))
    out = tmp_path / "song.atorrent"
    make_metainfo(data, trackers=[url], fingerprint=FP, progress=False).save(out)
    return out


# ----------------------------------------------------------------------------- one atomic write


def test_atomic_write_sets_mode_whatever_the_umask_and_leaves_nothing(tmp_path: Path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "public", b"a", mode=0o644)
    finally:
        os.umask(0o000)
    try:
        atomic_write(tmp_path / "private", b"b")
    finally:
        os.umask(old)
    assert (mode(tmp_path / "public"), mode(tmp_path / "private")) == (0o644, 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private", "public"]
    assert not atomic_write(tmp_path / "private", b"new", replace=False)
    assert (tmp_path / "private").read_bytes() == b"b"
    assert atomic_write(tmp_path / "private", b"new")
    assert (tmp_path / "private").read_bytes() == b"new"


def test_a_failed_atomic_write_keeps_the_old_content(tmp_path: Path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)  # a disk failing under the write
    with pytest.raises(StorageError, match=f"cannot write {target}: Input/output error"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_no_other_atomic_write_in_the_package():
    """One helper, one guarantee: no rename or link dance outside anomos/fsutil.py."""
    pattern = re.compile(r"os\.(replace|rename|link)\(|\.(replace|rename)\((tmp|path)")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "fsutil.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


# ----------------------------------------------------------------------------- modes (11.10)


def test_state_directories_are_private_and_tightened(tmp_path: Path):
    peer_state = tmp_path / "peer"
    peer_state.mkdir(mode=0o755)
    os.chmod(peer_state, 0o755)
    private_dir(peer_state)
    PeerIdentity.load_or_create(peer_state)
    assert mode(peer_state) == 0o700 and mode(peer_state / "identity.json") == 0o600

    fresh = tmp_path / "fresh" / "peer"
    PeerIdentity.load_or_create(fresh)
    assert mode(fresh) == 0o700

    tracker_state = tmp_path / "tracker"
    tracker_state.mkdir()
    os.chmod(tracker_state, 0o755)
    TrackerIdentity.load_or_create(tracker_state)
    assert mode(tracker_state) == 0o700


def test_resume_files_are_private(tmp_path: Path):
    meta = Metainfo.load(atorrent_for(tmp_path, 40_000))
    resume_dir = tmp_path / "state" / "resume"
    resume.save(resume_dir, meta, bytearray(meta.piece_count), [None])
    assert mode(resume_dir) == 0o700
    assert mode(resume.resume_path(resume_dir, meta)) == 0o600


def test_tracker_database_is_private(tmp_path: Path):
    old = os.umask(0o022)
    try:
        Store(tmp_path).close()
        assert mode(tmp_path / DB_FILE) == 0o600
        os.chmod(tmp_path / DB_FILE, 0o644)
        store = Store(tmp_path)  # an older database is tightened on start
        try:
            for suffix in ("", "-wal", "-shm"):
                path = tmp_path / (DB_FILE + suffix)
                if path.exists():
                    assert mode(path) == 0o600, path
        finally:
            store.close()
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- symlinks (11.10)


@pytest.mark.parametrize("where", ["top", "nested"])
def test_symlink_planted_under_dest_after_start_creates_nothing_outside(tmp_path: Path, where: str):
    """Storage.finish() (empty files) and write_piece() followed a symlink planted
    under --dest after the session started, creating files outside --dest."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (share / "sub" / "data.bin").write_bytes(os.urandom(20_000))
    (share / "sub" / "empty").write_bytes(b"")
    meta = make_metainfo(share, trackers=["https://t.example/a"], fingerprint=FP, progress=False)
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    storage = Storage(meta, dest)  # the session has started
    if where == "top":
        (dest / "share").symlink_to(outside)
    else:
        (dest / "share").mkdir()
        (dest / "share" / "sub").symlink_to(outside)
    with pytest.raises(StorageError, match="symlink"):
        storage.finish()
    piece = (share / "sub" / "data.bin").read_bytes()[: meta.piece_length]
    with pytest.raises(StorageError, match="symlink"):
        storage.write_piece(0, piece)
    storage.close()
    assert list(outside.iterdir()) == []


# ----------------------------------------------------------------------------- the state lock


def test_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path):
    state = tmp_path / "state"
    code = (
        "import sys, time; from anomos.fsutil import lock_state_dir;"
        "lock_state_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(state)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError, match=f"{state} is in use .*pid {holder.pid}"):
            lock_state_dir(state)
    finally:
        holder.kill()
        holder.wait()
    with lock_state_dir(state) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held
    assert mode(state) == 0o700


@pytest.mark.slow
@pytest.mark.integration
def test_a_second_process_on_one_state_dir_is_refused(tmp_path: Path):
    closed = socket.socket()  # bound, not listening: the tracker refuses at once
    closed.bind(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{closed.getsockname()[1]}/announce"
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    env = dict(os.environ, ANOMOS_PROGRESS="0")
    first = subprocess.Popen(
        anomos_cmd("relay", url, "--fingerprint", FP, "--state", str(state),
                   "--listen", f"{loopback_host()}:0"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: (state / "peer.json").exists() or first.poll() is not None, "peer.json")
        assert first.poll() is None, first.communicate()[1]
        assert mode(state) == 0o700  # tightened on start
        assert mode(state / "peer.json") == 0o600
        atorrent = atorrent_for(tmp_path, 40_000, url)
        second = run_anomos(
            "get", str(atorrent), "--dest", str(tmp_path / "d"), "--state", str(state),
            "--listen", f"{loopback_host()}:0", "--timeout", "10",
        )  # fmt: skip
        one_line_error(second, str(state), f"pid {first.pid}")
        tracker = run_anomos("tracker", "--state", str(state), "--listen", "127.0.0.1:0")
        one_line_error(tracker, str(state), f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        closed.close()


# ----------------------------------------------------------------------------- fail at once


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root)."""
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "size=1m,mode=0755")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only mount as root (permission bits do not stop root), else mode 0555."""
    mnt = tmp_path / "ro"
    if os.geteuid() != 0:
        mnt.mkdir()
        os.chmod(mnt, 0o555)
        yield mnt
        os.chmod(mnt, 0o755)
        return
    _mount_tmpfs(mnt, "size=1m,ro")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
@pytest.mark.integration
def test_get_into_a_read_only_dest_fails_at_once(tmp_path: Path, read_only_dir, silent_tracker):
    """It built and dropped 57 circuits for 20-30 s, then exited 1."""
    url, sock = silent_tracker
    atorrent = atorrent_for(tmp_path, 40_000, url)
    proc = run_anomos(
        "get", str(atorrent), "--dest", str(read_only_dir), "--state", str(tmp_path / "s"),
        "--listen", f"{loopback_host()}:0", "--timeout", "15",
    )  # fmt: skip
    line = one_line_error(proc, str(read_only_dir))
    assert "Read-only file system" in line or "Permission denied" in line
    assert not asked(sock), "the tracker was asked before the destination was checked"


@pytest.mark.slow
@pytest.mark.integration
def test_get_with_no_room_fails_at_once(tmp_path: Path, small_mount, silent_tracker):
    """A full disk made get warn every 5 s forever."""
    url, sock = silent_tracker
    atorrent = atorrent_for(tmp_path, 3 * 1024 * 1024, url)
    proc = run_anomos(
        "get", str(atorrent), "--dest", str(small_mount / "d"), "--state", str(tmp_path / "s"),
        "--listen", f"{loopback_host()}:0", "--timeout", "15",
    )  # fmt: skip
    one_line_error(proc, "not enough space", str(small_mount / "d"), f"{3 * 1024 * 1024:,}")
    assert not asked(sock), "the tracker was asked before the free space was checked"
    assert list((small_mount / "d").iterdir()) == []


# ----------------------------------------------------------------------------- wrong words


@pytest.mark.slow
@pytest.mark.integration
def test_words_name_the_file_and_the_way_out(tmp_path: Path):
    data = tmp_path / "song.ogg"
    data.write_bytes(os.urandom(40_000))
    # make without --fingerprint made an .atorrent that get and seed then refused
    proc = run_anomos("make", str(data), "-t", "https://127.0.0.1:9/a", "-o", str(tmp_path / "x"))
    one_line_error(proc, "--fingerprint")
    assert not (tmp_path / "x").exists()

    plain = tmp_path / "plain.torrent"
    meta = make_metainfo(data, trackers=["https://t.example/a"], progress=False)
    plain.write_bytes(bencode.encode({b"announce": b"http://t.example/", b"info": meta.info}))
    common = ["--dest", str(tmp_path / "d"), "--state", str(tmp_path / "s")]
    one_line_error(run_anomos("get", str(plain), *common), str(plain), "anomos anonymize")

    legacy = tmp_path / "old.atorrent"
    anomos = {b"version": 1, b"trackers": [b"https://t.example/a"], b"fingerprint": FP.encode()}
    legacy.write_bytes(bencode.encode({b"anomos": anomos, b"info": meta.info}))
    shown = run_anomos("info", str(legacy))
    assert shown.returncode == 0 and "format:       1 (old" in shown.stdout, shown.stderr

    truncated = tmp_path / "cut.atorrent"
    full = atorrent_for(tmp_path, 40_000).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    line = one_line_error(run_anomos("get", str(truncated), *common), str(truncated))
    assert "truncated or corrupt" in line


# ----------------------------------------------------------------------------- TLS goodbyes


def _tls(port: int) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))


@pytest.mark.slow
@pytest.mark.integration
def test_clients_closing_mid_connection_print_no_traceback(tmp_path: Path):
    """Every finished get made the tracker print a 30-line ssl.SSLEOFError traceback."""
    state = tmp_path / "t"
    err = tmp_path / "tracker.err"
    with open(err, "w") as stderr:
        tracker = subprocess.Popen(
            anomos_cmd("tracker", "--state", str(state), "--listen", "127.0.0.1:0"),
            stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ, ANOMOS_PROGRESS="0"),
        )  # fmt: skip
    try:
        wait_for(lambda: (state / "tracker.json").exists(), "tracker.json")
        url = json.loads((state / "tracker.json").read_text())["url"]
        port = urllib.parse.urlsplit(url).port
        assert port is not None
        for _ in range(3):
            _tls(port).close()  # handshake, then gone
            half = _tls(port)
            half.sendall(b"GET /announce HTTP/1.1\r\nHost: t\r\n")  # half a request, then gone
            half.close()
            cut = _tls(port)
            cut.sendall(b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n")
            cut.close()  # before the reply
        good = _tls(port)
        good.sendall(b"GET /stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert good.recv(12) == b"HTTP/1.1 200"
        good.close()
    finally:
        tracker.send_signal(signal.SIGTERM)
        tracker.wait(30)
    text = err.read_text()
    assert "Traceback" not in text and "SSLEOFError" not in text, text
