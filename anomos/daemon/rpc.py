"""The Transmission RPC (its published rpc-spec) over plain WSGI, served by gevent.

``POST /transmission/rpc`` with a JSON body ``{"method", "arguments", "tag"}``;
the answer is ``{"result": "success" | <error string>, "arguments", "tag"}``.
A request without the current ``X-Transmission-Session-Id`` header gets 409 and
the id (the CSRF handshake); with a username and password set, a request
without them gets 401. Every failure is a ``result`` string: a bad request never
gets a traceback and never stops the daemon. anomos' own figures use names that
start with ``anomos-``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from gevent.pywsgi import WSGIHandler, WSGIServer

from anomos import __version__
from anomos.daemon.config import SESSION_KEYS, DaemonConfig
from anomos.daemon.core import (
    RECENT_SECONDS,
    Daemon,
    DaemonError,
    FileSelection,
    NoMetadata,
    QueueMove,
    Status,
    Torrent,
    download_path,
    free_space,
)
from anomos.daemon.limits import KB, TORRENT_KEYS, LimitMode, check_limits
from anomos.errors import AnomosError
from anomos.torrent.magnet import is_magnet
from anomos.torrent.metainfo import MAX_METAINFO_SIZE

log = logging.getLogger(__name__)

RPC_PATH = "/transmission/rpc"
SESSION_HEADER = "X-Transmission-Session-Id"
#: Bytes a request body may have (a base64 .atorrent of MAX_METAINFO_SIZE fits).
MAX_REQUEST_SIZE = 12 * 1024 * 1024
#: Requests served at once (more wait for a free slot: a slow client cannot take them all).
MAX_CONNECTIONS = 64
#: Seconds a client may keep a connection without sending (reading a request, or kept
#: alive between requests): a silent client cannot hold a slot for long.
IDLE_TIMEOUT = 30.0
#: Transmission 4.0's RPC version: the clients we serve check it.
RPC_VERSION = 17
RPC_VERSION_MINIMUM = 14

Handler = Callable[[Daemon, dict[str, Any]], dict[str, Any]]


class RpcError(Exception):
    """A request we refuse: the message becomes the ``result`` string."""


# ---------------------------------------------------------------------------- torrent fields


def _rate(torrent: Torrent, down: bool) -> int:
    session = torrent.session
    if session is None:
        return 0
    now = time.monotonic()
    return int(
        sum(c.download_rate(now) if down else c.upload_rate(now) for c in session.connections)
    )


def _file_done(torrent: Torrent) -> list[int]:
    """Verified bytes of each file (from the pieces verified now, or at its last run)."""
    m = torrent.metainfo
    done = [0] * len(m.files)
    starts = [f.offset for f in m.files]
    for index in range(len(m.pieces)):
        if not torrent.has_piece(index):
            continue
        lo = index * m.piece_length
        hi = lo + m.piece_size(index)
        fi = max(0, bisect.bisect_right(starts, lo) - 1)
        while fi < len(m.files) and m.files[fi].offset < hi:
            f = m.files[fi]
            done[fi] += max(0, min(hi, f.offset + f.length) - max(lo, f.offset))
            fi += 1
    return done


def _eta(torrent: Torrent) -> int:
    if torrent.status != Status.DOWNLOADING:
        return -1  # not available
    rate = _rate(torrent, down=True)
    return int(torrent.left_until_done / rate) if rate > 0 else -2  # -2: unknown


def _circuits(torrent: Torrent) -> dict[str, Any]:
    """Circuits by relay count (never an address): the ones built so far and open now."""
    download = torrent.download
    relays: dict[str, int] = {}
    if download is not None:
        for record in download.records:
            relays[str(record.relays)] = relays.get(str(record.relays), 0) + 1
    session = torrent.session
    return {
        "open": len(session.connections) if session is not None else 0,
        "ended-by-relays": relays,
        "failed": download.failures if download is not None else 0,
    }


def _percent(torrent: Torrent) -> float:
    """Of the wanted pieces, the share verified (Transmission's percentDone)."""
    size = torrent.size_when_done
    return 1.0 - torrent.left_until_done / size if size else 1.0


FIELDS: dict[str, Callable[[Torrent], Any]] = {
    "id": lambda t: t.id,
    "hashString": lambda t: t.infohash,
    "name": lambda t: t.name,
    "status": lambda t: int(t.status),
    "percentDone": _percent,
    "sizeWhenDone": lambda t: t.size_when_done,
    "totalSize": lambda t: t.metainfo.total_length,
    "leftUntilDone": lambda t: t.left_until_done,
    "percentComplete": lambda t: (
        1.0 - t.left / t.metainfo.total_length if t.metainfo.total_length else 1.0
    ),
    "haveValid": lambda t: t.metainfo.total_length - t.left,
    "rateDownload": lambda t: _rate(t, down=True),
    "rateUpload": lambda t: _rate(t, down=False),
    "eta": _eta,
    "uploadRatio": lambda t: (
        round(t.uploaded_ever / t.downloaded_ever, 4) if t.downloaded_ever else -1
    ),
    "uploadedEver": lambda t: t.uploaded_ever,
    "downloadedEver": lambda t: t.downloaded_ever,
    "error": lambda t: int(t.problem[0]),
    "errorString": lambda t: t.problem[1],
    "files": lambda t: [
        {"name": "/".join(f.path), "length": f.length, "bytesCompleted": done}
        for f, done in zip(t.metainfo.files, _file_done(t), strict=True)
    ],
    "fileStats": lambda t: [
        {"bytesCompleted": done, "wanted": wanted, "priority": int(priority)}
        for done, wanted, priority in zip(_file_done(t), t.wanted, t.priorities, strict=True)
    ],
    # (0/1, not booleans: what Transmission's bespoke RPC has always sent, and clients read)
    "wanted": lambda t: [int(w) for w in t.wanted],
    "priorities": lambda t: [int(p) for p in t.priorities],
    "downloadDir": lambda t: str(t.download_dir),
    "addedDate": lambda t: t.added_date,
    "doneDate": lambda t: t.done_date,
    "queuePosition": lambda t: t.queue_position,
    "peersConnected": lambda t: len(t.session.connections) if t.session is not None else 0,
    "peersGettingFromUs": lambda t: (
        sum(1 for c in t.session.connections if c.peer_interested) if t.session else 0
    ),
    "peersSendingToUs": lambda t: (
        sum(1 for c in t.session.connections if c.am_interested) if t.session else 0
    ),
    "isFinished": lambda t: t.finished,
    "isPrivate": lambda t: True,  # no DHT, no PEX: always
    "pieceCount": lambda t: len(t.metainfo.pieces),
    "pieceSize": lambda t: t.metainfo.piece_length,
    "metadataPercentComplete": lambda t: t.metadata_fraction,
    "anomos-circuits": _circuits,
    "anomos-rechecked": lambda t: t.rechecked,
}


#: What a field shows for a magnet whose metadata has not come yet (as Transmission).
WITHOUT_METADATA: dict[str, Any] = {
    "percentDone": 0.0,
    "sizeWhenDone": 0,
    "leftUntilDone": 0,
    "percentComplete": 0.0,
    "totalSize": 0,
    "haveValid": 0,
    "eta": -2,
    "files": [],
    "fileStats": [],
    "priorities": [],
    "wanted": [],
    "pieceCount": 0,
    "pieceSize": 0,
}


def _field(name: str, torrent: Torrent) -> Any:
    try:
        return FIELDS[name](torrent)
    except NoMetadata:
        return WITHOUT_METADATA.get(name)


def _limit_field(attr: str) -> Callable[[Torrent], Any]:
    def field(torrent: Torrent) -> Any:
        value = getattr(torrent.limits, attr)
        return int(value) if isinstance(value, LimitMode) else value

    return field


FIELDS.update({key: _limit_field(attr) for key, (attr, _kind) in TORRENT_KEYS.items()})


# ---------------------------------------------------------------------------- methods


def _select(daemon: Daemon, ids: Any) -> list[Torrent]:
    """Transmission's ``ids``: absent (all), a number, a hash, a list of both, or
    "recently-active"."""
    torrents = sorted(daemon.torrents.values(), key=lambda t: t.id)
    if ids is None:
        return torrents
    if ids == "recently-active":
        now = time.monotonic()
        return [
            t
            for t in torrents
            if now - t.changed_at < RECENT_SECONDS
            or t.status in (Status.CHECKING, Status.DOWNLOADING)
            or (t.session is not None and t.session.connections)
        ]
    wanted = ids if isinstance(ids, list) else [ids]
    if len(wanted) > 100_000:
        raise RpcError("too many ids")
    by_key: dict[int | str, Torrent] = {t.id: t for t in torrents}
    by_key.update({t.infohash: t for t in torrents})
    chosen: dict[int, Torrent] = {}  # (one look-up per id: never ids x torrents)
    for item in wanted:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise RpcError(f"invalid id {str(item)[:40]!r}: a number or a hash string")
        t = by_key.get(item.lower() if isinstance(item, str) else item)
        if t is not None:
            chosen.setdefault(t.id, t)
    return list(chosen.values())


def _torrent_get(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    fields = args.get("fields")
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise RpcError("torrent-get needs 'fields', a list of names")
    known = [f for f in dict.fromkeys(fields) if f in FIELDS]  # unknown ones are left out
    torrents = _select(daemon, args.get("ids"))
    rows = [{f: _field(f, t) for f in known} for t in torrents]
    result: dict[str, Any]
    if args.get("format") == "table":
        result = {"torrents": [known, *([row[f] for f in known] for row in rows)]}
    else:
        result = {"torrents": rows}
    if args.get("ids") == "recently-active":
        now = time.monotonic()
        result["removed"] = [i for i, at in daemon.removed.items() if now - at < RECENT_SECONDS]
    return result


def _read_torrent_file(filename: str) -> bytes:
    path = Path(filename).expanduser()
    shown = repr(filename) if len(filename) <= 200 else f"{filename[:200]!r}..."
    try:
        if not path.is_file():  # a FIFO or a device would block the whole daemon
            raise RpcError(f"cannot read {shown}: not a regular file")
        with open(path, "rb") as f:
            return f.read(MAX_METAINFO_SIZE + 1)
    except OSError as exc:  # (is_file too: a name too long, no permission on a folder)
        raise RpcError(f"cannot read {shown}: {exc.strerror or exc}") from None


def _torrent_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    metainfo, filename = args.get("metainfo"), args.get("filename")
    if isinstance(metainfo, str):
        try:
            data = base64.b64decode(metainfo, validate=False)
        except (binascii.Error, ValueError):
            raise RpcError("invalid or corrupt torrent file: bad base64") from None
    elif isinstance(filename, str):
        if is_magnet(filename):
            data = filename.encode()  # the daemon reads the link (and refuses a BitTorrent one)
        elif "://" in filename:
            raise RpcError("anomos adds torrents from a file name or metainfo, never a URL")
        else:
            data = _read_torrent_file(filename)
    else:
        raise RpcError("torrent-add needs 'metainfo' (base64) or 'filename'")
    download_dir = args.get("download-dir")
    if download_dir is not None and not isinstance(download_dir, str):
        raise RpcError("download-dir must be a string")
    paused = _flag(args, "paused")
    selection = _file_selection(_file_lists(args), empty_means_all=None)
    torrent, new = daemon.add(data, paused=paused, download_dir=download_dir, selection=selection)
    brief = {"id": torrent.id, "name": torrent.name, "hashString": torrent.infohash}
    return {"torrent-added" if new else "torrent-duplicate": brief}


#: Transmission's keys for a change of files, as FileSelection's attributes.
_FILE_KEYS = {
    "files-wanted": "wanted",
    "files-unwanted": "unwanted",
    "priority-high": "high",
    "priority-normal": "normal",
    "priority-low": "low",
}


def _file_lists(args: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The files-wanted/-unwanted and priority-* lists of a request, as FileSelection's
    attributes; checked once per request, each index once."""
    lists: dict[str, tuple[int, ...]] = {}
    for key, attr in _FILE_KEYS.items():
        if key not in args:
            continue
        value = args[key]
        if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in value
        ):
            raise RpcError(f"{key} must be a list of file indices")
        if len(value) > 1_000_000:
            raise RpcError(f"{key}: too many file indices")
        lists[attr] = tuple(sorted(set(value)))
    return lists


def _file_selection(
    lists: dict[str, tuple[int, ...]], empty_means_all: int | None
) -> FileSelection | None:
    """The selection ``lists`` make (None: no list given). In torrent-set an empty list
    means every file (``empty_means_all`` files); in torrent-add it means none, as in
    Transmission."""
    if not lists:
        return None
    every = tuple(range(empty_means_all or 0))
    return FileSelection(**{attr: value or every for attr, value in lists.items()})


def _torrent_set(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """torrent-set: the keys anomos supports; any other is refused before anything changes."""
    unknown = sorted(k for k in args if k not in _TORRENT_SETTABLE)
    if unknown:
        raise RpcError(f"not supported by anomos: {', '.join(unknown)}")
    limits = _limit_values(args)
    check_limits(limits)
    position = args.get("queuePosition")
    if position is not None and (isinstance(position, bool) or not isinstance(position, int)):
        raise RpcError("queuePosition must be a number")
    torrents = _select(daemon, args.get("ids"))
    lists = _file_lists(args)
    selections: dict[int, FileSelection] = {}
    # Every value checked before any torrent changes; the metainfo is needed only when
    # files are chosen (a torrent added by magnet may have none yet).
    for torrent in torrents if lists else ():
        nfiles = len(torrent.metainfo.files)
        selection = _file_selection(lists, empty_means_all=nfiles)
        assert selection is not None
        selection.check(nfiles)
        selections[torrent.id] = selection
    for torrent in torrents:
        if torrent.id in selections:
            daemon.select_files(torrent, selections[torrent.id])
        if limits:
            daemon.set_torrent_limits(torrent, limits)
        if position is not None:
            daemon.set_queue_position(torrent, position)
    return {}


def _limit_values(args: dict[str, Any]) -> dict[str, Any]:
    """The speed and seed keys of a torrent-set; the older ``seedRatioLimited`` and
    ``seedIdleLimited`` (true: this torrent's limit, false: the session's) as modes."""
    values = {k: v for k, v in args.items() if k in TORRENT_KEYS}
    for old, mode in (("seedRatioLimited", "seedRatioMode"), ("seedIdleLimited", "seedIdleMode")):
        if old in args and mode not in args:
            if not isinstance(args[old], bool):
                raise RpcError(f"{old} must be true or false")
            values[mode] = int(LimitMode.SINGLE if args[old] else LimitMode.GLOBAL)
    return values


#: torrent-set keys anomos knows ("ids" and the keys of each part).
_TORRENT_SETTABLE = {
    "ids",
    "queuePosition",
    "seedRatioLimited",
    "seedIdleLimited",
    *_FILE_KEYS,
    *TORRENT_KEYS,
}


def _queue_move(where: QueueMove) -> Handler:
    def handler(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
        daemon.move_in_queue(_select(daemon, args.get("ids")), where)
        return {}

    return handler


def _each(action: Callable[[Daemon, Torrent], None]) -> Handler:
    def handler(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
        for torrent in _select(daemon, args.get("ids")):
            action(daemon, torrent)
        return {}

    return handler


def _flag(args: dict[str, Any], key: str) -> bool:
    """A true-or-false argument (absent: false); anything else is refused, never guessed
    (``"false"`` is truthy, and delete-local-data deletes)."""
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise RpcError(f"{key} must be true or false")
    return value


def _torrent_remove(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    delete = _flag(args, "delete-local-data")
    for torrent in _select(daemon, args.get("ids")):
        daemon.remove(torrent, delete_data=delete)
    return {}


def _session_values(daemon: Daemon) -> dict[str, Any]:
    config = daemon.config
    return {
        "version": f"{__version__} (anomos)",
        "rpc-version": RPC_VERSION,
        "rpc-version-minimum": RPC_VERSION_MINIMUM,
        "rpc-version-semver": "5.3.0",
        "session-id": "",  # filled in by the app
        "download-dir": str(config.download_dir),
        "rpc-bind-address": config.rpc_bind_address,
        "rpc-port": config.rpc_port,
        "rpc-authentication-required": config.auth_required,
        "dht-enabled": False,
        "pex-enabled": False,
        "lpd-enabled": False,
        "utp-enabled": False,
        "encryption": "required",
        "peer-port": 0,
        "port-forwarding-enabled": False,
        "alt-speed-enabled": False,
        **{key: getattr(config, attr) for key, (attr, _kind) in SESSION_KEYS.items()},
        "units": {
            "speed-units": ["kB/s", "MB/s", "GB/s", "TB/s"],
            "speed-bytes": KB,
            "size-units": ["kB", "MB", "GB", "TB"],
            "size-bytes": 1000,
            "memory-units": ["KiB", "MiB", "GiB", "TiB"],
            "memory-bytes": 1024,
        },
        "start-added-torrents": True,
        "anomos-max-send-rate": config.max_send_rate,
        "config-dir": str(daemon.state_dir),
        "anomos-networks": [
            {"tracker": network.url, "fingerprint": network.fingerprint, "address": peer.address}
            for network, peer in daemon.peers.items()
        ],
    }


def _session_get(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    values = _session_values(daemon)
    fields = args.get("fields")
    if isinstance(fields, list):
        values = {k: v for k, v in values.items() if k in fields}
    return values


#: session-set keys that can change while running.
_SETTABLE = {"download-dir", *SESSION_KEYS}


def _session_set(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    unsupported = sorted(k for k in args if k not in _SETTABLE)
    if unsupported:
        raise RpcError(f"not supported by anomos yet: {', '.join(unsupported)}")
    where = None
    if "download-dir" in args:
        if not isinstance(args["download-dir"], str):
            raise RpcError("download-dir must be an absolute path")
        where = download_path(args["download-dir"])
    daemon.set_session({k: v for k, v in args.items() if k in SESSION_KEYS})  # (checked first)
    if where is not None:
        daemon.config = attrs.evolve(daemon.config, download_dir=where)
    return {}


def _session_stats(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    torrents = list(daemon.torrents.values())
    up = sum(t.uploaded_ever for t in torrents)
    down = sum(t.downloaded_ever for t in torrents)
    stats = {
        "uploadedBytes": up,
        "downloadedBytes": down,
        "filesAdded": len(torrents),
        "sessionCount": 1,
        "secondsActive": int(time.time() - daemon.started_at),
    }
    peers = daemon.peers
    accounts = [p.account for p in peers.values() if p.account is not None]
    return {
        "activeTorrentCount": sum(1 for t in torrents if t.status != Status.STOPPED),
        "pausedTorrentCount": sum(1 for t in torrents if t.status == Status.STOPPED),
        "torrentCount": len(torrents),
        "downloadSpeed": sum(_rate(t, down=True) for t in torrents),
        "uploadSpeed": sum(_rate(t, down=False) for t in torrents),
        "current-stats": stats,
        "cumulative-stats": stats,
        # Over every tracker network; the ratio is the lowest (the first to run short).
        "anomos-relayed": sum(p.relayed for p in peers.values()),
        "anomos-relay-speed": int(daemon.relay_speed),
        "anomos-ratio": min((p.ratio for p in peers.values() if p.account), default=None),
        "anomos-account": _account(accounts) if accounts else None,
        "anomos-neighbours": sum(len(p.links.neighbours()) for p in peers.values()),
        "anomos-networks": [
            {
                "tracker": network.url,
                "relayed": p.relayed,
                "ratio": p.ratio,
                "account": _account([p.account]) if p.account is not None else None,
                "neighbours": len(p.links.neighbours()),
            }
            for network, p in peers.items()
        ],
    }


def _account(accounts: list[Any]) -> dict[str, int]:
    """The tracker's last word on this peer's accounts, summed over ``accounts``."""
    return {
        "uploaded": sum(a.uploaded for a in accounts),
        "downloaded": sum(a.downloaded for a in accounts),
        "relayed": sum(a.relayed for a in accounts),
        "relayed-claimed": sum(a.relayed_claimed for a in accounts),
    }


def _free_space(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    path = args.get("path")
    if not isinstance(path, str):
        raise RpcError("free-space needs 'path'")
    try:
        free, total = free_space(path)
    except (OSError, ValueError) as exc:  # (ValueError: a NUL byte in the path)
        raise RpcError(f"{path[:200]!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return {"path": path, "size-bytes": free, "total_size": total}


def _port_test(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "port-is-open": False,
        "anomos-port-test": "not tested: anomos asks no outside service to probe its port "
        "(that would reveal the peer's address); its tracker reports unreachable neighbours",
    }


def _neighbours(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """This daemon's neighbours by NID (never an address) and the bytes over each live link:
    all of them, and those of circuits relayed through this peer (since the link came up).
    One entry per tracker network in ``networks``; ``neighbours`` lists them all, each
    row naming its ``tracker`` (NIDs are numbered per network)."""
    networks: list[dict[str, Any]] = []
    for network, peer in daemon.peers.items():
        rows = []
        for nid in sorted(peer.links.neighbours()):
            link = peer.links.get(nid)
            up = link is not None and not link.closed
            rows.append(
                {
                    "nid": nid,
                    "tracker": network.url,
                    "linked": up,
                    "relayed": link.relayed if link is not None and up else 0,
                    "sent": link.bytes_out if link is not None and up else 0,
                    "received": link.bytes_in if link is not None and up else 0,
                }
            )
        networks.append(
            {
                "tracker": network.url,
                "identity": peer.identity.identity_public.hex()[:16],
                "relayed": peer.relayed,
                "neighbours": rows,
            }
        )
    return {
        "identity": networks[0]["identity"] if networks else None,
        "relayed": sum(n["relayed"] for n in networks),
        "neighbours": [row for n in networks for row in n["neighbours"]],
        "networks": networks,
    }


METHODS: dict[str, Handler] = {
    "anomos-neighbours": _neighbours,
    "torrent-get": _torrent_get,
    "torrent-add": _torrent_add,
    "torrent-set": _torrent_set,
    "torrent-start": _each(Daemon.start_torrent),
    "torrent-start-now": _each(Daemon.start_now),
    "torrent-stop": _each(Daemon.stop_torrent),
    "torrent-verify": _each(Daemon.verify),
    "torrent-remove": _torrent_remove,
    "queue-move-top": _queue_move(QueueMove.TOP),
    "queue-move-up": _queue_move(QueueMove.UP),
    "queue-move-down": _queue_move(QueueMove.DOWN),
    "queue-move-bottom": _queue_move(QueueMove.BOTTOM),
    "session-get": _session_get,
    "session-set": _session_set,
    "session-stats": _session_stats,
    "free-space": _free_space,
    "port-test": _port_test,
}


# ---------------------------------------------------------------------------- WSGI


class RpcApp:
    """The WSGI application: handshake, authentication, bounded JSON, dispatch."""

    def __init__(self, daemon: Daemon, config: DaemonConfig) -> None:
        from anomos.daemon.web import WebPage

        self.daemon = daemon
        self.config = config
        self.session_id = secrets.token_urlsafe(32)
        self.web = WebPage(self)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        answer = self.web.answer(environ)  # a foreign Host header, the web page, its events
        if answer is not None:
            start_response(answer[0], answer[1])
            return answer[2]  # type: ignore[no-any-return]
        status, headers, body = self.handle(environ)
        headers = [("Content-Type", "application/json; charset=UTF-8"), *headers]
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]

    def authorized(self, environ: dict[str, Any]) -> bool:
        """Whether the request carries the RPC's credentials (or none are set)."""
        if not self.config.auth_required:
            return True
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            return False
        ok_user = hmac.compare_digest(user.encode(), self.config.rpc_username.encode())
        ok_pass = hmac.compare_digest(password.encode(), self.config.rpc_password.encode())
        return ok_user and ok_pass

    def handle(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        session_header = [(SESSION_HEADER, self.session_id)]
        if environ.get("PATH_INFO", "").rstrip("/") != RPC_PATH:
            return "404 Not Found", [], _error("not found: the RPC is at " + RPC_PATH)
        if not self.authorized(environ):
            headers = [("WWW-Authenticate", 'Basic realm="anomos"')]
            return "401 Unauthorized", headers, _error("unauthorized user")
        given = environ.get("HTTP_X_TRANSMISSION_SESSION_ID", "")
        if not hmac.compare_digest(given.encode(), self.session_id.encode()):
            return "409 Conflict", session_header, _error("invalid session id")
        if environ.get("REQUEST_METHOD") != "POST":
            return "405 Method Not Allowed", [("Allow", "POST")], _error("POST only")
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            length = -1
        if length < 0:
            return "411 Length Required", session_header, _error("Content-Length required")
        if length > MAX_REQUEST_SIZE:
            return (
                "413 Payload Too Large",
                session_header,
                _error(f"request larger than {MAX_REQUEST_SIZE} bytes"),
            )
        raw = environ["wsgi.input"].read(length)
        return "200 OK", session_header, json.dumps(self.dispatch(raw)).encode()

    def dispatch(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError):  # (RecursionError: "[[[[..." nested too deep)
            return {"result": "invalid JSON request", "arguments": {}}
        if not isinstance(request, dict):
            return {"result": "invalid request: not a JSON object", "arguments": {}}
        reply: dict[str, Any] = {"arguments": {}}
        if "tag" in request:
            reply["tag"] = request["tag"]
        method, args = request.get("method"), request.get("arguments", {})
        handler = METHODS.get(method) if isinstance(method, str) else None
        if handler is None:
            reply["result"] = "method name not recognized"
            return reply
        if not isinstance(args, dict):
            reply["result"] = "invalid request: 'arguments' is not an object"
            return reply
        try:
            reply["arguments"] = handler(self.daemon, args)
            if method == "session-get" and "session-id" in reply["arguments"]:
                reply["arguments"]["session-id"] = self.session_id
            reply["result"] = "success"
        except (RpcError, DaemonError, AnomosError) as exc:
            reply["result"] = str(exc)
        except Exception as exc:  # a bug of ours: one line in the log and the answer
            log.exception("RPC %s failed", method)
            reply["result"] = f"internal error: {type(exc).__name__}"
        return reply


def _error(message: str) -> bytes:
    return json.dumps({"result": message, "arguments": {}}).encode()


class _Handler(WSGIHandler):  # type: ignore[misc]
    def get_environ(self) -> Any:
        environ = super().get_environ()
        environ["anomos.socket"] = self.socket  # (the web page's event streams bound sends)
        return environ

    def _handle_client_error(self, ex: Exception) -> Any:
        if isinstance(ex, OSError):  # the idle timeout, a reset: no one to answer
            log.debug("RPC connection from %s dropped: %s", self.client_address, ex)
            return None
        return super()._handle_client_error(ex)


class RpcServer(WSGIServer):  # type: ignore[misc]
    """gevent's WSGI server, with MAX_CONNECTIONS slots and an idle timeout per connection;
    its own complaints go to the log, one line each."""

    handler_class = _Handler

    def __init__(self, address: tuple[str, int], app: RpcApp) -> None:
        super().__init__(address, app, log=None, error_log=log, spawn=MAX_CONNECTIONS)

    def handle(self, sock: Any, address: Any) -> None:
        sock.settimeout(IDLE_TIMEOUT)
        super().handle(sock, address)
