"""A running torrent's waits show as Transmission's error fields (issue 12: "the daemon
shows it as the torrent's error state"), without stopping the torrent."""

from __future__ import annotations

import logging
import types
from pathlib import Path

from anomos.backoff import Waiting
from anomos.daemon.core import ErrorKind, Torrent
from anomos.daemon.rpc import FIELDS
from anomos.torrent.metainfo import make_metainfo

FINGERPRINT = "ab" * 32


def torrent(tmp_path: Path) -> Torrent:
    data = tmp_path / "file.bin"
    data.write_bytes(b"x" * 40_000)
    meta = make_metainfo(
        data, trackers=["https://127.0.0.1:1/announce"], fingerprint=FINGERPRINT, progress=False
    )
    return Torrent(id=1, metainfo=meta, download_dir=tmp_path, added_date=0)


def running(t: Torrent, disk: str, tracker: Waiting) -> None:
    """A stand-in for the running TorrentDownload: only what ``problem`` reads."""
    t.download = types.SimpleNamespace(  # type: ignore[assignment]
        disk_problem=lambda: disk, peer=types.SimpleNamespace(tracker_wait=tracker)
    )


def fields(t: Torrent) -> tuple[int, str]:
    return FIELDS["error"](t), FIELDS["errorString"](t)


def test_a_down_tracker_is_a_tracker_warning_and_a_full_disk_a_local_error(tmp_path):
    t = torrent(tmp_path)
    tracker = Waiting("waiting for the tracker", logging.getLogger("test"))
    running(t, "", tracker)
    assert fields(t) == (0, "")
    tracker.enter("cannot reach the tracker: connection refused")
    error, text = fields(t)
    assert error == ErrorKind.TRACKER_WARNING
    assert text.startswith("waiting for the tracker since ") and "connection refused" in text
    running(t, "cannot write since 10:22:01 (No space left on device)", tracker)
    assert fields(t) == (
        ErrorKind.LOCAL_ERROR,
        "cannot write since 10:22:01 (No space left on device)",
    )
    running(t, "", tracker)
    tracker.leave()
    assert fields(t) == (0, "")


def test_a_failure_that_stopped_the_torrent_wins(tmp_path):
    t = torrent(tmp_path)
    tracker = Waiting("waiting for the tracker", logging.getLogger("test"))
    tracker.enter("down")
    running(t, "", tracker)
    t.error, t.error_string = ErrorKind.LOCAL_ERROR, "cannot create /x: Permission denied"
    assert fields(t) == (ErrorKind.LOCAL_ERROR, "cannot create /x: Permission denied")
