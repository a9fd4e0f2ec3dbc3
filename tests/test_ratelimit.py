"""The send-rate token bucket: parsing, and that it never lets more through than the rate."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import gevent
import pytest
from test_link import make_node, pair  # noqa: F401  (make_node: fixture)

from anomos.errors import ConfigError
from anomos.localnet import LocalNetwork
from anomos.net.frames import CELL_BODY, HEADER_SIZE, Cmd
from anomos.net.ratelimit import BURST_SECONDS, TokenBucket, parse_rate
from anomos.torrent.metainfo import make_metainfo


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


@pytest.mark.slow
@pytest.mark.integration
def test_a_seeder_with_max_send_rate_is_paced_end_to_end(tmp_path: Path) -> None:
    rate, size = 1_000_000, 4 * 1024 * 1024
    data = tmp_path / "share" / "payload.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(size))
    with LocalNetwork(tmp_path / "net") as net:
        net.start_tracker("--relays", "1-1")
        atorrent = tmp_path / "payload.atorrent"
        make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        ).save(atorrent)
        for i in range(3):
            net.start_peer(f"relay{i}", "relay")
        net.start_peer(
            "seeder", "seed", str(atorrent), "--data", str(data), "--max-send-rate", "1M"
        )
        time.sleep(4.0)  # let the edges settle (see test_network)
        dest = tmp_path / "dest"
        began = time.monotonic()
        getter = net.start_peer(
            "downloader", "get", str(atorrent), "--dest", str(dest), "--timeout", "60", wait=False
        )
        assert getter.popen.wait(90) == 0, getter.log_tail()
        elapsed = time.monotonic() - began
    assert (dest / data.name).read_bytes() == data.read_bytes()
    # The one source sent every byte of the file (and more: cells, records) at 1 MB/s
    # after a burst of a quarter second: it cannot have taken less than this.
    assert elapsed >= (size - rate * BURST_SECONDS) / rate, elapsed
