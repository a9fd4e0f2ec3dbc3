"""A download over an emulated WAN (rate and one-way delay per node) fills more
than a fixed request window could: the flow control at work, end to end.

One network namespace, each process on its own address with an HTB uplink and
a one-way delay (anomos.bench.wan, the WAN benchmark's network). With one
relay per circuit and 100 ms one way per node, a request's round trip crosses
four delayed links: 400 ms, so a fixed 512 KiB window caps a circuit at
1.3 MB/s while its uplinks carry 12 MB/s.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from anomos.bench.wan import Profile, WanNet, unavailable
from anomos.localnet import LocalNetwork
from anomos.torrent.metainfo import make_metainfo

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.netns]

DELAY = 0.1
#: The old fixed request pipeline: 32 blocks of 16 KiB.
FIXED_WINDOW = 512 * 1024
FILE_SIZE = 24 * 1024 * 1024 + 1234


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_circuit_fills_more_than_a_fixed_window_over_a_long_path(tmp_path: Path) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    data = tmp_path / "share" / "payload.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(FILE_SIZE))
    with WanNet(Profile(100 * 10**6, DELAY)) as wan:
        # The emulation itself: a TCP connect takes two one-way delays.
        measured = wan.verify(wan.add_node(), wan.add_node(), size=4 * 1024 * 1024)
        assert abs(measured["rtt_error"]) < 0.1, measured
        net = LocalNetwork(tmp_path / "net", verbose=1)
        try:
            net.start_tracker("--relays", "1-1", host=wan.add_node(), prefix=wan.prefix)
            meta = make_metainfo(
                data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
            )
            atorrent = tmp_path / "payload.atorrent"
            meta.save(atorrent)
            for i in range(2):
                net.start_peer(f"relay{i}", "relay", host=wan.add_node(), prefix=wan.prefix)
            net.start_peer(
                "seeder", "seed", str(atorrent), "--data", str(data),
                host=wan.add_node(), prefix=wan.prefix,
            )  # fmt: skip
            summary, dest = tmp_path / "summary.json", tmp_path / "dest"
            getter = net.start_peer(
                "getter", "get", str(atorrent), "--dest", str(dest), "--sources", "1",
                "--summary", str(summary), "--timeout", "50",
                host=wan.add_node(), prefix=wan.prefix, wait=False,
            )  # fmt: skip
            assert getter.popen.wait(70) == 0, getter.log_tail()
        finally:
            net.stop()
    assert sha256(dest / data.name) == sha256(data)
    report = json.loads(summary.read_text())
    rtt = 2 * 2 * DELAY  # downloader -> relay -> seeder and back: four delayed links
    best = max(report["circuits"], key=lambda c: c["received"])
    assert best["relays"] == 1, report
    # More requests in flight than the fixed window allowed, and it paid off:
    # faster than that window could ever carry over this round trip.
    assert best["peak_in_flight"] > FIXED_WINDOW, best
    assert best["received"] / best["seconds"] > FIXED_WINDOW / rtt, best
    # Times count from the process's launch: the download loop starts after the
    # announce, the first block after it, the first verified piece last.
    startup = report["startup"]
    assert 0 < startup["download"] < report["first_byte_seconds"], report
    assert report["first_byte_seconds"] <= startup["first_piece"], report
