"""The daemon's web page, served on the RPC's port next to ``/transmission/rpc``.

``/web/`` is one HTML page with its own script and style sheet (package data, no
outside assets). The script drives the daemon with the Transmission RPC itself,
as Transmission's web client does (session-id handshake and all), and follows
``/web/events``: server-sent events carrying the torrent list, the session's
figures and the neighbourhood about once a second.

Every request, the RPC's too, first has its ``Host`` header checked: without
authentication only loopback names and IP literals are served, so a page whose
DNS name is re-bound to 127.0.0.1 cannot drive the daemon (Transmission's
rpc-host-whitelist). The page and its events need the RPC's credentials when it
has them; its answers forbid framing and any script or style not its own.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import gevent

if TYPE_CHECKING:
    from anomos.daemon.rpc import RpcApp

log = logging.getLogger(__name__)

WEB_PATH = "/web/"
EVENTS_PATH = "/web/events"
#: Seconds between two events of a stream.
EVENT_INTERVAL = 1.0
#: Event streams served at once (each holds one of the server's connection slots).
MAX_EVENT_STREAMS = 8
#: Events a stream's client may leave unread in our send queue before it is closed
#: (it reconnects by itself when it reads again, and gets the current list).
MAX_UNREAD_EVENTS = 4
#: Seconds a send to an event stream may block: a client that stops reading is closed.
EVENT_SEND_TIMEOUT = 10.0
#: Kernel send buffer of an event stream: what a stalled reader can make us hold.
EVENT_SEND_BUFFER = 64 * 1024
#: The torrent fields each event carries (the list; details come from torrent-get).
LIST_FIELDS = [
    "id",
    "name",
    "status",
    "percentDone",
    "sizeWhenDone",
    "leftUntilDone",
    "rateDownload",
    "rateUpload",
    "eta",
    "uploadRatio",
    "uploadedEver",
    "downloadedEver",
    "error",
    "errorString",
    "peersConnected",
    "anomos-circuits",
]

#: Served files: URL path -> (file in static/, content type).
_FILES = {
    WEB_PATH: ("index.html", "text/html; charset=UTF-8"),
    WEB_PATH + "app.js": ("app.js", "text/javascript; charset=UTF-8"),
    WEB_PATH + "style.css": ("style.css", "text/css; charset=UTF-8"),
}

#: On every answer of the page: nothing but its own script, style and requests; never framed.
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]

Answer = tuple[str, list[tuple[str, str]], Any]


def host_allowed(host_header: str, auth_required: bool) -> bool:
    """Whether a request naming ``host_header`` may be served: any with authentication
    on, else ``localhost`` or an IP literal (a DNS-rebinding page sends its own name)."""
    if auth_required or not host_header:
        return True  # (no Host: not a browser, so not a re-bound page)
    if host_header.startswith("["):
        host = host_header[1 : host_header.find("]")] if "]" in host_header else ""
    else:
        host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class WebPage:
    """Routes the page, its files and its event streams; refuses foreign Host headers."""

    def __init__(self, app: RpcApp) -> None:
        self.app = app
        self.files = {path: (_read(name), kind) for path, (name, kind) in _FILES.items()}
        self.streams = 0
        self._snapshot: tuple[float, bytes] = (-1e9, b"")

    def answer(self, environ: dict[str, Any]) -> Answer | None:
        """The answer to a request that is not the RPC's business, else ``None``."""
        host = environ.get("HTTP_HOST", "")
        if not host_allowed(host, self.app.config.auth_required):
            message = f"host {host[:100]!r} is not a loopback name: refused (DNS rebinding?)"
            return _text("421 Misdirected Request", message)
        path = environ.get("PATH_INFO", "")
        if path in ("", "/", "/web"):
            return "302 Found", [("Location", WEB_PATH), ("Content-Length", "0")], [b""]
        if path not in _FILES and path != EVENTS_PATH:
            return None
        if not self.app.authorized(environ):
            answer = _text("401 Unauthorized", "unauthorized user")
            answer[1].append(("WWW-Authenticate", 'Basic realm="anomos"'))
            return answer
        method = environ.get("REQUEST_METHOD")
        if method != "GET" and (method != "HEAD" or path == EVENTS_PATH):
            return _text("405 Method Not Allowed", "GET only")
        if path == EVENTS_PATH:
            return self._events(environ)
        body, kind = self.files[path]
        headers = [("Content-Type", kind), ("Content-Length", str(len(body))), *SECURITY_HEADERS]
        return "200 OK", headers, [body]

    def _events(self, environ: dict[str, Any]) -> Answer:
        if self.streams >= MAX_EVENT_STREAMS:
            return _text("503 Service Unavailable", f"more than {MAX_EVENT_STREAMS} event streams")
        sock = environ.get("anomos.socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, EVENT_SEND_BUFFER)
            sock.settimeout(EVENT_SEND_TIMEOUT)
        headers = [
            ("Content-Type", "text/event-stream; charset=UTF-8"),
            ("X-Accel-Buffering", "no"),
            ("Connection", "close"),  # (a stream we end frees its connection slot too)
            *SECURITY_HEADERS,
        ]
        return "200 OK", headers, EventStream(self, self.snapshot, sock)

    def snapshot(self) -> bytes:
        """One event: the torrent list, the session's figures and the neighbourhood
        (made at most once per interval, whatever the number of streams)."""
        made, event = self._snapshot
        now = time.monotonic()
        if now - made < EVENT_INTERVAL / 2:
            return event
        from anomos.daemon.rpc import METHODS

        daemon = self.app.daemon
        stats = METHODS["session-stats"](daemon, {})
        doc = {
            "torrents": METHODS["torrent-get"](daemon, {"fields": LIST_FIELDS})["torrents"],
            "session": {k: v for k, v in stats.items() if k != "cumulative-stats"},
            "neighbourhood": METHODS["anomos-neighbours"](daemon, {}),
        }
        event = b"data: " + json.dumps(doc).encode() + b"\n\n"
        self._snapshot = now, event
        return event


class EventStream:
    """The body of one ``/web/events`` answer: an event per interval until the client
    goes; counted in ``page.streams`` from creation until the server closes it."""

    def __init__(self, page: WebPage, make: Callable[[], bytes], sock: Any = None) -> None:
        self.page = page
        self.make = make
        self.sock = sock
        self.closed = False
        page.streams += 1

    def __iter__(self) -> Iterator[bytes]:
        yield b"retry: 2000\n\n"
        while not self.closed:
            event = self.make()
            if _unsent(self.sock) > MAX_UNREAD_EVENTS * len(event):
                log.info("web event stream closed: its client reads too slowly")
                return
            yield event
            gevent.sleep(EVENT_INTERVAL)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.page.streams -= 1


def _unsent(sock: Any) -> int:
    """Bytes written to ``sock`` that its peer has not taken yet (0 where unknown)."""
    try:
        import fcntl
        import termios
    except ImportError:  # not POSIX: the send timeout alone closes slow clients
        return 0
    if sock is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", queued)[0])


def _read(name: str) -> bytes:
    return (resources.files(__name__) / "static" / name).read_bytes()


def _text(status: str, message: str) -> Answer:
    body = message.encode()
    headers = [("Content-Type", "text/plain; charset=UTF-8"), ("Content-Length", str(len(body)))]
    return status, [*headers, *SECURITY_HEADERS], [body]
