"""The tracker's HTTPS front end: connections, routing, per-client limits, errors.

It knows nothing of peers or graphs. It bounds what a client can cost before
any request is read: connections per IP, a deadline on each handshake and
request (trickling bytes buys nothing), a kept-alive connection's idle time,
requests per client IP (one :class:`anomos.net.ratelimit.TokenBucket` each,
per identity instead behind a shared address such as tor's), and body sizes.
Then it routes ``/announce`` and ``/circuits`` to the orchestrator
(:mod:`anomos.tracker.server`) through the signature check it is given, and
turns every :class:`Refused` into an HTTP status with a one-line bencoded
reason. Connections are kept alive between requests (HTTP/1.1), so a client
that reuses one pays the TLS handshake once (docs/performance.md).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from anomos import bencode
from anomos.errors import AnomosError
from anomos.tracker.limits import KeyedBuckets
from anomos.tracker.settings import TrackerSettings

log = logging.getLogger(__name__)

#: Largest request body accepted.
MAX_BODY = 64 * 1024
#: Client IPs whose buckets are remembered (least recently seen forgotten first).
MAX_RATE_CLIENTS = 65536
#: Connections served at once.
MAX_CONNECTIONS = 512

ANNOUNCE_PATH = "/announce"
CIRCUITS_PATH = "/circuits"
STATS_PATH = "/stats"


class Refused(AnomosError):
    """A request the tracker answers with an HTTP error and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


class Endpoints(Protocol):
    """What the front end serves: the orchestrator's handlers of checked requests."""

    def stats(self) -> dict[str, int]: ...

    def announce(
        self,
        peer: bytes,
        inner: dict[bytes, Any],
        network: str | None = None,
        client: str | None = None,
    ) -> dict[bytes, Any]: ...

    def circuits(self, peer: bytes, inner: dict[bytes, Any]) -> dict[bytes, Any]: ...


#: Checks a request body for a path; the signer's identity and the inner message.
Verify = Callable[[str, bytes], tuple[bytes, dict[bytes, Any]]]


class FrontEnd:
    """One tracker's HTTPS server and its WSGI application."""

    def __init__(
        self,
        settings: TrackerSettings,
        endpoints: Endpoints,
        verify: Verify,
        network: Callable[[str], str],
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.verify = verify
        #: The source network of a client IP (joins are rationed per network).
        self.network = network
        #: Requests per client IP (or per identity from a shared address).
        self.limiter = KeyedBuckets(
            settings.rate, settings.burst, time.monotonic, limit=MAX_RATE_CLIENTS
        )
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_port)

    def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        application: Callable[..., list[bytes]] | None = None,
    ) -> None:
        """Listen and serve ``application`` (by default :meth:`wsgi`); raises OSError if
        the address cannot be bound."""
        server = _Server(
            (host, port),
            application or self.wsgi,
            spawn=Pool(MAX_CONNECTIONS),
            settings=self.settings,
            log=None,
            error_log=log,
            ssl_context=ssl_context,
        )
        server.start()
        self._server = server

    def stop(self, timeout: float) -> None:
        if self._server is not None:
            self._server.stop(timeout=timeout)
            self._server = None

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """The WSGI application: routing, limits, signature checks, one-line errors."""
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        client = environ.get("REMOTE_ADDR", "?")
        shared = client in self.settings.shared_clients
        try:
            if not shared and not self.limiter.try_take(client):
                raise Refused(429, "too many requests; slow down")
            if path == STATS_PATH:
                if shared and not self.limiter.try_take(f"{client} /stats"):
                    raise Refused(429, "too many requests; slow down")
                if method != "GET":
                    raise Refused(405, "use GET for /stats")
                body = json.dumps(self.endpoints.stats()).encode()
                return respond(start_response, 200, body, "application/json")
            if path not in (ANNOUNCE_PATH, CIRCUITS_PATH):
                raise Refused(404, f"no such endpoint {path[:64]!r}")
            if method != "POST":
                raise Refused(405, f"use POST for {path}")
            peer, inner = self.verify(path, read_body(environ))
            if shared and not self.limiter.try_take(peer.hex()):
                raise Refused(429, "too many requests; slow down")
            if path == ANNOUNCE_PATH:
                network = None if shared else self.network(client)
                reply = self.endpoints.announce(peer, inner, network, None if shared else client)
            else:
                reply = self.endpoints.circuits(peer, inner)
            encode = encode_announce_reply if path == ANNOUNCE_PATH else bencode.encode
            return respond(start_response, 200, encode(reply))
        except Refused as exc:
            # A client over its rate gets a token back within 1/rate seconds.
            retry = [("Retry-After", str(max(1, math.ceil(1 / self.settings.rate))))]
            return respond(
                start_response,
                exc.status,
                bencode.encode({b"failure reason": exc.reason}),
                headers=retry if exc.status == 429 else [],
            )
        except Exception:
            log.exception("tracker failed on %s", path[:64])
            return respond(
                start_response, 500, bencode.encode({b"failure reason": b"internal error"})
            )


#: The keys of an announce reply (:meth:`anomos.tracker.server.Tracker._reply`) and of
#: each neighbour in it: one the peer dials whose far end has not heard of the edge
#: yet also carries its edge ticket.
_REPLY_KEYS = frozenset(
    b"downloaded epoch interval min_interval neighbours ratio reachable relayed "
    b"relayed_claimed uploaded uploaded_claimed".split()
)
_NEIGHBOUR_KEYS = frozenset((b"address", b"dial", b"identity", b"nid"))
_TICKETED_KEYS = _NEIGHBOUR_KEYS | {b"ticket"}
_REPLY = (
    b"d10:downloadedi%de5:epochi%de8:intervali%de12:min_intervali%de10:neighboursl%se"
    b"5:ratio%d:%s9:reachable%d:%s7:relayedi%de15:relayed_claimedi%de"
    b"8:uploadedi%de16:uploaded_claimedi%dee"
)
_NEIGHBOUR = b"d7:address%d:%s4:diali%de8:identity%d:%s3:nidi%de"
_TICKET = b"6:ticket%d:%s"


def encode_announce_reply(reply: dict[bytes, Any]) -> bytes:
    """``bencode.encode(reply)`` for an announce reply, the same bytes in ~2/3 of the CPU
    (docs/performance.md, "Third pass"): its keys are known, so it is filled into a
    template instead of walked and sorted item by item. Any other dict (a key more or
    less, a value of another type) is left to :func:`bencode.encode`."""
    try:
        if reply.keys() != _REPLY_KEYS:
            raise TypeError
        neighbours = []
        for n in reply[b"neighbours"]:
            if type(n) is not dict:
                raise TypeError
            keys = n.keys()
            if keys == _NEIGHBOUR_KEYS:
                end = b"e"
            elif keys == _TICKETED_KEYS:
                ticket = n[b"ticket"]
                end = _TICKET % (len(ticket), ticket) + b"e"
            else:
                raise TypeError
            address, identity = n[b"address"], n[b"identity"]
            neighbours.append(
                _NEIGHBOUR
                % (
                    len(address),
                    address,
                    _int(n[b"dial"]),
                    len(identity),
                    identity,
                    _int(n[b"nid"]),
                )
                + end
            )
        ratio, reachable = reply[b"ratio"], reply[b"reachable"]
        return _REPLY % (
            _int(reply[b"downloaded"]),
            _int(reply[b"epoch"]),
            _int(reply[b"interval"]),
            _int(reply[b"min_interval"]),
            b"".join(neighbours),
            len(ratio),
            ratio,
            len(reachable),
            reachable,
            _int(reply[b"relayed"]),
            _int(reply[b"relayed_claimed"]),
            _int(reply[b"uploaded"]),
            _int(reply[b"uploaded_claimed"]),
        )
    except TypeError:
        return bencode.encode(reply)


def _int(value: Any) -> int:
    """An int as bencode writes it (not a bool or a float, which ``%d`` would take)."""
    if type(value) is not int:
        raise TypeError
    return value


def read_body(environ: dict[str, Any]) -> bytes:
    length_text = environ.get("CONTENT_LENGTH") or ""
    try:
        length = int(length_text) if length_text else -1
    except ValueError:
        raise Refused(400, "bad Content-Length") from None
    if length > MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    stream = environ["wsgi.input"]
    body: bytes = stream.read(length) if length >= 0 else stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise Refused(413, f"request body over {MAX_BODY} bytes")
    return body


def respond(
    start_response: Callable[..., Any],
    status: int,
    body: bytes,
    content_type: str = "application/x-bencode",
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start_response(
        f"{status} {_STATUS_TEXT.get(status, 'Error')}",
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])],
    )
    return [body]


# ---------------------------------------------------------------------------- connections


class _Deadline:
    """Shuts a connection down when its time is up, under whatever reads or writes it
    (the TLS handshake, a request line, a body, our reply): a socket timeout would
    never fire on a client that trickles one byte at a time."""

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self._sock = sock  # our own handle: the TLS wrapper takes over the original
        self._address = address
        self._timer: gevent.Greenlet | None = None

    def arm(self, seconds: float) -> None:
        """Cut the connection ``seconds`` from now (replacing an earlier deadline)."""
        self.cancel()
        self._timer = gevent.spawn_later(seconds, self._cut, seconds)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None

    def close(self) -> None:
        self.cancel()
        self._sock.close()

    def _cut(self, seconds: float) -> None:
        log.debug("tracker connection from %s took over %g s: cut", self._address, seconds)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


class _Handler(WSGIHandler):
    """pywsgi's handler, kept alive between requests within the idle limit; a client
    that goes away mid-request or mid-reply (every peer that exits does) is no error
    of ours: one debug line, not pywsgi's traceback."""

    server: _Server
    deadline: _Deadline | None = None
    _requests = 0

    def read_requestline(self) -> str:
        """The first request's time runs from the connection; each later request has
        ``keepalive_idle`` to arrive and then a fresh ``request_timeout``."""
        later = self._requests > 0 and self.deadline is not None
        if later:
            self.deadline.arm(self.server.settings.keepalive_idle)  # type: ignore[union-attr]
        line: str = super().read_requestline()
        if later and line:
            self.deadline.arm(self.server.settings.request_timeout)  # type: ignore[union-attr]
        self._requests += 1
        return line

    def handle_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        if issubclass(t, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
            log.debug("tracker client %s went away: %s", self.client_address, v)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


class _Server(WSGIServer):
    """pywsgi over TLS with a deadline on each connection's handshake and requests and a
    cap on connections per IP (addresses shared by many clients excepted)."""

    handler_class = _Handler

    def __init__(self, *args: Any, settings: TrackerSettings, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.settings = settings
        self.per_ip: collections.Counter[str] = collections.Counter()

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        ip = str(address[0]) if isinstance(address, tuple) and address else "?"
        cap = self.settings.max_connections_per_ip
        if self.per_ip[ip] >= cap and ip not in self.settings.shared_clients:
            log.debug("tracker: %s already holds %d connections", ip, cap)
            client_socket.close()
            return None
        self.per_ip[ip] += 1
        with contextlib.suppress(OSError):  # replies go out at once, not after a delayed ACK
            client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = _Deadline(client_socket.dup(), address)
        deadline.arm(self.settings.request_timeout)
        client_socket.settimeout(self.settings.request_timeout)
        try:
            with contextlib.closing(self.wrap_socket(client_socket, **self.ssl_args)) as tls:
                handler = self.handler_class(tls, address, self)
                handler.deadline = deadline
                handler.handle()
        except (ssl.SSLError, OSError) as exc:
            log.debug("tracker connection from %s failed: %s", address, exc)
        finally:
            deadline.close()
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
        return None
