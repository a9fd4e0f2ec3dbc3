"""The daemon: many torrents of one or several tracker networks, one peer per network.

Each torrent has a typed :class:`Status` (numbered as Transmission numbers
them), an error kind and message, and a task greenlet that checks its data
(resume data first), downloads it over circuits and then seeds it. The list of
torrents, their paused flags and lifetime counters live in ``daemon.json``
(written atomically on every change and every few seconds), each torrent's
metainfo in ``torrents/<infohash>.atorrent`` (a torrent added by magnet keeps
``<infohash>.magnet`` until its metadata arrives) and its verified pieces in the
peer's resume data: a restart brings every torrent back as it was, without
re-hashing data that has not changed.

Each tracker network (an announce URL and the fingerprint it is pinned by) gets
a peer of its own: its own neighbours, listen port and identity, kept in
``networks/<folder>/`` of the one state directory (docs/threat-model.md says
why one identity per network). A network's peer starts with its first torrent
and stops when its last torrent is removed (unless it is the configured
``tracker``, which the daemon keeps joined).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
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
from anomos.daemon.config import SESSION_KEYS, setting_value
from anomos.daemon.limits import (
    LimitError,
    LimitMode,
    TorrentLimits,
    seed_limit_reached,
    speed_rate,
)
from anomos.errors import AnomosError, StorageError
from anomos.fsutil import atomic_write, move_entries, private_dir
from anomos.identity import IDENTITY_FILE
from anomos.net.ratelimit import Throttle
from anomos.protocol.replay import CODES_FILE, REQUESTS_FILE
from anomos.torrent import resume
from anomos.torrent.magnet import MAX_MAGNET_LENGTH, Magnet
from anomos.torrent.metainfo import MAX_METAINFO_SIZE, Metainfo
from anomos.torrent.picker import Priority
from anomos.torrent.storage import Storage

if TYPE_CHECKING:
    from anomos.daemon.config import DaemonConfig
    from anomos.peer.download import MetadataFetch, TorrentDownload
    from anomos.peer.node import Peer
    from anomos.pluginmanager import Plugins
    from anomos.torrent.session import TorrentSession

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: Seconds between periodic writes of daemon.json (counters; pieces have their own resume saves).
STATE_SAVE_INTERVAL = 10.0
#: Bytes a download-dir given by a client may have (Linux's PATH_MAX): a longer one
#: could never be created, and its error would repeat it in every answer.
MAX_PATH_LENGTH = 4096
#: Seconds a torrent counts as "recently active" after a change or traffic.
RECENT_SECONDS = 60.0
#: Seconds between checks of seed limits, stalled torrents and the queue.
CONTROL_INTERVAL = 1.0


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


class QueueMove(enum.Enum):
    """Where queue-move-top/-up/-down/-bottom move torrents."""

    TOP = "top"
    UP = "up"
    DOWN = "down"
    BOTTOM = "bottom"


@attrs.frozen
class Network:
    """A tracker network: the tracker's announce URL and the fingerprint that pins it."""

    url: str
    fingerprint: str

    @classmethod
    def of(cls, metainfo: Metainfo | Magnet) -> Network:
        """The network a torrent (its metainfo, or the magnet it was added by) names."""
        if isinstance(metainfo, Magnet):
            return cls(metainfo.trackers[0], metainfo.fingerprint)
        if not metainfo.is_anomos or not metainfo.trackers or not metainfo.fingerprint:
            raise DaemonError(
                "not an .atorrent that pins its tracker (make one with `anomos anonymize`)"
            )
        return cls(metainfo.trackers[0], metainfo.fingerprint)

    @property
    def folder(self) -> str:
        """The name of its state folder (identity, resume data, replay caches)."""
        return hashlib.sha256(f"{self.url}\n{self.fingerprint}".encode()).hexdigest()[:16]


@attrs.define(eq=False)
class Torrent:
    """One torrent of the daemon; ``session`` exists while it runs.

    A torrent added by magnet has no metainfo until a source sent it: meanwhile
    :attr:`metainfo` raises :class:`NoMetadata` (the RPC shows Transmission's
    values for a magnet without metadata).
    """

    id: int
    _metainfo: Metainfo | None = attrs.field(repr=False)
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
    #: The magnet it was added by, kept until its metadata arrived.
    magnet: Magnet | None = attrs.field(default=None, repr=False)
    #: Fetching the metadata of a magnet (while it runs).
    fetch: MetadataFetch | None = attrs.field(default=None, repr=False)

    #: Per file: fetch it (Transmission's ``wanted``), and its priority; the daemon's
    #: copy is the truth (kept in daemon.json), given to the session at every start.
    wanted: list[bool] = attrs.field(
        default=attrs.Factory(lambda self: [True] * self.file_count, takes_self=True),
        repr=False,
    )
    priorities: list[Priority] = attrs.field(
        default=attrs.Factory(lambda self: [Priority.NORMAL] * self.file_count, takes_self=True),
        repr=False,
    )
    #: Set when the choice of files changes: a seeding torrent may have to download again.
    reselected: gevent.event.Event = attrs.field(factory=gevent.event.Event, repr=False)
    limits: TorrentLimits = attrs.field(factory=TorrentLimits, repr=False)
    #: Its seed limit stopped it (Transmission's isFinished).
    finished: bool = False
    #: Its place in the queue (0 first), and whether it runs regardless (torrent-start-now).
    queue_position: int = 0
    forced: bool = False
    #: When (monotonic) its payload counters last moved: idle seeding, stalled torrents.
    active_at: float = attrs.field(factory=time.monotonic, repr=False)
    _traffic_seen: tuple[int, int] = attrs.field(default=(0, 0), repr=False)

    @property
    def metainfo(self) -> Metainfo:
        if self._metainfo is None:
            raise NoMetadata(f"torrent {self.id} has no metadata yet (added by magnet)")
        return self._metainfo

    @property
    def has_metadata(self) -> bool:
        return self._metainfo is not None

    @property
    def given(self) -> Metainfo | Magnet:
        """What the torrent was added by: its metainfo, or its magnet until the metadata came."""
        given = self._metainfo or self.magnet
        assert given is not None
        return given

    def metadata_arrived(self, metainfo: Metainfo) -> None:
        self._metainfo, self.magnet = metainfo, None
        self.wanted = [True] * self.file_count
        self.priorities = [Priority.NORMAL] * self.file_count

    @property
    def file_count(self) -> int:
        """Files in its metainfo (0 before a magnet's metadata: nothing to choose yet)."""
        return len(self._metainfo.files) if self._metainfo is not None else 0

    @property
    def name(self) -> str:
        """The torrent's name, or the magnet's display name (or infohash) before the metadata."""
        if self._metainfo is not None:
            return self._metainfo.name
        assert self.magnet is not None
        return self.magnet.name or self.magnet.infohash_hex

    @property
    def metadata_fraction(self) -> float:
        """Transmission's metadataPercentComplete: 1 once the metainfo is known."""
        if self._metainfo is not None:
            return 1.0
        return self.fetch.fraction if self.fetch is not None else 0.0

    def has_piece(self, index: int) -> bool:
        if self.session is not None:
            return self.session.has_piece(index)
        return bool(self.stopped_have[index]) if self.stopped_have is not None else False

    @property
    def left(self) -> int:
        """Bytes still to download (as of its last run when it is stopped; 0 before a
        magnet's metadata, as Transmission counts it)."""
        if self.session is not None:
            return self.session.left
        if self._metainfo is None:
            return 0
        m = self._metainfo
        return sum(m.piece_size(i) for i in range(len(m.pieces)) if not self.has_piece(i))

    @property
    def infohash(self) -> str:
        if self._metainfo is None:
            assert self.magnet is not None
            return self.magnet.infohash_hex
        return self._metainfo.infohash.hex()

    @property
    def network(self) -> Network:
        return Network.of(self.given)

    def _wanted_pieces(self) -> set[int]:
        m = self.metainfo
        pieces: set[int] = set()
        for fi, f in enumerate(m.files):
            if self.wanted[fi] and not f.pad:
                pieces.update(resume.pieces_of_file(m, fi))
        return pieces

    @property
    def size_when_done(self) -> int:
        """Bytes of the pieces of the wanted files (Transmission's sizeWhenDone)."""
        if self.session is not None:
            return self.session.size_when_done
        return sum(self.metainfo.piece_size(i) for i in self._wanted_pieces())

    @property
    def left_until_done(self) -> int:
        """Bytes of wanted pieces still to fetch (as of its last run when stopped)."""
        if self.session is not None:
            return self.session.left_until_done
        m = self.metainfo
        return sum(m.piece_size(i) for i in self._wanted_pieces() if not self.has_piece(i))

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
        running = self.download or self.fetch
        if self.error != ErrorKind.OK or running is None:
            return self.error, self.error_string
        disk = self.download.disk_problem() if self.download is not None else ""
        if disk:
            return ErrorKind.LOCAL_ERROR, disk
        tracker = running.peer.tracker_wait
        if tracker.active:
            return ErrorKind.TRACKER_WARNING, tracker.describe()
        return ErrorKind.OK, ""

    @property
    def done(self) -> bool:
        """Every wanted piece verified (a stopped torrent: as of its last run; a torrent
        never checked counts as not done)."""
        if self.session is not None:
            return self.session.complete
        return self.stopped_have is not None and self.left_until_done == 0

    @property
    def seed_ratio(self) -> float:
        """Uploaded over downloaded (over the verified bytes if nothing was downloaded)."""
        base = self.downloaded_ever or self.size_when_done - self.left_until_done
        return self.uploaded_ever / base if base else 0.0

    def note_traffic(self, now: float) -> None:
        seen = (self.uploaded_ever, self.downloaded_ever)
        if seen != self._traffic_seen:
            self._traffic_seen, self.active_at = seen, now

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
            "wanted": [int(w) for w in self.wanted],
            "priorities": [int(p) for p in self.priorities],
            "limits": self.limits.to_state(),
            "finished": self.finished,
            "queue_position": self.queue_position,
        }


class DaemonError(AnomosError):
    """A request the daemon refuses; the message is the RPC ``result`` string."""


class NoMetadata(DaemonError):
    """What was asked needs the metainfo of a torrent added by magnet, not fetched yet."""


@attrs.define(eq=False)
class Daemon:
    """Owns a :class:`~anomos.peer.node.Peer` per tracker network and every torrent."""

    plugins: Plugins
    config: DaemonConfig
    state_dir: Path
    torrents: dict[int, Torrent] = attrs.field(factory=dict, init=False)
    #: The peer of each tracker network that has torrents (or is configured).
    peers: dict[Network, Peer] = attrs.field(factory=dict, init=False)
    started_at: float = attrs.field(factory=time.time, init=False)
    #: Ids removed lately with when (monotonic), for "recently-active" requests.
    removed: dict[int, float] = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(default=1, init=False)
    #: Set once the network's peer has started (listening, first announce tried).
    _peer_ready: dict[Network, gevent.event.Event] = attrs.field(factory=dict, init=False)
    #: Peers saying goodbye after their network's last torrent went (joined before a
    #: new peer of the same network opens the same files).
    _retiring: dict[Network, gevent.Greenlet] = attrs.field(factory=dict, init=False)
    _saver: gevent.Greenlet | None = attrs.field(default=None, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    #: The session's speed limits, shared by the torrents that honour them.
    down: Throttle = attrs.field(factory=Throttle, init=False)
    up: Throttle = attrs.field(factory=Throttle, init=False)
    #: Bytes per second this peer relayed for others lately (sampled each control tick).
    relay_speed: float = attrs.field(default=0.0, init=False)
    _relay_sample: tuple[float, int] = attrs.field(default=(0.0, 0), init=False)
    _controller: gevent.Greenlet | None = attrs.field(default=None, init=False)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "daemon.json"

    @property
    def metainfo_dir(self) -> Path:
        return self.state_dir / "torrents"

    # ------------------------------------------------------------------ lifecycle
    @property
    def configured_network(self) -> Network | None:
        """The network the config says to join before any torrent names it."""
        if not self.config.tracker:
            return None
        return Network(self.config.tracker, self.config.fingerprint)

    def start(self) -> None:
        """Bring back the torrents of the last run (each in its state) and their peers."""
        private_dir(self.metainfo_dir)
        if self.configured_network is not None:
            self._ensure_peer(self.configured_network)
        self._apply_session_limits()
        self._load_state()
        self._saver = gevent.spawn(self._save_loop)
        self._controller = gevent.spawn(self._control_loop)

    def stop(self) -> None:
        """Stop every torrent (resume data written), say goodbye to the tracker, save state."""
        if self._stopped:
            return
        self._stopped = True
        for loop in (self._saver, self._controller):
            if loop is not None:
                loop.kill()
        for torrent in self.torrents.values():
            self._halt(torrent)
        self.save_state()
        # Every network's goodbye announce at once (each may wait for its tracker).
        gevent.joinall([gevent.spawn(peer.stop) for peer in self.peers.values()])
        gevent.joinall(list(self._retiring.values()))
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
                metainfo, magnet = self._load_torrent_file(str(entry["infohash"]))
                torrent = Torrent(
                    id=int(entry["id"]),
                    metainfo=metainfo,
                    magnet=magnet,
                    download_dir=Path(entry["download_dir"]),
                    added_date=int(entry["added_date"]),
                    done_date=int(entry.get("done_date", 0)),
                    paused=bool(entry["paused"]),
                    uploaded_before=int(entry.get("uploaded", 0)),
                    downloaded_before=int(entry.get("downloaded", 0)),
                    error=ErrorKind(int(entry.get("error", 0))),
                    error_string=str(entry.get("error_string", "")),
                )
                _restore_selection(torrent, entry)
                _restore_limits(torrent, entry)
                torrent.finished = bool(entry.get("finished", False))
                torrent.queue_position = int(entry.get("queue_position", torrent.id))
            except (AnomosError, KeyError, ValueError, TypeError) as exc:
                log.error("torrent %r from %s not restored: %s", entry, self.state_file, exc)
                continue
            self.torrents[torrent.id] = torrent
            self._next_id = max(self._next_id, torrent.id + 1)
            try:
                network = Network.of(torrent.given)
                self._ensure_peer(network)
            except AnomosError as exc:  # kept in the list (and the file), not started
                torrent.error, torrent.error_string = ErrorKind.LOCAL_ERROR, str(exc)
                continue
            saved = resume.load(self._resume_dir(network), metainfo) if metainfo else None
            torrent.stopped_have = bytes(saved.have) if saved is not None else None
            if not torrent.paused:
                torrent.error, torrent.error_string = ErrorKind.OK, ""  # a fresh attempt
        self._renumber()
        self._schedule()
        log.info("restored %d torrent(s) from %s", len(self.torrents), self.state_file)

    def _load_torrent_file(self, infohash: str) -> tuple[Metainfo | None, Magnet | None]:
        """A torrent's .atorrent, or the magnet it was added by while its metadata is missing."""
        atorrent = self.metainfo_dir / f"{infohash}.atorrent"
        magnet = self.metainfo_dir / f"{infohash}.magnet"
        if atorrent.exists() or not magnet.exists():
            return Metainfo.load(atorrent), None
        try:
            return None, Magnet.parse(magnet.read_text()[: 2 * MAX_MAGNET_LENGTH])
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"cannot read {magnet}: {exc}") from None

    # ------------------------------------------------------------------ the peers
    def network_dir(self, network: Network) -> Path:
        """The state folder of ``network``'s peer: its identity, resume data, replay caches."""
        return self.state_dir / "networks" / network.folder

    def _resume_dir(self, network: Network) -> Path:
        return self.network_dir(network) / "resume"

    def _ensure_peer(self, network: Network) -> Peer:
        """The peer of ``network``, created (and started) on its first use."""
        peer = self.peers.get(network)
        if peer is not None:
            return peer
        from anomos.peer.node import Peer  # imported late: keeps `anomos --help` fast

        retiring = self._retiring.pop(network, None)
        if retiring is not None:
            retiring.join()  # its files (replay caches, resume data) are closed
        folder = self.network_dir(network)
        new = not folder.exists()
        private_dir(folder.parent)
        private_dir(folder)
        # A state folder of the one-network daemon kept its peer's files at the top:
        # the first network joined adopts them (that identity and its ratio live on).
        adopted = new and (self.state_dir / _PEER_FILES[0]).exists()
        if adopted:
            move_entries(self.state_dir, folder, _PEER_FILES)
            log.info("the peer of the earlier one-network state now lives in %s", folder)
        atomic_write(folder / "network.json", json.dumps(attrs.asdict(network)).encode())
        listen = self.config.listen
        if any(p.settings.listen == listen for p in self.peers.values()):
            # The configured port is taken by another network's peer: any free port.
            listen = f"{listen.rpartition(':')[0]}:0"
        settings = Settings(
            listen=listen,
            state_dir=folder,
            max_send_rate=self.config.max_send_rate,
            upnp=self.config.upnp,
            options=self.plugins.options,
        )
        try:
            peer = Peer(self.plugins, settings, network.url, network.fingerprint)
        except AnomosError as exc:  # say, a tracker URL that is not https://.../announce
            if adopted:
                move_entries(folder, self.state_dir, _PEER_FILES)
            if new:
                shutil.rmtree(folder, ignore_errors=True)
            raise DaemonError(str(exc)) from None
        self.peers[network] = peer
        ready = self._peer_ready[network] = gevent.event.Event()
        gevent.spawn(self._start_peer, network, peer, ready)
        log.info("joining the tracker network %s (state in %s)", network.url, folder)
        return peer

    def _start_peer(self, network: Network, peer: Peer, ready: gevent.event.Event) -> None:
        """Start ``peer``, then set ``ready`` (its own: the network may have been left
        meanwhile, its event dropped)."""
        try:
            peer.start()
        except AnomosError as exc:
            log.error("the peer of %s cannot start: %s", network.url, exc)
            if self.peers.get(network) is peer:  # the next start of one of its torrents retries
                del self.peers[network]
            for torrent in self.torrents.values():
                if _network_or_none(torrent) == network:
                    self._fail(torrent, ErrorKind.TRACKER_ERROR, str(exc))
            return
        ready.set()

    def _retire_if_unused(self, network: Network) -> None:
        """Stop ``network``'s peer once no torrent of it is left (the configured one stays)."""
        if network == self.configured_network or self._stopped:
            return
        if any(_network_or_none(t) == network for t in self.torrents.values()):
            return
        peer = self.peers.pop(network, None)
        self._peer_ready.pop(network, None)
        if peer is not None:
            log.info("no torrent of %s left: its peer stops", network.url)
            self._retiring[network] = gevent.spawn(peer.stop)

    # ------------------------------------------------------------------ requests
    def add(
        self,
        data: bytes,
        *,
        paused: bool = False,
        download_dir: str | None = None,
        selection: FileSelection | None = None,
    ) -> tuple[Torrent, bool]:
        """Add the torrent in ``data`` (an .atorrent, or an anomos magnet link);
        (torrent, False) if it was there already."""
        if len(data) > MAX_METAINFO_SIZE:
            raise DaemonError(f"metainfo larger than {MAX_METAINFO_SIZE} bytes")
        metainfo: Metainfo | None = None
        magnet: Magnet | None = None
        link = data[:64].lstrip().lower().startswith(b"magnet:")
        try:
            if link:
                magnet = Magnet.parse(data[: 2 * MAX_MAGNET_LENGTH].decode("utf-8", "replace"))
            else:
                metainfo = Metainfo.from_bytes(data)
        except AnomosError as exc:
            raise DaemonError(
                f"invalid or corrupt {'magnet link' if link else 'torrent file'}: {exc}"
            ) from None
        given = metainfo or magnet
        assert given is not None
        for torrent in self.torrents.values():
            if torrent.infohash == given.infohash.hex():
                return torrent, False
        # Everything checked before its network is joined (a refused add starts no peer).
        where = download_path(download_dir) if download_dir else self.config.download_dir
        if selection is not None:
            if metainfo is None:
                raise DaemonError(
                    "files of a magnet are chosen once its metadata came (torrent-set)"
                )
            selection.check(len(metainfo.files))
        self._ensure_peer(Network.of(given))
        if magnet is not None:
            atomic_write(self.metainfo_dir / f"{magnet.infohash_hex}.magnet", str(magnet).encode())
        else:
            atomic_write(self.metainfo_dir / f"{given.infohash.hex()}.atorrent", data)
        torrent = Torrent(
            id=self._next_id,
            metainfo=metainfo,
            magnet=magnet,
            download_dir=where,
            added_date=int(time.time()),
            paused=paused,
            queue_position=len(self.torrents),
        )
        if selection is not None:
            selection.apply(torrent)
        self._next_id += 1
        self.torrents[torrent.id] = torrent
        log.info("added torrent %d: %s (%s)", torrent.id, torrent.name, torrent.infohash)
        if not paused:
            self._schedule()
        self.save_state()
        return torrent, True

    def start_torrent(self, torrent: Torrent) -> None:
        self._ensure_peer(torrent.network)
        torrent.paused = False
        if torrent.task is None:
            _restart_limits(torrent)
            torrent.error, torrent.error_string = ErrorKind.OK, ""  # a fresh attempt
            self._schedule()
        self.save_state()

    def start_now(self, torrent: Torrent) -> None:
        """Start it at once, whatever the queue (torrent-start-now)."""
        self._ensure_peer(torrent.network)
        torrent.paused, torrent.forced = False, True
        if torrent.task is None:
            _restart_limits(torrent)
            self._begin(torrent)
        self.save_state()

    def stop_torrent(self, torrent: Torrent) -> None:
        torrent.paused, torrent.forced = True, False
        self._halt(torrent)
        self._schedule()
        self.save_state()

    def verify(self, torrent: Torrent) -> None:
        """Hash every piece again (the resume data is set aside), then carry on as before."""
        self._ensure_peer(torrent.network)
        self._halt(torrent)
        if torrent.has_metadata:
            with contextlib.suppress(OSError):
                resume.resume_path(self._resume_dir(torrent.network), torrent.metainfo).unlink()
        torrent.stopped_have = None
        self._begin(torrent)
        if torrent.paused:
            # Transmission checks a paused torrent and leaves it paused.
            gevent.spawn(self._check_then_stop, torrent, torrent.task)

    def remove(self, torrent: Torrent, *, delete_data: bool) -> None:
        self._halt(torrent)
        del self.torrents[torrent.id]
        now = time.monotonic()  # (older removals are no longer "recently active": dropped)
        self.removed = {i: at for i, at in self.removed.items() if now - at < RECENT_SECONDS}
        self.removed[torrent.id] = now
        for suffix in ("atorrent", "magnet"):
            with contextlib.suppress(OSError):
                (self.metainfo_dir / f"{torrent.infohash}.{suffix}").unlink()
        network = _network_or_none(torrent)
        if network is not None:
            if torrent.has_metadata:
                with contextlib.suppress(OSError):
                    resume.resume_path(self._resume_dir(network), torrent.metainfo).unlink()
            self._retire_if_unused(network)
        if delete_data and torrent.has_metadata:
            _delete_data(torrent)
        self._renumber()
        self._schedule()
        self.save_state()
        log.info(
            "removed torrent %d: %s%s",
            torrent.id,
            torrent.name,
            " and its data" if delete_data else "",
        )

    def select_files(self, torrent: Torrent, selection: FileSelection) -> None:
        """Change which files are fetched and their priorities (torrent-set), running or not."""
        selection.check(len(torrent.metainfo.files))
        selection.apply(torrent)
        if torrent.session is not None:
            _give_selection(torrent, torrent.session)
        torrent.reselected.set()
        torrent.changed_at = time.monotonic()
        self.save_state()

    # ------------------------------------------------------------------ limits and the queue
    def set_torrent_limits(self, torrent: Torrent, values: dict[str, Any]) -> None:
        """torrent-set's speed and seed keys (Transmission's names; checked first)."""
        torrent.limits.update(values)
        self.give_throttles(torrent)
        self.save_state()

    def give_throttles(self, torrent: Torrent) -> None:
        """Pace the torrent's session by its own limits and, if it honours them, the session's."""
        session = torrent.session
        if session is not None:
            honours = torrent.limits.honors_session_limits
            session.download_throttles = (torrent.limits.down, *((self.down,) if honours else ()))
            session.upload_throttles = (torrent.limits.up, *((self.up,) if honours else ()))

    def set_session(self, values: dict[str, Any]) -> None:
        """session-set's limit and queue keys for the running daemon (checked first)."""
        changes = {}
        for key, value in values.items():
            attr, kind = SESSION_KEYS[key]
            changes[attr] = setting_value(key, value, kind)
        self.config = attrs.evolve(self.config, **changes).check()
        self._apply_session_limits()
        self._schedule()

    def _apply_session_limits(self) -> None:
        c = self.config
        self.down.set_rate(speed_rate(c.speed_limit_down, c.speed_limit_down_enabled))
        self.up.set_rate(speed_rate(c.speed_limit_up, c.speed_limit_up_enabled))

    def move_in_queue(self, torrents: list[Torrent], where: QueueMove) -> None:
        """queue-move-top/-up/-down/-bottom: Transmission's moves, for several at once."""
        order = sorted(self.torrents.values(), key=lambda t: t.queue_position)
        moving = sorted(torrents, key=lambda t: t.queue_position, reverse=where is QueueMove.DOWN)
        if where in (QueueMove.TOP, QueueMove.BOTTOM):
            rest = [t for t in order if t not in moving]
            order = moving + rest if where is QueueMove.TOP else rest + moving
        else:
            for t in moving:
                i = order.index(t)
                j = i - 1 if where is QueueMove.UP else i + 1
                if 0 <= j < len(order) and order[j] not in moving:
                    order[i], order[j] = order[j], order[i]
        for position, t in enumerate(order):
            t.queue_position = position
        self._schedule()
        self.save_state()

    def set_queue_position(self, torrent: Torrent, position: int) -> None:
        order = sorted(self.torrents.values(), key=lambda t: t.queue_position)
        order.remove(torrent)
        order.insert(max(0, min(position, len(order))), torrent)
        for i, t in enumerate(order):
            t.queue_position = i
        self._schedule()
        self.save_state()

    def _renumber(self) -> None:
        order = sorted(self.torrents.values(), key=lambda t: (t.queue_position, t.id))
        for position, t in enumerate(order):
            t.queue_position = position

    def _schedule(self) -> None:
        """Start the waiting torrents that have a free slot, in queue order; mark the others
        DOWNLOAD_WAIT or SEED_WAIT. A running torrent is never stopped for the queue; one
        forced (torrent-start-now) or stalled (no traffic for queue-stalled-minutes) takes
        no slot."""
        if self._stopped:
            return
        c = self.config
        now = time.monotonic()
        stalled_after = c.queue_stalled_minutes * 60 if c.queue_stalled_enabled else None
        busy = {False: 0, True: 0}  # slots taken by downloads, by seeds
        waiting: list[tuple[Torrent, bool]] = []
        for t in sorted(self.torrents.values(), key=lambda t: t.queue_position):
            if t.paused or (t.error != ErrorKind.OK and t.task is None):
                continue
            if t.task is None:
                waiting.append((t, t.done))
            elif not t.forced and (stalled_after is None or now - t.active_at < stalled_after):
                busy[t.done] += 1
        for t, seed in waiting:
            enabled, size = (
                (c.seed_queue_enabled, c.seed_queue_size)
                if seed
                else (c.download_queue_enabled, c.download_queue_size)
            )
            if enabled and busy[seed] >= size:
                t.set_status(Status.SEED_WAIT if seed else Status.DOWNLOAD_WAIT)
                continue
            busy[seed] += 1
            self._begin(t)

    def _control_loop(self) -> None:
        while True:
            gevent.sleep(CONTROL_INTERVAL)
            try:
                self.control()
            except Exception:  # a bug of ours must not end the seed limits and the queue
                log.exception("daemon control failed")

    def control(self) -> None:
        """Note traffic, stop torrents that reached a seed limit, fill free queue slots."""
        now = time.monotonic()
        c = self.config
        for t in list(self.torrents.values()):
            t.note_traffic(now)
            if t.status != Status.SEEDING or t.session is None:
                continue
            why = seed_limit_reached(
                t.limits,
                ratio=t.seed_ratio,
                idle_seconds=now - t.active_at,
                session_ratio=c.ratio_limit if c.ratio_limit_enabled else None,
                session_idle_minutes=(
                    c.idle_seeding_limit if c.idle_seeding_limit_enabled else None
                ),
            )
            if why:
                log.info("torrent %d (%s) %s: stopped", t.id, t.name, why)
                t.finished = True
                self.stop_torrent(t)
        if self.peers:
            then, relayed_then = self._relay_sample
            relayed = sum(peer.relayed for peer in self.peers.values())
            if then:  # (a network's peer that retired takes its count along: never below 0)
                self.relay_speed = max(0, relayed - relayed_then) / max(now - then, 1e-3)
            self._relay_sample = (now, relayed)
        self._schedule()

    # ------------------------------------------------------------------ running a torrent
    def _begin(self, torrent: Torrent) -> None:
        torrent.error, torrent.error_string = ErrorKind.OK, ""  # a fresh attempt
        torrent.active_at = time.monotonic()  # (idle and stalled times count from its start)
        torrent.set_status(Status.CHECK_WAIT)
        torrent.task = gevent.spawn(self._run, torrent)
        torrent.task.link_exception(
            lambda g: log.error("torrent %d crashed: %r", torrent.id, g.exception)
        )

    def _run(self, torrent: Torrent) -> None:
        """Check, download, seed: the life of a running torrent (ends only when stopped)."""
        from anomos.peer.download import TorrentDownload

        network = torrent.network
        self._peer_ready[network].wait()
        peer = self.peers[network]
        if not torrent.has_metadata and not self._fetch_metadata(torrent, peer):
            return
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
        _give_selection(torrent, session)
        self.give_throttles(torrent)
        while True:
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
                log.info("torrent %d complete: %s", torrent.id, torrent.name)
                self.save_state()
            torrent.set_status(Status.SEEDING)
            self._schedule()  # a seed now: its download slot is free
            while session.complete:  # seed until stopped, or until more files are wanted
                torrent.reselected.wait()
                torrent.reselected.clear()

    def _fetch_metadata(self, torrent: Torrent, peer: Peer) -> bool:
        """A magnet's metadata from a source (shown as downloading meanwhile); then its
        .atorrent replaces the saved magnet. False if it failed (the torrent stopped)."""
        from anomos.peer.download import MetadataFetch

        assert torrent.magnet is not None
        torrent.set_status(Status.DOWNLOADING)
        torrent.fetch = MetadataFetch(peer, torrent.magnet)
        try:
            metainfo = torrent.fetch.run()
        except AnomosError as exc:
            self._fail(torrent, ErrorKind.LOCAL_ERROR, str(exc))
            return False
        finally:
            torrent.fetch = None
        metainfo.save(self.metainfo_dir / f"{torrent.infohash}.atorrent")
        with contextlib.suppress(OSError):
            (self.metainfo_dir / f"{torrent.infohash}.magnet").unlink()
        torrent.metadata_arrived(metainfo)
        log.info("torrent %d: metadata of %s received", torrent.id, metainfo.name)
        self.save_state()
        return True

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
            peer = self.peers.get(torrent.network)
            if peer is not None:
                peer.remove_torrent(session.metainfo.infohash)
            session.close()
        torrent.download = torrent.fetch = None
        torrent.set_status(Status.STOPPED)

    def _fail(self, torrent: Torrent, kind: ErrorKind, message: str) -> None:
        log.error("torrent %d (%s): %s", torrent.id, torrent.name, message)
        torrent.error, torrent.error_string = kind, message
        self._halt(torrent)


def download_path(value: str) -> Path:
    """A download-dir given by a client, as a path (a DaemonError unless it is absolute
    and one the system can name: no NUL byte, at most PATH_MAX)."""
    if len(value.encode("utf-8", "surrogateescape")) > MAX_PATH_LENGTH:
        raise DaemonError(f"download-dir longer than {MAX_PATH_LENGTH} bytes")
    where = Path(value).expanduser()
    if "\0" in value or not where.is_absolute():
        raise DaemonError(f"download-dir {value[:200]!r} is not an absolute path")
    return where


#: A peer's files in its state folder: identity, resume data, replay caches, peer.json.
_PEER_FILES = (IDENTITY_FILE, "resume", CODES_FILE, REQUESTS_FILE, "peer.json")


def _network_or_none(torrent: Torrent) -> Network | None:
    """The torrent's network; None for one restored from a file that names none."""
    try:
        return torrent.network
    except DaemonError:
        return None


@attrs.frozen
class FileSelection:
    """A change of files (indices as the metainfo lists them): which to fetch or leave
    out, and priorities; files not named keep their setting."""

    wanted: tuple[int, ...] = ()
    unwanted: tuple[int, ...] = ()
    high: tuple[int, ...] = ()
    normal: tuple[int, ...] = ()
    low: tuple[int, ...] = ()

    def check(self, nfiles: int) -> None:
        for group in (self.wanted, self.unwanted, self.high, self.normal, self.low):
            bad = next((i for i in group if not 0 <= i < nfiles), None)  # (the first only)
            if bad is not None:
                raise DaemonError(f"file index {bad} out of range (the torrent has {nfiles})")

    def apply(self, torrent: Torrent) -> None:
        for index in self.wanted:
            torrent.wanted[index] = True
        for index in self.unwanted:
            torrent.wanted[index] = False
        for group, priority in (
            (self.high, Priority.HIGH),
            (self.normal, Priority.NORMAL),
            (self.low, Priority.LOW),
        ):
            for index in group:
                torrent.priorities[index] = priority


def _restart_limits(torrent: Torrent) -> None:
    """Started by hand after its seed ratio stopped it: the ratio no longer stops it (as
    Transmission does); idle time counts from now."""
    if torrent.finished:
        torrent.finished = False
        torrent.limits.seed_ratio_mode = LimitMode.UNLIMITED
    torrent.active_at = time.monotonic()


def _restore_limits(torrent: Torrent, entry: dict[str, Any]) -> None:
    """The limits in daemon.json; bad ones (an edited file) leave the defaults, said once."""
    try:
        torrent.limits.update(dict(entry.get("limits", {})))
    except (LimitError, KeyError, TypeError, ValueError) as exc:
        log.warning("torrent %d: limits in daemon.json ignored: %s", torrent.id, exc)


def _give_selection(torrent: Torrent, session: TorrentSession) -> None:
    """Make the session fetch the torrent's chosen files at their priorities."""
    for wanted in (True, False):
        session.set_wanted([i for i, w in enumerate(torrent.wanted) if w == wanted], wanted)
    for priority in Priority:
        chosen = [i for i, p in enumerate(torrent.priorities) if p == priority]
        session.set_priority(chosen, priority)


def _restore_selection(torrent: Torrent, entry: dict[str, Any]) -> None:
    """The files chosen in daemon.json (absent or of another length: all, normal)."""
    nfiles = torrent.file_count
    wanted, priorities = entry.get("wanted"), entry.get("priorities")
    if isinstance(wanted, list) and len(wanted) == nfiles:
        torrent.wanted = [bool(w) for w in wanted]
    if isinstance(priorities, list) and len(priorities) == nfiles:
        torrent.priorities = [Priority(int(p)) for p in priorities]


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


__all__ = [
    "Daemon",
    "DaemonError",
    "ErrorKind",
    "FileSelection",
    "Network",
    "QueueMove",
    "Status",
    "Torrent",
]
