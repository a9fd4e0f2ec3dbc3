"""End to end: a tracker and 8+ peers as separate processes on distinct 127.0.0.X.

The evidence comes from the operating system's socket table (``ss -tin``), not
from anomos' own logs: which addresses connected, and how many bytes each
socket received.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from anomos.localnet import LocalNetwork
from anomos.torrent.metainfo import make_metainfo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("ss") is None, reason="needs ss (iproute2) for the socket table"
    ),
]

FILE_SIZE = 24 * 1024 * 1024 + 12345
SS_LINE = re.compile(r"^\s*\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)")
BYTES_RECEIVED = re.compile(r"bytes_received:(\d+)")


def socket_table() -> dict[tuple[str, int, str, int], int]:
    """Established TCP sockets: (local ip, port, remote ip, port) -> bytes received."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    table: dict[tuple[str, int, str, int], int] = {}
    key = None
    for line in out.splitlines():
        m = SS_LINE.match(line)
        if m:
            key = (m[1], int(m[2]), m[3], int(m[4]))
            table[key] = 0
            continue
        r = BYTES_RECEIVED.search(line)
        if r and key is not None:
            table[key] = int(r[1])
    return table


def tracker_edges(db: Path) -> set[frozenset[str]]:
    """Neighbour pairs the tracker made, as pairs of hosts (read from its SQLite file)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT pa.address, pb.address FROM edges "
            "JOIN peers pa ON pa.identity = edges.a JOIN peers pb ON pb.identity = edges.b"
        ).fetchall()
    finally:
        con.close()
    return {frozenset((a.rpartition(":")[0], b.rpartition(":")[0])) for a, b in rows}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_anonymous_multi_source_transfer_between_processes(tmp_path: Path) -> None:
    data = tmp_path / "share" / "payload.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(FILE_SIZE))
    with LocalNetwork(tmp_path / "net") as net:
        tracker = net.start_tracker()
        meta = make_metainfo(
            data, trackers=[net.tracker_url], fingerprint=net.fingerprint, progress=False
        )
        atorrent = tmp_path / "payload.atorrent"
        meta.save(atorrent)
        relays = [net.start_peer(f"relay{i}", "relay") for i in range(4)]
        seeders = [
            net.start_peer(f"seeder{i}", "seed", str(atorrent), "--data", str(data))
            for i in range(3)
        ]
        # New edges settle 2 s after both ends heard of them; a relay refreshes its
        # neighbour list for an unknown caller at most every 2 s, so the seeders'
        # edges may take a few seconds. Only settled edges carry circuits.
        time.sleep(6.0)
        dest = tmp_path / "dest"
        summary = tmp_path / "summary.json"
        downloader = net.start_peer(
            "downloader",
            "get",
            str(atorrent),
            "--dest",
            str(dest),
            "--summary",
            str(summary),
            "--timeout",
            "150",
            "--keep-seeding",  # stays up so the tracker's database shows its edges
            wait=False,
        )
        peers = {p.host: p for p in [*relays, *seeders, downloader]}
        seen_pairs: set[frozenset[str]] = set()
        # Bytes each peer-to-peer socket received, the most seen: a link that
        # closes before the end takes its kernel counter with it.
        received: dict[tuple[str, int, str, int], int] = {}
        edges: set[frozenset[str]] = set()
        db = tracker.state_dir / "tracker.sqlite3"
        deadline = time.monotonic() + 180
        done_at = None
        # Sample until the download is complete, then 2 s more: the tracker writes its
        # database once a second.
        while downloader.alive() and time.monotonic() < deadline:
            for key, n in socket_table().items():
                lip, _, rip, _ = key
                if lip in peers and rip in peers:
                    seen_pairs.add(frozenset((lip, rip)))
                    received[key] = max(received.get(key, 0), n)
            if db.exists():
                edges |= tracker_edges(db)
            if done_at is None and summary.exists():
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > 2.0:
                break
            time.sleep(0.2)
        assert done_at is not None, downloader.log_tail()
        for key, n in socket_table().items():
            received[key] = max(received.get(key, 0), n)
        assert downloader.stop() == 0, downloader.log_tail()

        # The file arrived intact, from several sources over circuits with relays.
        assert sha256(dest / data.name) == sha256(data)
        report = json.loads(summary.read_text())
        assert len(report["circuits"]) >= 2, report
        assert all(c["relays"] >= 1 for c in report["circuits"]), report

        # Every peer-to-peer connection the OS saw joins two assigned neighbours.
        assert seen_pairs, "no peer links observed"
        assert seen_pairs <= edges, seen_pairs - edges
        for seeder in seeders:
            pair = frozenset((seeder.host, downloader.host))
            if pair not in edges:
                assert pair not in seen_pairs

        # The file's bytes crossed relay links: each byte crossed at least two
        # links before the downloader's, received by processes other than it.
        received_by_others = sum(
            n
            for (lip, _, rip, _), n in received.items()
            if lip in peers and rip in peers and lip != downloader.host
        )
        assert received_by_others >= 2 * FILE_SIZE, received_by_others
