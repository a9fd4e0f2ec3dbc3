"""The daemon: one peer (one identity, one tracker network) running many torrents.

Each torrent has a typed :class:`Status` (numbered as Transmission numbers
them), an error kind and message, and a task greenlet that checks its data
(resume data first), downloads it over circuits and then seeds it. The list of
torrents, their paused flags and lifetime counters live in ``daemon.json``
(written atomically on every change and every few seconds), each torrent's
metainfo in ``torrents/<infohash>.atorrent`` and its verified pieces in the
peer's resume data: a restart brings every torrent back as it was, without
re-hashing data that has not changed.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import gevent
import gevent.event

from anomos.config import Settings
from anomos.errors import AnomosError, StorageError
from anomos.fsutil import atomic_write, private_dir
from anomos.torrent import resume
from anomos.torrent.metainfo import Metainfo
from anomos.torrent.storage import Storage

if TYPE_CHECKING:
    from anomos.daemon.config import DaemonConfig
    from anomos.peer.download import TorrentDownload
    from anomos.peer.node import Peer
    from anomos.pluginmanager import Plugins
    from anomos.torrent.session import TorrentSession

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: Seconds between periodic writes of daemon.json (counters; pieces have their own resume saves).
STATE_SAVE_INTERVAL = 10.0
#: Bytes an .atorrent given to the daemon may have.
MAX_METAINFO_SIZE = 16 * 1024 * 1024
#: Seconds a torrent counts as "recently active" after a change or traffic.
RECENT_SECONDS = 60.0


class Status(enum.IntEnum):
    """A torrent's state, as Transmission's RPC numbers it."""

    STOPPED = 0
    CHECK_WAIT = 1
    CHECKING = 2
    DOWNLOAD_WAIT = 3
    DOWNLOADING = 4
    SEED_WAIT = 5
    SEEDING = 6


class ErrorKind(enum.IntEnum):
    """Transmission's ``error`` field: what kind of problem ``errorString`` names."""

    OK = 0
    TRACKER_WARNING = 1
    TRACKER_ERROR = 2
    LOCAL_ERROR = 3


@attrs.define(eq=False)
class Torrent:
    """One torrent of the daemon; ``session`` exists while it runs."""

    id: int
    metainfo: Metainfo = attrs.field(repr=False)
    download_dir: Path
    added_date: int
    paused: bool = False
    done_date: int = 0
    status: Status = Status.STOPPED
    error: ErrorKind = ErrorKind.OK
    error_string: str = ""
    #: Payload bytes up and down in earlier runs (the running session adds its own).
    uploaded_before: int = 0
    downloaded_before: int = 0
    session: TorrentSession | None = attrs.field(default=None, repr=False)
    download: TorrentDownload | None = attrs.field(default=None, repr=False)
    task: gevent.Greenlet | None = attrs.field(default=None, repr=False)
    changed_at: float = attrs.field(factory=time.monotonic, repr=False)
    #: Pieces hashed when it last started (0 when the resume data covered everything).
    rechecked: int = 0
    #: One 0/1 flag per piece, verified when it last ran (None: nothing known yet).
    stopped_have: bytes | None = attrs.field(default=None, repr=False)

    def has_piece(self, index: int) -> bool:
        if self.session is not None:
            return self.session.has_piece(index)
        return bool(self.stopped_have[index]) if self.stopped_have is not None else False

    @property
    def left(self) -> int:
        """Bytes still to download (as of its last run when it is stopped)."""
        if self.session is not None:
            return self.session.left
        m = self.metainfo
        return sum(m.piece_size(i) for i in range(len(m.pieces)) if not self.has_piece(i))

    @property
    def infohash(self) -> str:
        return self.metainfo.infohash.hex()

    @property
    def uploaded_ever(self) -> int:
        return self.uploaded_before + (self.session.uploaded if self.session else 0)

    @property
    def downloaded_ever(self) -> int:
        return self.downloaded_before + (self.session.downloaded if self.session else 0)

    @property
    def problem(self) -> tuple[ErrorKind, str]:
        """Transmission's ``error`` and ``errorString`` now: a failure that stopped the
        torrent, else what its running download waits for (a full disk: a local error;
        the tracker: a tracker warning), while it keeps trying."""
        if self.error != ErrorKind.OK or self.download is None:
            return self.error, self.error_string
        disk = self.download.disk_problem()
        if disk:
            return ErrorKind.LOCAL_ERROR, disk
        tracker = self.download.peer.tracker_wait
        if tracker.active:
            return ErrorKind.TRACKER_WARNING, tracker.describe()
        return ErrorKind.OK, ""

    def set_status(self, status: Status) -> None:
        if status != self.status:
            self.status = status
            self.changed_at = time.monotonic()

    def to_state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "infohash": self.infohash,
            "download_dir": str(self.download_dir),
            "added_date": self.added_date,
            "done_date": self.done_date,
            "paused": self.paused,
            "uploaded": self.uploaded_ever,
            "downloaded": self.downloaded_ever,
            "error": int(self.error),
            "error_string": self.error_string,
        }


class DaemonError(AnomosError):
    """A request the daemon refuses; the message is the RPC ``result`` string."""


@attrs.define(eq=False)
class Daemon:
    """Owns one :class:`~anomos.peer.node.Peer` and every torrent it runs."""

    plugins: Plugins
    config: DaemonConfig
    state_dir: Path
    torrents: dict[int, Torrent] = attrs.field(factory=dict, init=False)
    peer: Peer | None = attrs.field(default=None, init=False)
    started_at: float = attrs.field(factory=time.time, init=False)
    #: Ids removed lately with when (monotonic), for "recently-active" requests.
    removed: dict[int, float] = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(default=1, init=False)
    _peer_ready: gevent.event.Event = attrs.field(factory=gevent.event.Event, init=False)
    _saver: gevent.Greenlet | None = attrs.field(default=None, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "daemon.json"

    @property
    def metainfo_dir(self) -> Path:
        return self.state_dir / "torrents"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bring back the torrents of the last run (each in its state) and start the peer."""
        private_dir(self.metainfo_dir)
        if self.config.tracker:
            self._ensure_peer(self.config.tracker, self.config.fingerprint)
        self._load_state()
        self._saver = gevent.spawn(self._save_loop)

    def stop(self) -> None:
        """Stop every torrent (resume data written), say goodbye to the tracker, save state."""
        if self._stopped:
            return
        self._stopped = True
        if self._saver is not None:
            self._saver.kill()
        for torrent in self.torrents.values():
            self._halt(torrent)
        self.save_state()
        if self.peer is not None:
            self.peer.stop()
        log.info("daemon stopped: %d torrent(s) saved", len(self.torrents))

    def _save_loop(self) -> None:
        while True:
            gevent.sleep(STATE_SAVE_INTERVAL)
            try:
                self.save_state()
            except AnomosError as exc:
                log.warning("cannot save the daemon state: %s", exc)

    def save_state(self) -> None:
        doc = {
            "version": STATE_VERSION,
            "next_id": self._next_id,
            "torrents": [t.to_state() for t in sorted(self.torrents.values(), key=lambda t: t.id)],
        }
        atomic_write(self.state_file, json.dumps(doc, indent=1).encode())

    def _load_state(self) -> None:
        try:
            doc = json.loads(self.state_file.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.state_file}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
            raise StorageError(f"{self.state_file} is not a version-{STATE_VERSION} daemon state")
        self._next_id = int(doc.get("next_id", 1))
        for entry in doc.get("torrents", []):
            try:
                metainfo = Metainfo.load(self.metainfo_dir / f"{entry['infohash']}.atorrent")
                torrent = Torrent(
                    id=int(entry["id"]),
                    metainfo=metainfo,
                    download_dir=Path(entry["download_dir"]),
                    added_date=int(entry["added_date"]),
                    done_date=int(entry.get("done_date", 0)),
                    paused=bool(entry["paused"]),
                    uploaded_before=int(entry.get("uploaded", 0)),
                    downloaded_before=int(entry.get("downloaded", 0)),
                    error=ErrorKind(int(entry.get("error", 0))),
                    error_string=str(entry.get("error_string", "")),
                )
            except (AnomosError, KeyError, ValueError, TypeError) as exc:
                log.error("torrent %r from %s not restored: %s", entry, self.state_file, exc)
                continue
            runnable = True
            try:
                self._ensure_peer(*self._tracker_of(metainfo))
            except DaemonError as exc:  # kept in the list (and the file), not started
                torrent.error, torrent.error_string = ErrorKind.LOCAL_ERROR, str(exc)
                runnable = False
            self.torrents[torrent.id] = torrent
            self._next_id = max(self._next_id, torrent.id + 1)
            saved = resume.load(self.state_dir / "resume", metainfo)
            torrent.stopped_have = bytes(saved.have) if saved is not None else None
            if runnable and not torrent.paused:
                self._begin(torrent)
        log.info("restored %d torrent(s) from %s", len(self.torrents), self.state_file)

    # ------------------------------------------------------------------ the peer
    def _tracker_of(self, metainfo: Metainfo) -> tuple[str, str]:
        if not metainfo.is_anomos or not metainfo.trackers or not metainfo.fingerprint:
            raise DaemonError(
                "not an .atorrent that pins its tracker (make one with `anomos anonymize`)"
            )
        return metainfo.trackers[0], metainfo.fingerprint

    def _ensure_peer(self, url: str, fingerprint: str) -> Peer:
        """The peer, created on the first tracker; another tracker is refused (this slice)."""
        if self.peer is not None:
            if (self.peer.tracker_url, self.peer.fingerprint) != (url, fingerprint):
                raise DaemonError(
                    f"this daemon is on the tracker {self.peer.tracker_url}; torrents of "
                    f"another tracker ({url}) need a daemon of their own"
                )
            return self.peer
        from anomos.peer.node import Peer  # imported late: keeps `anomos --help` fast

        settings = Settings(
            listen=self.config.listen,
            state_dir=self.state_dir,
            upnp=self.config.upnp,
            options=self.plugins.options,
        )
        self.peer = Peer(self.plugins, settings, tracker_url=url, fingerprint=fingerprint)
        gevent.spawn(self._start_peer, self.peer)
        return self.peer

    def _start_peer(self, peer: Peer) -> None:
        try:
            peer.start()
        except AnomosError as exc:
            log.error("the peer cannot start: %s", exc)
            for torrent in self.torrents.values():
                self._fail(torrent, ErrorKind.TRACKER_ERROR, str(exc))
            return
        self._peer_ready.set()

    # ------------------------------------------------------------------ requests
    def add(
        self, data: bytes, *, paused: bool = False, download_dir: str | None = None
    ) -> tuple[Torrent, bool]:
        """Add the torrent in ``data`` (an .atorrent); (torrent, False) if it was there already."""
        if len(data) > MAX_METAINFO_SIZE:
            raise DaemonError(f"metainfo larger than {MAX_METAINFO_SIZE} bytes")
        try:
            metainfo = Metainfo.from_bytes(data)
        except AnomosError as exc:
            raise DaemonError(f"invalid or corrupt torrent file: {exc}") from None
        for torrent in self.torrents.values():
            if torrent.metainfo.infohash == metainfo.infohash:
                return torrent, False
        self._ensure_peer(*self._tracker_of(metainfo))
        where = Path(download_dir).expanduser() if download_dir else self.config.download_dir
        if not where.is_absolute():
            raise DaemonError(f"download-dir {str(where)!r} is not an absolute path")
        atomic_write(self.metainfo_dir / f"{metainfo.infohash.hex()}.atorrent", data)
        torrent = Torrent(
            id=self._next_id,
            metainfo=metainfo,
            download_dir=where,
            added_date=int(time.time()),
            paused=paused,
        )
        self._next_id += 1
        self.torrents[torrent.id] = torrent
        log.info("added torrent %d: %s (%s)", torrent.id, metainfo.name, torrent.infohash)
        if not paused:
            self._begin(torrent)
        self.save_state()
        return torrent, True

    def start_torrent(self, torrent: Torrent) -> None:
        self._ensure_peer(*self._tracker_of(torrent.metainfo))  # another network: refused
        torrent.paused = False
        if torrent.task is None:
            self._begin(torrent)
        self.save_state()

    def stop_torrent(self, torrent: Torrent) -> None:
        torrent.paused = True
        self._halt(torrent)
        self.save_state()

    def verify(self, torrent: Torrent) -> None:
        """Hash every piece again (the resume data is set aside), then carry on as before."""
        self._halt(torrent)
        if self.peer is not None:
            with contextlib.suppress(OSError):
                resume.resume_path(
                    self.peer.settings.state_dir / "resume", torrent.metainfo
                ).unlink()
        torrent.stopped_have = None
        self._begin(torrent)
        if torrent.paused:
            # Transmission checks a paused torrent and leaves it paused.
            gevent.spawn(self._check_then_stop, torrent, torrent.task)

    def remove(self, torrent: Torrent, *, delete_data: bool) -> None:
        self._halt(torrent)
        del self.torrents[torrent.id]
        self.removed[torrent.id] = time.monotonic()
        with contextlib.suppress(OSError):
            (self.metainfo_dir / f"{torrent.infohash}.atorrent").unlink()
        if self.peer is not None:
            with contextlib.suppress(OSError):
                resume.resume_path(
                    self.peer.settings.state_dir / "resume", torrent.metainfo
                ).unlink()
        if delete_data:
            _delete_data(torrent)
        self.save_state()
        log.info(
            "removed torrent %d: %s%s",
            torrent.id,
            torrent.metainfo.name,
            " and its data" if delete_data else "",
        )

    # ------------------------------------------------------------------ running a torrent
    def _begin(self, torrent: Torrent) -> None:
        torrent.error, torrent.error_string = ErrorKind.OK, ""  # a fresh attempt
        torrent.set_status(Status.CHECK_WAIT)
        torrent.task = gevent.spawn(self._run, torrent)
        torrent.task.link_exception(
            lambda g: log.error("torrent %d crashed: %r", torrent.id, g.exception)
        )

    def _run(self, torrent: Torrent) -> None:
        """Check, download, seed: the life of a running torrent (ends only when stopped)."""
        from anomos.peer.download import TorrentDownload

        self._peer_ready.wait()
        peer = self.peer
        assert peer is not None
        torrent.set_status(Status.CHECKING)
        try:
            torrent.download_dir.mkdir(parents=True, exist_ok=True)
            session = peer.add_torrent(torrent.metainfo, torrent.download_dir)
        except OSError as exc:
            self._fail(torrent, ErrorKind.LOCAL_ERROR, f"{torrent.download_dir}: {exc.strerror}")
            return
        except AnomosError as exc:
            self._fail(torrent, ErrorKind.LOCAL_ERROR, str(exc))
            return
        torrent.session = session
        torrent.rechecked = session.rechecked
        if not session.complete:
            torrent.set_status(Status.DOWNLOADING)
            torrent.download = TorrentDownload(peer, session, stall_limit=None)
            try:
                torrent.download.run()
            except AnomosError as exc:
                self._fail(torrent, ErrorKind.LOCAL_ERROR, str(exc))
                return
            finally:
                peer.announce_soon()
            torrent.done_date = int(time.time())
            log.info("torrent %d complete: %s", torrent.id, torrent.metainfo.name)
            self.save_state()
        torrent.set_status(Status.SEEDING)
        gevent.event.Event().wait()  # seed until stopped

    def _check_then_stop(self, torrent: Torrent, task: gevent.Greenlet | None) -> None:
        while torrent.status in (Status.CHECK_WAIT, Status.CHECKING) and torrent.task is task:
            gevent.sleep(0.1)
        if torrent.task is task:
            self._halt(torrent)

    def _halt(self, torrent: Torrent) -> None:
        """Stop the torrent's task and close its session (the session saves resume data)."""
        task, torrent.task = torrent.task, None
        if task is not None and task is not gevent.getcurrent():
            task.kill()
        session, torrent.session = torrent.session, None
        if session is not None:
            n = len(session.metainfo.pieces)  # (a session is set once its check is done)
            torrent.stopped_have = bytes(session.has_piece(i) for i in range(n))
            torrent.uploaded_before += session.uploaded
            torrent.downloaded_before += session.downloaded
            if self.peer is not None:
                self.peer.remove_torrent(session.metainfo.infohash)
            session.close()
        torrent.download = None
        torrent.set_status(Status.STOPPED)

    def _fail(self, torrent: Torrent, kind: ErrorKind, message: str) -> None:
        log.error("torrent %d (%s): %s", torrent.id, torrent.metainfo.name, message)
        torrent.error, torrent.error_string = kind, message
        self._halt(torrent)


def _delete_data(torrent: Torrent) -> None:
    """Delete the torrent's files (only the paths its metainfo names) and folders left empty."""
    root = torrent.download_dir
    try:
        storage = Storage(torrent.metainfo, root)
    except StorageError as exc:
        log.warning("data of %s not deleted: %s", torrent.metainfo.name, exc)
        return
    storage.close()
    for path in storage.paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if torrent.metainfo.multi_file:
        top = storage.root / torrent.metainfo.name
        for folder, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only empty ones: files not of this torrent stay


def free_space(path: str) -> tuple[int, int]:
    """(free, total) bytes of the file system holding ``path``."""
    usage = shutil.disk_usage(path)
    return usage.free, usage.total


__all__ = ["Daemon", "DaemonError", "ErrorKind", "Status", "Torrent"]
