"""The send-rate token bucket: parsing, and that it never lets more through than the rate."""

from __future__ import annotations

import time
from typing import Any

import gevent
import pytest
from test_link import make_node, pair  # noqa: F401  (make_node: fixture)

from anomos.errors import ConfigError
from anomos.net.frames import CELL_BODY, HEADER_SIZE, Cmd
from anomos.net.ratelimit import TokenBucket, parse_rate


@pytest.mark.parametrize(
    ("text", "rate"),
    [("0", 0), ("1500", 1500), ("500k", 500_000), ("2M", 2_000_000), ("1.5MB/s", 1_500_000),
     ("1g", 10**9)],
)  # fmt: skip
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-1", "2x", "1e20"])
def test_bad_rates_are_one_line_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="rate"):
        parse_rate(text)


def test_a_zero_rate_bucket_is_refused() -> None:
    with pytest.raises(ConfigError, match="above 0"):
        TokenBucket(0)


def test_writers_sharing_a_bucket_stay_under_the_rate() -> None:
    rate, chunk, chunks = 2_000_000, 64 * 1024, 24
    bucket = TokenBucket(rate)
    sent: list[tuple[float, int]] = []
    began = time.monotonic()

    def writer() -> None:
        for _ in range(chunks):
            bucket.take(chunk)
            sent.append((time.monotonic() - began, chunk))

    gevent.joinall([gevent.spawn(writer) for _ in range(2)], raise_error=True)
    # At every moment, what went out is at most the burst plus rate x time
    # (a lower bound on the time taken: a slow machine only makes it slower).
    total = 0
    for at, n in sorted(sent):
        total += n
        assert total <= bucket.burst + rate * at + chunk, (total, at)
    assert time.monotonic() - began >= (2 * chunks * chunk - bucket.burst) / rate * 0.99


def test_a_peer_with_a_send_rate_paces_its_links(make_node: Any) -> None:  # noqa: F811
    rate, frames = 2_000_000, 48
    a, b = make_node(max_send_rate=rate), make_node()
    pair(a, b)
    la = a.links.wait_for(7, 5)
    assert a.links.send_limiter is not None and b.links.send_limiter is None
    circ_id = la.allocate_circ_id()
    payload = bytes(CELL_BODY)
    began = time.monotonic()
    for _ in range(frames):
        assert la.send(circ_id, Cmd.DATA, payload)
    with gevent.Timeout(20):
        while len(b.frames) < frames:
            gevent.sleep(0.01)
    elapsed = time.monotonic() - began
    sent = frames * (HEADER_SIZE + CELL_BODY)
    # Everything but the bucket's burst waited for tokens: at least this long.
    assert elapsed >= (sent - a.links.send_limiter.burst) / rate * 0.99, elapsed
