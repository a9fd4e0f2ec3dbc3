"""The send-rate token bucket: parsing, and that it never lets more through than the rate."""

from __future__ import annotations

import time

import gevent
import pytest

from anomos.errors import ConfigError
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
