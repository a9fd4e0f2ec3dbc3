"""The tracker's HTTPS front end keeps connections alive, within bounds, over real TLS.

A client that reuses its connection pays the TLS handshake once
(docs/performance.md); a kept-alive connection still has a deadline for each
request, a limit on idle time, and every request on it spends from the
client's rate limit.
"""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from anomos import bencode
from anomos.config import split_address
from anomos.pluginmanager import Plugins
from anomos.testing import loopback_host
from anomos.tracker.identity import pinned_context
from anomos.tracker.server import Tracker
from anomos.tracker.settings import TrackerSettings

REQUEST_TIMEOUT = 2.0
KEEPALIVE_IDLE = 0.5


@pytest.fixture
def tracker(tmp_path: Path, plugins: Plugins) -> Iterator[Tracker]:
    settings = TrackerSettings(
        rate=1000, burst=1000, request_timeout=REQUEST_TIMEOUT, keepalive_idle=KEEPALIVE_IDLE
    )
    t = Tracker(tmp_path / "tracker", f"{loopback_host()}:0", plugins, settings)
    t.start()
    yield t
    t.stop()


def connection(tracker: Tracker, source: str | None = None) -> http.client.HTTPSConnection:
    host, port = split_address(tracker.address)
    return http.client.HTTPSConnection(
        host,
        port,
        context=pinned_context(),
        timeout=10,
        source_address=(source or loopback_host(), 0),
    )


def get_stats(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", "/stats")
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_one_connection_serves_requests_for_longer_than_one_request_deadline(tracker):
    """The deadline is per request, not per connection: requests spread over two
    request deadlines all go over the first connection (the old whole-connection
    deadline cut it after the first)."""
    conn = connection(tracker)
    assert get_stats(conn) == 200
    sock = conn.sock
    started = time.monotonic()
    served = 1
    while time.monotonic() - started < 2 * REQUEST_TIMEOUT:
        gevent.sleep(KEEPALIVE_IDLE / 2)
        assert get_stats(conn) == 200
        served += 1
    assert conn.sock is sock, "the tracker closed the connection; the client made another"
    assert served >= 6
    conn.close()


def test_an_idle_kept_alive_connection_is_closed(tracker):
    """Idle between requests, a connection is closed after the idle limit, well before
    a request's deadline."""
    conn = connection(tracker)
    assert get_stats(conn) == 200
    assert conn.sock is not None
    conn.sock.settimeout(KEEPALIVE_IDLE + 3)
    started = time.monotonic()
    try:
        assert conn.sock.recv(1) == b""  # the tracker's close, not a timeout
    except (ssl.SSLError, ConnectionError):
        pass  # cut under TLS: closed all the same
    took = time.monotonic() - started
    assert KEEPALIVE_IDLE - 0.2 < took < REQUEST_TIMEOUT - 0.5, took
    conn.close()


def test_a_second_request_trickled_on_a_kept_alive_connection_is_cut(tracker):
    """A slow-loris on a kept-alive connection: a prompt first request, then a second
    one a byte at a time. Its request deadline cuts it."""
    conn = connection(tracker)
    assert get_stats(conn) == 200
    sock = conn.sock
    assert sock is not None
    sock.sendall(b"POST /announce HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n")
    started = time.monotonic()
    with pytest.raises((OSError, ssl.SSLError)):
        for _ in range(100):
            sock.sendall(b"d")
            gevent.sleep(0.1)
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    raise ConnectionResetError("closed by the tracker")
            except (TimeoutError, ssl.SSLWantReadError):
                pass
            finally:
                sock.settimeout(5)
    took = time.monotonic() - started
    assert took < REQUEST_TIMEOUT + 1.5, took
    conn.close()


def test_requests_on_a_kept_alive_connection_spend_the_clients_rate(tmp_path, plugins):
    """Keeping a connection open buys no extra requests: the per-IP bucket is spent per
    request, and the refusal comes back on the same connection."""
    settings = TrackerSettings(rate=0.01, burst=3)
    t = Tracker(tmp_path / "t", f"{loopback_host()}:0", plugins, settings)
    t.start()
    try:
        conn = connection(t)
        assert [get_stats(conn) for _ in range(3)] == [200, 200, 200]
        conn.request("GET", "/stats")
        resp = conn.getresponse()
        assert resp.status == 429
        assert b"too many requests" in bencode.decode(resp.read())[b"failure reason"]
        assert get_stats(connection(t)) == 200  # another address has its own bucket
        conn.close()
    finally:
        t.stop()


def test_the_keepalive_bench_runs_both_ways():
    """``python -m anomos.bench.keepalive`` (docs/performance.md): a tracker process, one
    client, every kept-alive run on a single connection (the bench checks it)."""
    from anomos.bench.keepalive import keepalive_bench

    result = keepalive_bench(requests=5, rounds=1)
    for kind in ("stats", "announce"):
        assert result[f"{kind}_new_connection"] > 0 and result[f"{kind}_keepalive"] > 0
